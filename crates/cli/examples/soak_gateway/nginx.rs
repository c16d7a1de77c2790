//! A real nginx upstream on loopback: its own master process, prefix
//! directory and configuration, reloaded and restarted the way an operator
//! does it (`nginx -s reload`, `nginx -s stop` or `-s quit`).
//!
//! nginx answers every chat completion itself with `return 200`: a fixed
//! OpenAI-style JSON completion under `/json/`, a fixed event stream
//! (`text/event-stream`, a few `data:` events and `data: [DONE]`) under
//! `/sse/`. The gateway appends `/chat/completions` to a provider's base
//! URL, so a provider whose base URL ends in `/json/v1` always answers
//! JSON and one ending in `/sse/v1` always streams. nginx cannot choose by
//! the request body, and does not need to: the soak's JSON and streaming
//! requests go to different models.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::Error;

/// Where nginx is looked for when `--nginx` is not given.
pub(crate) const DEFAULT_BINARY: &str = "/usr/sbin/nginx";

/// The non-streaming completion every `/json/` request gets.
pub(crate) const COMPLETION: &str = concat!(
    r#"{"id":"chatcmpl-soak","object":"chat.completion","created":1700000000,"#,
    r#""model":"soak","choices":[{"index":0,"message":{"role":"assistant","#,
    r#""content":"ok"},"finish_reason":"stop"}],"#,
    r#""usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#
);

/// The streamed completion every `/sse/` request gets, as nginx's config
/// parser reads it (`\n` escapes become newlines).
const STREAM: &str = concat!(
    r#"data: {"id":"chatcmpl-soak","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n"#,
    r#"data: {"id":"chatcmpl-soak","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"o"}}]}\n\n"#,
    r#"data: {"id":"chatcmpl-soak","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"k"},"finish_reason":"stop"}]}\n\n"#,
    r#"data: [DONE]\n\n"#
);

/// The streamed completion as a client receives it.
pub(crate) fn stream_text() -> String {
    STREAM.replace("\\n", "\n")
}

/// How an nginx instance is stopped for a restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    /// `nginx -s stop` (SIGTERM): connections are closed at once, requests
    /// in flight included.
    Fast,
    /// `nginx -s quit` (SIGQUIT): the listener closes, requests in flight
    /// finish, idle keep-alive connections close.
    Graceful,
}

impl Stop {
    fn signal(self) -> &'static str {
        match self {
            Stop::Fast => "stop",
            Stop::Graceful => "quit",
        }
    }

    pub(crate) fn describe(self) -> &'static str {
        match self {
            Stop::Fast => "restart (stop)",
            Stop::Graceful => "restart (quit)",
        }
    }
}

/// One nginx master (and its worker) serving on a fixed loopback port.
#[derive(Debug)]
pub(crate) struct Nginx {
    pub(crate) name: &'static str,
    pub(crate) addr: SocketAddr,
    binary: PathBuf,
    prefix: PathBuf,
    master: Option<Child>,
}

impl Nginx {
    /// Writes the configuration under `prefix` and starts the master;
    /// returns once the port accepts connections.
    pub(crate) async fn start(
        name: &'static str,
        binary: &Path,
        prefix: PathBuf,
        addr: SocketAddr,
    ) -> Result<Nginx, Error> {
        std::fs::create_dir_all(prefix.join("logs"))?;
        std::fs::write(prefix.join("nginx.conf"), config(&prefix, addr))?;
        let mut nginx = Nginx {
            name,
            addr,
            binary: binary.to_owned(),
            prefix,
            master: None,
        };
        nginx.launch().await?;
        Ok(nginx)
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("-p")
            .arg(&self.prefix)
            .arg("-c")
            .arg(self.prefix.join("nginx.conf"))
            // Where nginx logs before it has read its configuration.
            .arg("-e")
            .arg(self.prefix.join("logs/error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }

    /// Starts the master (in the foreground: `daemon off`, so it is this
    /// process's child) and waits until the port accepts a connection.
    pub(crate) async fn launch(&mut self) -> Result<(), Error> {
        // Its log is the error log file; nothing is read from its stderr.
        let mut master = self.command().stderr(Stdio::null()).spawn()?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = master.try_wait()? {
                let log =
                    std::fs::read_to_string(self.prefix.join("logs/error.log")).unwrap_or_default();
                return Err(
                    format!("nginx {} exited at start ({status}):\n{log}", self.name).into(),
                );
            }
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                self.master = Some(master);
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(
                    format!("nginx {} does not listen on its port after 10 s", self.name).into(),
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends `signal` the operator's way: `nginx -s SIGNAL` reads the pid
    /// file and signals the master.
    async fn signal(&self, signal: &str) -> Result<(), Error> {
        let out = self.command().arg("-s").arg(signal).output().await?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "nginx {} -s {signal}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            )
            .into())
        }
    }

    /// A configuration reload: a new worker starts, the old one finishes
    /// its requests and closes its keep-alive connections.
    pub(crate) async fn reload(&self) -> Result<(), Error> {
        self.signal("reload").await
    }

    /// Stops the master and waits until it has exited (the master exits
    /// after its workers, so the port is closed then).
    pub(crate) async fn stop(&mut self, how: Stop) -> Result<(), Error> {
        let Some(mut master) = self.master.take() else {
            return Ok(());
        };
        self.signal(how.signal()).await?;
        match tokio::time::timeout(Duration::from_secs(30), master.wait()).await {
            Ok(status) => {
                status?;
                Ok(())
            }
            Err(_) => Err(format!(
                "nginx {} still running 30 s after -s {}",
                self.name,
                how.signal()
            )
            .into()),
        }
    }

    /// The base URL of the JSON (`"sse"`: streaming) location.
    pub(crate) fn base_url(&self, location: &str) -> String {
        format!("http://{}/{location}/v1", self.addr)
    }
}

/// A master left running (an error, Ctrl-C) is stopped with its workers
/// and waited for: killing the master alone would leave the workers
/// listening.
impl Drop for Nginx {
    fn drop(&mut self) {
        let Some(mut master) = self.master.take() else {
            return;
        };
        let _ = std::process::Command::new(&self.binary)
            .arg("-p")
            .arg(&self.prefix)
            .arg("-c")
            .arg(self.prefix.join("nginx.conf"))
            .arg("-e")
            .arg(self.prefix.join("logs/error.log"))
            .args(["-s", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        for _ in 0..100 {
            if !matches!(master.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = master.start_kill();
    }
}

/// The configuration: one worker, no access log, nginx's own keep-alive
/// defaults (75 s, 1000 requests per connection), and the two locations.
fn config(prefix: &Path, addr: SocketAddr) -> String {
    let p = prefix.display();
    format!(
        "daemon off;\n\
         master_process on;\n\
         worker_processes 1;\n\
         pid {p}/logs/nginx.pid;\n\
         error_log {p}/logs/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n\
         \x20   access_log off;\n\
         \x20   client_body_temp_path {p}/client_body;\n\
         \x20   proxy_temp_path {p}/proxy;\n\
         \x20   fastcgi_temp_path {p}/fastcgi;\n\
         \x20   uwsgi_temp_path {p}/uwsgi;\n\
         \x20   scgi_temp_path {p}/scgi;\n\
         \x20   server {{\n\
         \x20       listen {addr};\n\
         \x20       location /json/ {{ default_type application/json; return 200 '{COMPLETION}'; }}\n\
         \x20       location /sse/ {{ default_type text/event-stream; return 200 '{STREAM}'; }}\n\
         \x20   }}\n\
         }}\n"
    )
}

/// Checks that `binary` runs (`nginx -v`).
pub(crate) fn check(binary: &Path) -> io::Result<String> {
    let out = std::process::Command::new(binary).arg("-v").output()?;
    Ok(String::from_utf8_lossy(&out.stderr).trim().to_owned())
}
