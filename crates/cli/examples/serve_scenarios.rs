//! Two upstream faults measured through `retryctl serve`, with retries off,
//! with the shipped policy and (when it is installed) through HAProxy,
//! side by side in one run.
//!
//! ```sh
//! cargo build --release                                   # the gateway binary
//! cargo run --release --example serve_scenarios -- backlog1
//! cargo run --release --example serve_scenarios -- restart
//! cargo run --release --example serve_scenarios -- all
//! cargo run --release --example serve_scenarios -- all --no-haproxy
//! ```
//!
//! Each gateway is its own `target/release/retryctl serve` process in front
//! of its own upstream, started here on loopback; the upstreams are
//! identical and follow one clock. The load comes from this process, the
//! same for every column.
//!
//! * `backlog1`: the upstream listens with a backlog of 1 and accepts one
//!   connection every `--accept-every-ms`; each accepted connection is
//!   served keep-alive (`--keepalive-requests` responses, then
//!   `Connection: close`, as nginx's `keepalive_requests`; idle ones are
//!   closed after 5 s, as uvicorn). `--clients` keep-alive clients per
//!   gateway send one request after another (closed loop). The provider's
//!   `connect_timeout` is 500 ms. Target: >= 95% of the baseline's failures
//!   absorbed, <= 10% extra upstream attempts.
//! * `restart`: the upstream's port is closed for 3 s every 8 s (first at
//!   4 s) and reopened on the same port; `--rate` requests per second
//!   arrive at each gateway (open loop). Target: >= 99.9% absorbed, and,
//!   once the gate has seen the outage, failed connects <= one per probe
//!   interval of `[admission]`. The attempts already in flight when the
//!   port closes fail before anything can know it (the client re-sends
//!   each once on a new connection, which is refused): they are reported
//!   beside it, per outage.
//!
//! "Retries off" is `max_rounds = 1` with `[admission] enabled = false`;
//! "retryctl" is `config/policy.toml` as shipped. Upstream attempts are the
//! gateway's own count (`retryctl_attempts_total`, every result, failed
//! connects included) read from its `/metrics`, beside what the upstream
//! saw (connections accepted, requests received). Gateway logs go to
//! `target/serve-scenarios/` (warnings and up; `RUST_LOG` overrides).
//!
//! # The HAProxy column
//!
//! The reference a retry layer is measured against: HAProxy (2.6 here)
//! with nothing but its default `retries 3`, in front of a third identical
//! upstream under the same load: `mode http`, `timeout connect` 500 ms in
//! backlog1 (as the gateway's provider) and 5 s in restart (Debian's
//! shipped `haproxy.cfg`; after a refused connect HAProxy waits
//! `min(timeout connect, 1 s)` before the next one, after a connect
//! timeout it retries at once), keep-alive to the upstream with the
//! default `http-reuse safe`, one server, no health checks. Its attempts
//! come from its Prometheus exporter (a second frontend): connects
//! (`connection_attempts`, failed ones included) plus requests sent on a
//! reused connection (`connection_reuses`); failed connects are the
//! retried ones (`retry_warnings`) plus those that ended a request with a
//! 503 (`connection_errors`). It is found as `haproxy` on `PATH` or in
//! `/usr/sbin` (`--haproxy PATH` to name one, `--no-haproxy` to leave it
//! out); without one the column is skipped with a message. Its log
//! (abnormal sessions only, retried ones included) is in
//! `target/serve-scenarios/` too.
//!
//! Three runs of `all` (2-vCPU shared VM, load 4-6; docs/benchmarks.md
//! has the tables):
//!
//! | | retries off | retryctl | HAProxy `retries 3` |
//! |---|---|---|---|
//! | backlog1: failed (of ~1,090 / ~735 / ~770) | 360, 360, 360 | 0, 0, 0 | 27, 34, 54 |
//! | backlog1: absorbed (by count / by rate) | - | 100% / 100% | 85.0-92.5% / 79.2-89.3% |
//! | backlog1: extra upstream attempts | 0 | +1.4% | +39.0-43.8% |
//! | backlog1: p50 / p99 | 83-85 / 503-508 ms | 329-331 / 679-706 ms | 83 / 2,006 ms |
//! | restart: failed (of ~8,000) | 3,021-3,022 | 0, 0, 0 | 22, 26, 25 |
//! | restart: absorbed | - | 100% | 99.1-99.3% |
//! | restart: extra upstream attempts | 0 | +0.7% | +74.7-74.8% |
//! | restart: connects to the closed port per probe interval | 99.8 | 1.13-1.17 | 198.8-199.2 |
//! | restart: p50 / p99 | 21 / 25-31 ms | 24-28 / 3,556-3,571 ms | 22 / 3,028-3,033 ms |
//!
//! HAProxy's restart failures are the requests cut in flight: it closes
//! the client's connection without a response (the client saw
//! "connection closed" for each), where retryctl re-sends them. retryctl
//! is behind on two latencies: backlog1's p50 (both serve what the
//! acceptor takes, ~25 requests/s, so the mean is the same; retryctl's
//! gate queues every request fairly at ~330 ms, HAProxy serves most at
//! once and fails or delays the rest by 2 s) and restart's p99 (the
//! probe that finds the upstream back comes up to `probe_max_delay` = 1 s
//! after the reopen, 3.5 s into the 3 s outage, where HAProxy's per-request
//! 1 s retries land on the reopen at 3.0 s).

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

type Error = Box<dyn std::error::Error + Send + Sync>;

const MODEL: &str = "gpt-oss-120b";
const SHIPPED_POLICY: &str = include_str!("../../../config/policy.toml");
const RETRIES_OFF: &str = "max_rounds = 1\n\n[admission]\nenabled = false\n";
/// The upstream's outage in the restart scenario, and its period.
const OUTAGE: Duration = Duration::from_secs(3);
const PERIOD: Duration = Duration::from_secs(8);
const FIRST_OUTAGE: Duration = Duration::from_secs(4);
/// HAProxy's `timeout connect` in the restart scenario (Debian's
/// haproxy.cfg ships `timeout connect 5000`): a refused connect is retried
/// after min(this, 1 s).
const HAPROXY_RESTART_CONNECT_TIMEOUT: &str = "5s";
/// Idle keep-alive connections are closed after this (uvicorn's 5 s).
const UPSTREAM_IDLE: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Backlog1,
    Restart,
    All,
}

#[derive(Parser, Debug)]
#[command(about = "backlog 1 and restarts through `retryctl serve`, retries off vs on")]
struct Args {
    /// Which scenario to run.
    #[arg(value_enum)]
    scenario: Scenario,
    /// How long load is sent (default: 30 s for backlog1, 40 s for restart).
    #[arg(long)]
    seconds: Option<u64>,
    /// restart: requests per second arriving at each gateway.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// backlog1: keep-alive clients per gateway (closed loop).
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// backlog1: the upstream accepts one connection every this many ms.
    #[arg(long, default_value_t = 40)]
    accept_every_ms: u64,
    /// The upstream's time to answer a request, in ms.
    #[arg(long, default_value_t = 20)]
    service_ms: u64,
    /// Responses per upstream connection before the upstream closes it
    /// (nginx's keepalive_requests); 0: unlimited, 1: a new connection per
    /// request (default: 1 for backlog1, as in the incident; 100 for
    /// restart).
    #[arg(long)]
    keepalive_requests: Option<u64>,
    /// The provider's connect_timeout in the gateway configuration.
    #[arg(long, default_value = "500ms")]
    connect_timeout: String,
    /// The gateway binary (default: target/release/retryctl).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// The HAProxy binary for the third column (default: `haproxy` on
    /// PATH or in /usr/sbin; the column is skipped when there is none).
    #[arg(long, conflicts_with = "no_haproxy")]
    haproxy: Option<PathBuf>,
    /// Leave HAProxy's column out.
    #[arg(long)]
    no_haproxy: bool,
    /// HAProxy's `timeout connect` (default: --connect-timeout for
    /// backlog1, 5s for restart, as in Debian's haproxy.cfg).
    #[arg(long)]
    haproxy_connect_timeout: Option<String>,
}

// ---- Upstreams ------------------------------------------------------------

/// What an upstream saw.
#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    requests: AtomicU64,
}

#[derive(Clone, Copy, Debug)]
struct ConnOptions {
    service: Duration,
    keepalive_requests: u64,
}

const BODY: &str = concat!(
    r#"{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"gpt-oss-120b","#,
    r#""choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"#,
    r#""usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#
);

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Serves one connection keep-alive: each request (head and
/// `Content-Length` body) gets the chat completion after `service`; the
/// `keepalive_requests`-th response says `Connection: close` and closes.
async fn serve_conn(mut stream: TcpStream, opts: ConnOptions, counters: Arc<Counters>) {
    let _ = stream.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let mut served = 0u64;
    loop {
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 64 * 1024 {
                return;
            }
            match tokio::time::timeout(UPSTREAM_IDLE, stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            match stream.read(&mut chunk).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        }
        buf.drain(..head_end + length);
        counters.requests.fetch_add(1, Ordering::Relaxed);
        served += 1;
        if !opts.service.is_zero() {
            tokio::time::sleep(opts.service).await;
        }
        let close = opts.keepalive_requests > 0 && served >= opts.keepalive_requests;
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: {}\r\n\r\n{BODY}",
            BODY.len(),
            if close { "close" } else { "keep-alive" }
        );
        if stream.write_all(response.as_bytes()).await.is_err() || close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

fn socket(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// The accept loop: one connection every `every` (none: as fast as they
/// come), each served on its own task, all of them dropped with the loop.
async fn accept_loop(
    listener: TcpListener,
    every: Option<Duration>,
    opts: ConnOptions,
    counters: Arc<Counters>,
) {
    let mut conns = JoinSet::new();
    loop {
        if let Some(every) = every {
            tokio::time::sleep(every).await;
        }
        while conns.try_join_next().is_some() {}
        match listener.accept().await {
            Ok((stream, _)) => {
                counters.accepted.fetch_add(1, Ordering::Relaxed);
                conns.spawn(serve_conn(stream, opts, counters.clone()));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// An upstream on 127.0.0.1 that can be closed (connects refused, its
/// connections closed) and reopened on the same port.
struct Upstream {
    addr: SocketAddr,
    backlog: i32,
    every: Option<Duration>,
    opts: ConnOptions,
    counters: Arc<Counters>,
    task: Option<JoinHandle<()>>,
    /// The port while closed: bound, not listening (a connect is refused).
    parked: Option<Socket>,
}

impl Upstream {
    /// Listens with `backlog`, accepting one connection every `every`.
    fn start(backlog: i32, every: Option<Duration>, opts: ConnOptions) -> io::Result<Upstream> {
        let parked = socket(loopback())?;
        let addr = parked.local_addr()?.as_socket().expect("an IPv4 address");
        let mut upstream = Upstream {
            addr,
            backlog,
            every,
            opts,
            counters: Arc::default(),
            task: None,
            parked: Some(parked),
        };
        upstream.open()?;
        Ok(upstream)
    }

    fn open(&mut self) -> io::Result<()> {
        let Some(socket) = self.parked.take() else {
            return Ok(());
        };
        socket.listen(self.backlog)?;
        socket.set_nonblocking(true)?;
        let listener = TcpListener::from_std(socket.into())?;
        self.task = Some(tokio::spawn(accept_loop(
            listener,
            self.every,
            self.opts,
            self.counters.clone(),
        )));
        Ok(())
    }

    /// Closes the listener and every connection, as a process that exits.
    async fn close(&mut self) -> io::Result<()> {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
            self.parked = Some(socket(self.addr)?);
        }
        Ok(())
    }

    fn accepted(&self) -> u64 {
        self.counters.accepted.load(Ordering::Relaxed)
    }

    fn requests(&self) -> u64 {
        self.counters.requests.load(Ordering::Relaxed)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

// ---- Gateways -------------------------------------------------------------

/// What sits between the load and an upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `retryctl serve` with a policy.
    Retryctl(&'static str),
    /// HAProxy with `retries 3`, as a reference.
    Haproxy,
}

/// One column of the report: a name and what serves it.
#[derive(Clone, Copy, Debug)]
struct SideSpec {
    name: &'static str,
    kind: Kind,
}

const RETRIES_OFF_SIDE: SideSpec = SideSpec {
    name: "retries off",
    kind: Kind::Retryctl(RETRIES_OFF),
};
const RETRYCTL_SIDE: SideSpec = SideSpec {
    name: "retryctl",
    kind: Kind::Retryctl(SHIPPED_POLICY),
};
const HAPROXY_SIDE: SideSpec = SideSpec {
    name: "haproxy",
    kind: Kind::Haproxy,
};

struct Gateway {
    name: String,
    kind: Kind,
    child: Child,
    url: String,
    metrics_url: String,
    log: PathBuf,
}

fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind(loopback())?
        .local_addr()?
        .port())
}

fn binary(args: &Args) -> Result<PathBuf, Error> {
    let path = match &args.bin {
        Some(p) => p.clone(),
        None => {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("target")
                });
            target.join("release").join("retryctl")
        }
    };
    if !path.is_file() {
        return Err(format!(
            "{} not found: build the gateway first with `cargo build --release` (or pass --bin)",
            path.display()
        )
        .into());
    }
    Ok(path)
}

/// The HAProxy binary: `--haproxy`, else `haproxy` on `PATH` or in
/// `/usr/sbin`; `None` with `--no-haproxy` or when there is none.
fn haproxy_binary(args: &Args) -> Result<Option<PathBuf>, Error> {
    if args.no_haproxy {
        return Ok(None);
    }
    if let Some(p) = &args.haproxy {
        if !p.is_file() {
            return Err(format!("--haproxy {}: no such file", p.display()).into());
        }
        return Ok(Some(p.clone()));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    Ok(std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join("haproxy"))
        .find(|p| p.is_file()))
}

/// HAProxy in front of `upstream` as the issue describes it: HTTP mode,
/// its default `retries 3` (on a failed connect; after a refusal it waits
/// `min(timeout connect, 1 s)` before the next one, after a connect
/// timeout it retries at once), default server-side keep-alive and
/// `http-reuse safe`, one server, no health checks. Its counters come from
/// the Prometheus exporter on a second frontend.
fn haproxy_config(port: u16, metrics_port: u16, upstream: SocketAddr, connect: &str) -> String {
    format!(
        "global\n\
         \x20   log stderr format raw local0\n\
         defaults\n\
         \x20   mode http\n\
         \x20   log global\n\
         \x20   option httplog\n\
         \x20   option dontlog-normal\n\
         \x20   timeout connect {connect}\n\
         \x20   timeout client 60s\n\
         \x20   timeout server 60s\n\
         \x20   retries 3\n\
         frontend gateway\n\
         \x20   bind 127.0.0.1:{port}\n\
         \x20   default_backend upstream\n\
         frontend metrics\n\
         \x20   bind 127.0.0.1:{metrics_port}\n\
         \x20   http-request use-service prometheus-exporter if {{ path /metrics }}\n\
         backend upstream\n\
         \x20   server upstream {upstream}\n"
    )
}

impl Gateway {
    /// Starts `spec` in front of `upstream` (its configuration written to
    /// `dir`); returns once it answers.
    async fn start(
        run: &Run,
        scenario: &str,
        spec: SideSpec,
        upstream: SocketAddr,
        connect_timeout: &str,
    ) -> Result<Gateway, Error> {
        let name = format!("{scenario}-{}", spec.name.replace(' ', "-"));
        let (port, metrics_port) = (free_port()?, free_port()?);
        let dir = run.dir.path();
        let mut command = match spec.kind {
            Kind::Retryctl(policy) => {
                let policy_path = dir.join(format!("{name}-policy.toml"));
                std::fs::write(&policy_path, policy)?;
                let config = format!(
                    "listen = \"127.0.0.1:{port}\"\n\
                     metrics_listen = \"127.0.0.1:{metrics_port}\"\n\
                     policy = \"{name}-policy.toml\"\n\n\
                     [providers.upstream]\n\
                     base_url = \"http://{upstream}/v1\"\n\
                     connect_timeout = \"{connect_timeout}\"\n\n\
                     [[models]]\n\
                     name = \"{MODEL}\"\n\
                     providers = [\"upstream\"]\n"
                );
                let config_path = dir.join(format!("{name}.toml"));
                std::fs::write(&config_path, config)?;
                let mut command = Command::new(&run.bin);
                command.arg("serve").arg("--config").arg(&config_path).env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
                );
                command
            }
            Kind::Haproxy => {
                let bin = run.haproxy.as_ref().ok_or("no haproxy binary")?;
                let config_path = dir.join(format!("{name}.cfg"));
                std::fs::write(
                    &config_path,
                    haproxy_config(port, metrics_port, upstream, connect_timeout),
                )?;
                let mut command = Command::new(bin);
                // -db: in the foreground, not as a daemon.
                command.arg("-db").arg("-f").arg(&config_path);
                command
            }
        };
        std::fs::create_dir_all(&run.logs)?;
        let log = run.logs.join(format!("{name}.log"));
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()?;
        let url = format!("http://127.0.0.1:{port}");
        let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
        let ready = match spec.kind {
            Kind::Retryctl(_) => format!("{url}/healthz"),
            // Its frontend forwards everything to the upstream.
            Kind::Haproxy => metrics_url.clone(),
        };
        let mut gateway = Gateway {
            name,
            kind: spec.kind,
            child,
            url,
            metrics_url,
            log,
        };
        let client = reqwest::Client::new();
        let started = Instant::now();
        loop {
            if let Some(status) = gateway.child.try_wait()? {
                let log = std::fs::read_to_string(&gateway.log).unwrap_or_default();
                return Err(format!("{} exited ({status}):\n{log}", gateway.name).into());
            }
            let ready = client
                .get(&ready)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(gateway);
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err(format!("{} not ready after 10 s", gateway.name).into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn metrics(&self, client: &reqwest::Client) -> Result<Metrics, Error> {
        let text = client.get(&self.metrics_url).send().await?.text().await?;
        Ok(match self.kind {
            Kind::Retryctl(_) => Metrics::parse(&text),
            Kind::Haproxy => Metrics::parse_haproxy(&text),
        })
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// The counters of one `/metrics` scrape that the report needs.
#[derive(Debug, Default, Clone)]
struct Metrics {
    /// `retryctl_attempts_total` by `result`.
    attempts: BTreeMap<String, f64>,
    /// `retryctl_requests_total` of failed requests by `reason`.
    failed: BTreeMap<String, f64>,
    /// `retryctl_admission_total` by `outcome`.
    admission: BTreeMap<String, f64>,
    /// HAProxy: connects retried (`retry_warnings`).
    retries: f64,
}

fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
    let len = labels[start..].find('"')?;
    Some(&labels[start..start + len])
}

impl Metrics {
    fn parse(text: &str) -> Metrics {
        let mut m = Metrics::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let (map, key) = match name {
                "retryctl_attempts_total" => (&mut m.attempts, label(labels, "result")),
                "retryctl_requests_total" if !labels.contains("reason=\"none\"") => {
                    (&mut m.failed, label(labels, "reason"))
                }
                "retryctl_admission_total" => (&mut m.admission, label(labels, "outcome")),
                _ => continue,
            };
            if let Some(key) = key {
                *map.entry(key.to_owned()).or_default() += value;
            }
        }
        m
    }

    /// HAProxy's backend counters (Prometheus exporter) in the same
    /// terms: an attempt is a connect (`connection_attempts`, failed ones
    /// included) or a request sent on a reused connection
    /// (`connection_reuses`); a failed connect is one that was retried
    /// (`retry_warnings`) or that ended the request (`connection_errors`,
    /// a 503); a request cut on its connection is a `server_aborts` or a
    /// `response_errors` (a 502). The 5xx the frontend sent are beside
    /// them.
    fn parse_haproxy(text: &str) -> Metrics {
        let mut counters = BTreeMap::<&str, f64>::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let Some((name, labels)) = series.split_once('{') else {
                continue;
            };
            let wanted = match label(labels, "proxy") {
                Some("upstream") => name.starts_with("haproxy_backend_"),
                Some("gateway") => {
                    name == "haproxy_frontend_http_responses_total"
                        && label(labels, "code") == Some("5xx")
                }
                _ => false,
            };
            if wanted {
                *counters.entry(name).or_default() += value;
            }
        }
        let get = |name: &str| counters.get(name).copied().unwrap_or(0.0);
        let attempts = get("haproxy_backend_connection_attempts_total")
            + get("haproxy_backend_connection_reuses_total");
        let retries = get("haproxy_backend_retry_warnings_total");
        let gave_up = get("haproxy_backend_connection_errors_total");
        let cut = get("haproxy_backend_response_errors_total")
            + get("haproxy_backend_server_aborts_total");
        let mut m = Metrics {
            retries,
            ..Metrics::default()
        };
        m.attempts
            .insert("ok".into(), attempts - retries - gave_up - cut);
        m.attempts.insert("connect".into(), retries + gave_up);
        m.attempts.insert("response_error".into(), cut);
        m.failed
            .insert("connect_failed_after_retries".into(), gave_up);
        m.failed.insert("cut_in_flight".into(), cut);
        m.failed.insert(
            "(5xx sent by the frontend)".into(),
            get("haproxy_frontend_http_responses_total"),
        );
        m
    }

    fn attempts(&self) -> f64 {
        self.attempts.values().sum()
    }

    fn failed_attempt_count(&self) -> f64 {
        self.attempts
            .iter()
            .filter(|(k, _)| k.as_str() != "ok")
            .map(|(_, v)| v)
            .sum()
    }

    fn failed_attempts(&self) -> String {
        let causes: Vec<String> = self
            .attempts
            .iter()
            .filter(|(k, v)| k.as_str() != "ok" && **v > 0.0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        if causes.is_empty() {
            "-".into()
        } else {
            causes.join(", ")
        }
    }

    fn failure_reasons(&self) -> String {
        let reasons: Vec<String> = self
            .failed
            .iter()
            .filter(|(_, v)| **v > 0.0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        if reasons.is_empty() {
            "-".into()
        } else {
            reasons.join(", ")
        }
    }
}

/// The attempt results of a request the upstream never received.
const UNREACHED: [&str; 4] = ["connect_refused", "connect", "connect_timeout", "not_sent"];

// ---- Load -----------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Sample {
    latency: Duration,
    ok: bool,
    /// What a failed request got, as the client saw it.
    failure: Option<ClientFailure>,
}

/// A failed request from the client's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum ClientFailure {
    Status(u16),
    Connect,
    Timeout,
    /// The connection closed or failed with no (complete) response.
    Connection,
}

impl std::fmt::Display for ClientFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientFailure::Status(s) => write!(f, "status {s}"),
            ClientFailure::Connect => f.write_str("connect error"),
            ClientFailure::Timeout => f.write_str("timeout"),
            ClientFailure::Connection => f.write_str("connection closed, no response"),
        }
    }
}

impl ClientFailure {
    fn of(e: &reqwest::Error) -> ClientFailure {
        if e.is_connect() {
            ClientFailure::Connect
        } else if e.is_timeout() {
            ClientFailure::Timeout
        } else {
            ClientFailure::Connection
        }
    }
}

#[derive(Default)]
struct Samples(Mutex<Vec<Sample>>);

impl Samples {
    fn push(&self, s: Sample) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(s);
    }

    fn take(&self) -> Vec<Sample> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .build()
        .expect("an HTTP client")
}

async fn send(client: &reqwest::Client, url: &str) -> Sample {
    let body = format!(r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"hi"}}]}}"#);
    let started = Instant::now();
    let failure = match client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
    {
        Ok(r) if !r.status().is_success() => Some(ClientFailure::Status(r.status().as_u16())),
        Ok(r) => r.bytes().await.err().map(|e| ClientFailure::of(&e)),
        Err(e) => Some(ClientFailure::of(&e)),
    };
    Sample {
        latency: started.elapsed(),
        ok: failure.is_none(),
        failure,
    }
}

/// `clients` tasks sending one request after another until `end`.
fn closed_loop(url: String, clients: usize, end: Instant, samples: Arc<Samples>) -> JoinSet<()> {
    let http = client();
    let url = format!("{url}/v1/chat/completions");
    let mut set = JoinSet::new();
    for _ in 0..clients {
        let (http, url, samples) = (http.clone(), url.clone(), samples.clone());
        set.spawn(async move {
            while Instant::now() < end {
                samples.push(send(&http, &url).await);
            }
        });
    }
    set
}

/// `rate` requests per second until `end`, each on its own task.
fn open_loop(url: String, rate: u32, end: Instant, samples: Arc<Samples>) -> JoinHandle<()> {
    let http = client();
    let url = format!("{url}/v1/chat/completions");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
        let mut set = JoinSet::new();
        loop {
            let at = tick.tick().await;
            if at >= end {
                break;
            }
            let (http, url, samples) = (http.clone(), url.clone(), samples.clone());
            set.spawn(async move { samples.push(send(&http, &url).await) });
            while set.try_join_next().is_some() {}
        }
        while set.join_next().await.is_some() {}
    })
}

// ---- Report ---------------------------------------------------------------

struct Side {
    name: &'static str,
    kind: Kind,
    samples: Vec<Sample>,
    metrics: Metrics,
    accepted: u64,
    received: u64,
    /// restart: gateway attempts that ended during the outages, by result.
    outage: Option<BTreeMap<String, f64>>,
}

impl Side {
    fn requests(&self) -> usize {
        self.samples.len()
    }

    fn failed(&self) -> usize {
        self.samples.iter().filter(|s| !s.ok).count()
    }

    fn rate(&self) -> f64 {
        self.failed() as f64 / self.requests().max(1) as f64
    }

    fn latency(&self, q: f64) -> Duration {
        let mut l: Vec<Duration> = self.samples.iter().map(|s| s.latency).collect();
        l.sort();
        if l.is_empty() {
            return Duration::ZERO;
        }
        l[((l.len() - 1) as f64 * q).round() as usize]
    }

    fn outage_all(&self) -> f64 {
        self.outage.iter().flat_map(|o| o.values()).sum()
    }

    /// Attempts during the outages that the upstream never received.
    fn outage_connects(&self) -> f64 {
        self.outage
            .iter()
            .flat_map(|o| o.iter())
            .filter(|(k, _)| UNREACHED.contains(&k.as_str()))
            .map(|(_, v)| v)
            .sum()
    }

    /// Failed admission probes: all of them fall in the outages.
    fn probes_failed(&self) -> f64 {
        self.metrics
            .admission
            .get("probe_failed")
            .copied()
            .unwrap_or(0.0)
    }

    fn is_haproxy(&self) -> bool {
        self.kind == Kind::Haproxy
    }

    /// Gateway attempts beyond one per request.
    fn extra(&self) -> f64 {
        self.metrics.attempts() / self.requests().max(1) as f64 - 1.0
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn pct(x: f64) -> String {
    format!("{:+.1}%", x * 100.0)
}

fn row(label: &str, cells: &[String]) {
    print!("{label:<48}");
    for c in cells {
        print!("{c:>14}");
    }
    println!();
}

fn absorbed(base: &Side, side: &Side) -> f64 {
    let b = base.failed() as f64;
    if b == 0.0 {
        return f64::NAN;
    }
    (b - side.failed() as f64) / b
}

fn print_table(sides: &[Side], outages: Option<(usize, f64)>) -> (f64, f64) {
    let names: Vec<String> = sides.iter().map(|s| s.name.to_owned()).collect();
    row("", &names);
    let cells = |f: &dyn Fn(&Side) -> String| sides.iter().map(f).collect::<Vec<_>>();
    row("requests", &cells(&|s| s.requests().to_string()));
    row(
        "failed (non-2xx or error)",
        &cells(&|s| s.failed().to_string()),
    );
    row(
        "failure rate",
        &cells(&|s| format!("{:.2}%", s.rate() * 100.0)),
    );
    let base = &sides[0];
    row(
        "absorbed: (base failed - failed) / base failed",
        &cells(&|s| {
            if std::ptr::eq(s, base) || base.failed() == 0 {
                "-".into()
            } else {
                format!("{:.1}%", absorbed(base, s) * 100.0)
            }
        }),
    );
    row(
        "absorbed, by failure rate",
        &cells(&|s| {
            if std::ptr::eq(s, base) || base.rate() == 0.0 {
                "-".into()
            } else {
                format!("{:.1}%", (1.0 - s.rate() / base.rate()) * 100.0)
            }
        }),
    );
    row(
        "upstream attempts (the proxy's own count)",
        &cells(&|s| format!("{}", s.metrics.attempts())),
    );
    row(
        "  of which failed",
        &cells(&|s| format!("{}", s.metrics.failed_attempt_count())),
    );
    row("extra attempts per request", &cells(&|s| pct(s.extra())));
    row(
        "upstream: requests received",
        &cells(&|s| s.received.to_string()),
    );
    row(
        "upstream: connections accepted",
        &cells(&|s| s.accepted.to_string()),
    );
    if let Some((n, intervals)) = outages {
        let n = n.max(1) as f64;
        row(
            "attempts ended during the outages",
            &cells(&|s| format!("{}", s.outage_all())),
        );
        row(
            "  cut in flight by the restart (reset)",
            &cells(&|s| format!("{}", s.outage_all() - s.outage_connects())),
        );
        row(
            "  connects to the closed port",
            &cells(&|s| format!("{}", s.outage_connects())),
        );
        let not_haproxy = |f: &dyn Fn(&Side) -> String| {
            cells(&|s| if s.is_haproxy() { "-".into() } else { f(s) })
        };
        row(
            "  of which failed probes (one per interval)",
            &not_haproxy(&|s| format!("{}", s.probes_failed())),
        );
        row(
            "  sent before the first refusal was seen",
            &not_haproxy(&|s| format!("{}", s.outage_connects() - s.probes_failed())),
        );
        row(
            "connects per outage",
            &cells(&|s| format!("{:.1}", s.outage_connects() / n)),
        );
        row(
            &format!("connects per probe interval ({intervals:.0} per outage)"),
            &cells(&|s| format!("{:.2}", s.outage_connects() / n / intervals)),
        );
    }
    row("latency p50", &cells(&|s| ms(s.latency(0.5))));
    row("latency p99", &cells(&|s| ms(s.latency(0.99))));
    row("latency max", &cells(&|s| ms(s.latency(1.0))));
    println!();
    for s in sides {
        let mut seen = BTreeMap::<ClientFailure, usize>::new();
        for f in s.samples.iter().filter_map(|x| x.failure) {
            *seen.entry(f).or_default() += 1;
        }
        if !seen.is_empty() {
            let seen: Vec<String> = seen.iter().map(|(f, n)| format!("{f} {n}")).collect();
            println!(
                "{}: failed requests as the client saw them: {}",
                s.name,
                seen.join(", ")
            );
        }
        println!(
            "{}: failed attempts: {}",
            s.name,
            s.metrics.failed_attempts()
        );
        println!(
            "{}: failed requests by reason: {}",
            s.name,
            s.metrics.failure_reasons()
        );
        if s.is_haproxy() {
            println!(
                "{}: connects retried (retries 3): {}",
                s.name, s.metrics.retries
            );
        }
        let adm: Vec<String> = s
            .metrics
            .admission
            .iter()
            .filter(|(_, v)| **v > 0.0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        if !adm.is_empty() {
            println!("{}: admission: {}", s.name, adm.join(", "));
        }
    }
    let last = &sides[1];
    (absorbed(base, last), last.extra())
}

// ---- Scenarios ------------------------------------------------------------

struct Run {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// The HAProxy binary, when its column is on.
    haproxy: Option<PathBuf>,
    logs: PathBuf,
    scrape: reqwest::Client,
}

impl Run {
    /// The columns: retries off, retryctl, and HAProxy when it is on.
    fn sides(&self) -> Vec<SideSpec> {
        let mut sides = vec![RETRIES_OFF_SIDE, RETRYCTL_SIDE];
        if self.haproxy.is_some() {
            sides.push(HAPROXY_SIDE);
        }
        sides
    }
}

/// The probe intervals of an outage of `outage` under the shipped policy:
/// the first refused connect marks the provider down, then one probe after
/// probe_delay, doubling up to probe_max_delay (100 ms doubling to 1 s:
/// 0, 0.1, 0.3, 0.7, 1.5 and 2.5 s into a 3 s outage, 6 intervals).
fn probe_intervals(outage: Duration) -> Result<f64, Error> {
    let policy = retryctl::policy::Policy::from_toml(SHIPPED_POLICY)?;
    let (mut at, mut wait, mut n) = (Duration::ZERO, policy.admission.probe_delay, 1u32);
    loop {
        at += wait;
        if at > outage {
            break;
        }
        n += 1;
        wait = (wait * 2).min(policy.admission.probe_max_delay);
    }
    Ok(f64::from(n))
}

/// Starts one upstream (`upstream()`) and one proxy in front of it per
/// side.
async fn start_sides(
    run: &Run,
    scenario: &str,
    mut upstream: impl FnMut() -> io::Result<Upstream>,
    connect_timeout: &str,
    haproxy_connect_timeout: &str,
) -> Result<(Vec<Upstream>, Vec<Gateway>), Error> {
    let mut upstreams = Vec::new();
    let mut gateways = Vec::new();
    for spec in run.sides() {
        let u = upstream()?;
        let connect = match spec.kind {
            Kind::Retryctl(_) => connect_timeout,
            Kind::Haproxy => haproxy_connect_timeout,
        };
        gateways.push(Gateway::start(run, scenario, spec, u.addr, connect).await?);
        upstreams.push(u);
    }
    Ok((upstreams, gateways))
}

/// retryctl's column against HAProxy's, when HAProxy ran.
fn versus_haproxy(sides: &[Side], outages: Option<(usize, f64)>) {
    let (Some(ours), Some(theirs)) = (
        sides.iter().find(|s| s.name == RETRYCTL_SIDE.name),
        sides.iter().find(|s| s.is_haproxy()),
    ) else {
        return;
    };
    let base = &sides[0];
    let verdict = |ours: f64, theirs: f64, higher_wins: bool| {
        let wins = if higher_wins {
            ours > theirs
        } else {
            ours < theirs
        };
        if ours == theirs {
            "tie"
        } else if wins {
            "retryctl ahead"
        } else {
            "HAProxy ahead"
        }
    };
    println!("retryctl vs haproxy (same run, same load, identical upstreams):");
    let (a, b) = (ours.failed() as f64, theirs.failed() as f64);
    println!(
        "  failed requests: {a} vs {b}; absorbed {:.2}% vs {:.2}%: {}",
        absorbed(base, ours) * 100.0,
        absorbed(base, theirs) * 100.0,
        verdict(a, b, false)
    );
    let (a, b) = (ours.extra(), theirs.extra());
    println!(
        "  extra upstream attempts per request: {} vs {}: {}",
        pct(a),
        pct(b),
        verdict(a, b, false)
    );
    if let Some((n, intervals)) = outages {
        let per = |s: &Side| s.outage_connects() / n.max(1) as f64 / intervals;
        let (a, b) = (per(ours), per(theirs));
        println!(
            "  connects to the closed port per probe interval: {a:.2} vs {b:.2}: {}",
            verdict(a, b, false)
        );
    }
    for (q, label) in [(0.5, "p50"), (0.99, "p99")] {
        let (a, b) = (ours.latency(q), theirs.latency(q));
        println!(
            "  latency {label}: {} vs {}: {}",
            ms(a),
            ms(b),
            verdict(a.as_secs_f64(), b.as_secs_f64(), false)
        );
    }
}

async fn backlog1(run: &Run, args: &Args) -> Result<bool, Error> {
    let seconds = args.seconds.unwrap_or(30);
    let opts = ConnOptions {
        service: Duration::from_millis(args.service_ms),
        keepalive_requests: args.keepalive_requests.unwrap_or(1),
    };
    let every = Duration::from_millis(args.accept_every_ms);
    let haproxy_connect = args
        .haproxy_connect_timeout
        .as_deref()
        .unwrap_or(&args.connect_timeout);
    let (upstreams, gateways) = start_sides(
        run,
        "backlog1",
        || Upstream::start(1, Some(every), opts),
        &args.connect_timeout,
        haproxy_connect,
    )
    .await?;
    println!(
        "\nbacklog1 through `retryctl serve`: {seconds} s, {} keep-alive clients per gateway (closed loop)",
        args.clients
    );
    println!(
        "upstream: listen(1), one accept every {} ms, {} ms per response, {}; provider connect_timeout {}",
        args.accept_every_ms,
        args.service_ms,
        keepalive(opts.keepalive_requests),
        args.connect_timeout
    );
    if run.haproxy.is_some() {
        println!("haproxy: retries 3, timeout connect {haproxy_connect}");
    }
    println!();
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut loads = Vec::new();
    for gw in &gateways {
        let samples = Arc::new(Samples::default());
        let set = closed_loop(gw.url.clone(), args.clients, end, samples.clone());
        loads.push((set, samples));
    }
    let mut sides = Vec::new();
    for ((mut set, samples), spec) in loads.into_iter().zip(run.sides()) {
        while set.join_next().await.is_some() {}
        sides.push((spec, samples));
    }
    let sides = collect(run, sides, &gateways, &upstreams, None).await?;
    let (absorbed, extra) = print_table(&sides, None);
    for gw in gateways {
        println!("{} log: {}", gw.name, gw.log.display());
        gw.stop().await;
    }
    if absorbed.is_nan() {
        println!("target: not applicable, the baseline failed no request (nothing to absorb)");
        return Ok(true);
    }
    let met = absorbed >= 0.95 && extra <= 0.10;
    println!(
        "target >= 95% absorbed, <= 10% extra attempts: {:.1}% absorbed, {} extra: {}",
        absorbed * 100.0,
        pct(extra),
        if met { "met" } else { "MISSED" }
    );
    versus_haproxy(&sides, None);
    Ok(met)
}

fn keepalive(n: u64) -> String {
    match n {
        0 => "keep-alive".into(),
        1 => "a new connection per request".into(),
        n => format!("keep-alive, {n} requests per connection"),
    }
}

async fn collect(
    run: &Run,
    sides: Vec<(SideSpec, Arc<Samples>)>,
    gateways: &[Gateway],
    upstreams: &[Upstream],
    outage: Option<Vec<BTreeMap<String, f64>>>,
) -> Result<Vec<Side>, Error> {
    let mut out = Vec::new();
    for (i, (spec, samples)) in sides.into_iter().enumerate() {
        out.push(Side {
            name: spec.name,
            kind: spec.kind,
            samples: samples.take(),
            metrics: gateways[i].metrics(&run.scrape).await?,
            accepted: upstreams[i].accepted(),
            received: upstreams[i].requests(),
            outage: outage.as_ref().map(|o| o[i].clone()),
        });
    }
    Ok(out)
}

async fn restart(run: &Run, args: &Args) -> Result<bool, Error> {
    let seconds = args.seconds.unwrap_or(40);
    let opts = ConnOptions {
        service: Duration::from_millis(args.service_ms),
        keepalive_requests: args.keepalive_requests.unwrap_or(100),
    };
    let haproxy_connect = args
        .haproxy_connect_timeout
        .as_deref()
        .unwrap_or(HAPROXY_RESTART_CONNECT_TIMEOUT);
    let (mut upstreams, gateways) = start_sides(
        run,
        "restart",
        || Upstream::start(1024, None, opts),
        &args.connect_timeout,
        haproxy_connect,
    )
    .await?;
    let intervals = probe_intervals(OUTAGE)?;
    println!(
        "\nrestart through `retryctl serve`: {seconds} s, {} requests/s arriving at each gateway (open loop)",
        args.rate
    );
    println!(
        "upstream: port closed for {} s every {} s (first at {} s), {} ms per response, {}; provider connect_timeout {}",
        OUTAGE.as_secs(),
        PERIOD.as_secs(),
        FIRST_OUTAGE.as_secs(),
        args.service_ms,
        keepalive(opts.keepalive_requests),
        args.connect_timeout
    );
    if run.haproxy.is_some() {
        println!(
            "haproxy: retries 3, timeout connect {haproxy_connect} (a refused connect is retried after min(timeout connect, 1 s))"
        );
    }
    println!();
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut loads = Vec::new();
    for gw in &gateways {
        let samples = Arc::new(Samples::default());
        loads.push((
            open_loop(gw.url.clone(), args.rate, end, samples.clone()),
            samples,
        ));
    }
    let mut during = vec![BTreeMap::<String, f64>::new(); gateways.len()];
    let mut outages = 0;
    let mut at = FIRST_OUTAGE;
    while start + at + OUTAGE <= end {
        tokio::time::sleep_until(start + at).await;
        let mut before = Vec::new();
        for gw in &gateways {
            before.push(gw.metrics(&run.scrape).await?.attempts);
        }
        for u in &mut upstreams {
            u.close().await?;
        }
        tokio::time::sleep_until(start + at + OUTAGE).await;
        for (i, gw) in gateways.iter().enumerate() {
            for (result, n) in gw.metrics(&run.scrape).await?.attempts {
                let was = before[i].get(&result).copied().unwrap_or(0.0);
                *during[i].entry(result).or_default() += n - was;
            }
        }
        for u in &mut upstreams {
            u.open()?;
        }
        outages += 1;
        at += PERIOD;
    }
    let mut sides = Vec::new();
    for ((task, samples), spec) in loads.into_iter().zip(run.sides()) {
        task.await?;
        sides.push((spec, samples));
    }
    let sides = collect(run, sides, &gateways, &upstreams, Some(during)).await?;
    let (absorbed, _) = print_table(&sides, Some((outages, intervals)));
    let per_interval = sides[1].outage_connects() / outages.max(1) as f64 / intervals;
    for gw in gateways {
        println!("{} log: {}", gw.name, gw.log.display());
        gw.stop().await;
    }
    // Attempts already under way when the upstream went away fail before
    // any gate can know it is down (their pooled connection is closed; the
    // client re-sends once on a new one, which is refused). Every other
    // failed connect of an outage is a probe: the rule the gate controls.
    let probes = sides[1].probes_failed() / outages.max(1) as f64 / (intervals - 1.0).max(1.0);
    let edge =
        (sides[1].outage_connects() - sides[1].probes_failed()).max(0.0) / outages.max(1) as f64;
    let met = absorbed >= 0.999 && probes <= 1.0;
    println!(
        "target >= 99.9% absorbed, <= 1 connect per probe interval once the gate has seen the outage: {:.2}% absorbed, {probes:.2} per interval: {}",
        absorbed * 100.0,
        if met { "met" } else { "MISSED" }
    );
    println!(
        "  all connects during outages: {per_interval:.2} per probe interval, of which {edge:.2} per outage were attempts in flight when the upstream went away"
    );
    versus_haproxy(&sides, Some((outages, intervals)));
    Ok(met)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Error> {
    let args = Args::parse();
    let haproxy = haproxy_binary(&args)?;
    let run = Run {
        dir: tempfile::tempdir()?,
        bin: binary(&args)?,
        haproxy,
        logs: Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
            .join("target/serve-scenarios"),
        scrape: reqwest::Client::new(),
    };
    println!(
        "gateway: {} ({} logical CPUs)",
        run.bin.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    match (&run.haproxy, args.no_haproxy) {
        (Some(h), _) => println!("haproxy: {}", h.display()),
        (None, true) => println!("haproxy: off (--no-haproxy)"),
        (None, false) => println!(
            "haproxy: not found on PATH or in /usr/sbin: its column is skipped \
             (install HAProxy 2.6+, or pass --haproxy PATH)"
        ),
    }
    let mut met = true;
    if matches!(args.scenario, Scenario::Backlog1 | Scenario::All) {
        met &= backlog1(&run, &args).await?;
    }
    if matches!(args.scenario, Scenario::Restart | Scenario::All) {
        met &= restart(&run, &args).await?;
    }
    if !met {
        println!("\nsome targets were missed (see above)");
    }
    Ok(())
}
