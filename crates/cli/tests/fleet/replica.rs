//! One replica: a real `retryctl serve` process, its configuration in a
//! ConfigMap-style volume, its own loopback addresses.

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::volume::ConfigMapVolume;

/// A running `retryctl serve`. Dropping it kills the process.
pub(crate) struct Replica {
    /// Where clients send requests.
    pub(crate) listen: SocketAddr,
    /// Where `/metrics` is served.
    pub(crate) metrics: SocketAddr,
    /// `gateway.toml` and `policy.toml`, as the kubelet mounts them.
    pub(crate) volume: ConfigMapVolume,
    child: Child,
    /// Everything the process wrote to stderr so far.
    log: Arc<Mutex<String>>,
}

/// The value of `addr=` on a log line.
fn addr_field(line: &str) -> Option<SocketAddr> {
    line.split("addr=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

impl Replica {
    /// Starts `retryctl serve --config <volume>/gateway.toml` and waits
    /// until both its listeners are bound.
    pub(crate) async fn start(gateway_toml: &str, policy_toml: &str) -> Self {
        let volume =
            ConfigMapVolume::new(&[("gateway.toml", gateway_toml), ("policy.toml", policy_toml)]);
        let mut child = Command::new(env!("CARGO_BIN_EXE_retryctl"))
            .arg("serve")
            .arg("--config")
            .arg(volume.path().join("gateway.toml"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start retryctl serve");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let log = Arc::new(Mutex::new(String::new()));
        let (mut listen, mut metrics) = (None, None);
        while listen.is_none() || metrics.is_none() {
            let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "retryctl serve did not start in 20 s:\n{}",
                        log.lock().unwrap()
                    )
                })
                .expect("read stderr")
                .unwrap_or_else(|| panic!("retryctl serve exited:\n{}", log.lock().unwrap()));
            if line.contains("metrics on /metrics") {
                metrics = addr_field(&line);
            } else if line.contains("gateway listening") {
                listen = addr_field(&line);
            }
            let mut log = log.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
        // Keep reading: a full pipe would block the process.
        let sink = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Replica {
            listen: listen.unwrap(),
            metrics: metrics.unwrap(),
            volume,
            child,
            log,
        }
    }

    /// What the process has logged so far.
    pub(crate) fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Its `/metrics` text.
    pub(crate) async fn scrape(&self, http: &reqwest::Client) -> String {
        http.get(format!("http://{}/metrics", self.metrics))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .expect("GET /metrics")
            .text()
            .await
            .expect("the /metrics body")
    }

    /// SIGTERM, as the kubelet sends it after preStop; the exit status and
    /// the log once the process has exited (at most `timeout`).
    pub(crate) async fn terminate(mut self, timeout: Duration) -> (ExitStatus, String) {
        let pid = self.child.id().expect("running").to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {pid}");
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("no exit {timeout:?} after SIGTERM:\n{}", self.log()))
            .expect("wait");
        // The reader task sees EOF once the process is gone.
        tokio::time::sleep(Duration::from_millis(50)).await;
        (status, self.log())
    }
}
