//! Two upstream faults measured through `retryctl serve`, with retries off
//! and with the shipped policy, side by side in one run.
//!
//! ```sh
//! cargo build --release                                   # the gateway binary
//! cargo run --release --example serve_scenarios -- backlog1
//! cargo run --release --example serve_scenarios -- restart
//! cargo run --release --example serve_scenarios -- all
//! ```
//!
//! Each gateway is its own `target/release/retryctl serve` process in front
//! of its own upstream, started here on loopback; the two upstreams are
//! identical and follow one clock. The load comes from this process.
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
//!   arrive at each gateway (open loop). Target: >= 99.9% absorbed, and
//!   attempts during an outage <= one per probe interval of `[admission]`.
//!
//! "Retries off" is `max_rounds = 1` with `[admission] enabled = false`;
//! "retryctl" is `config/policy.toml` as shipped. Upstream attempts are the
//! gateway's own count (`retryctl_attempts_total`, every result, failed
//! connects included) read from its `/metrics`, beside what the upstream
//! saw (connections accepted, requests received). Gateway logs go to
//! `target/serve-scenarios/` (warnings and up; `RUST_LOG` overrides).

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

struct Gateway {
    name: &'static str,
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

impl Gateway {
    /// Writes the configuration and policy to `dir` and starts
    /// `retryctl serve` in front of `upstream`; returns once `/healthz`
    /// answers.
    async fn start(
        bin: &Path,
        dir: &Path,
        logs: &Path,
        name: &'static str,
        policy: &str,
        upstream: SocketAddr,
        connect_timeout: &str,
    ) -> Result<Gateway, Error> {
        let (port, metrics_port) = (free_port()?, free_port()?);
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
        std::fs::create_dir_all(logs)?;
        let log = logs.join(format!("{name}.log"));
        let child = Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()?;
        let mut gateway = Gateway {
            name,
            child,
            url: format!("http://127.0.0.1:{port}"),
            metrics_url: format!("http://127.0.0.1:{metrics_port}/metrics"),
            log,
        };
        let client = reqwest::Client::new();
        let started = Instant::now();
        loop {
            if let Some(status) = gateway.child.try_wait()? {
                let log = std::fs::read_to_string(&gateway.log).unwrap_or_default();
                return Err(format!("gateway {name} exited ({status}):\n{log}").into());
            }
            let ready = client
                .get(format!("{}/healthz", gateway.url))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(gateway);
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err(format!("gateway {name} not ready after 10 s").into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn metrics(&self, client: &reqwest::Client) -> Result<Metrics, Error> {
        let text = client.get(&self.metrics_url).send().await?.text().await?;
        Ok(Metrics::parse(&text))
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

    fn attempts(&self) -> f64 {
        self.attempts.values().sum()
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
    let ok = match client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
    {
        Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
        Err(_) => false,
    };
    Sample {
        latency: started.elapsed(),
        ok,
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
        "upstream attempts (gateway's count)",
        &cells(&|s| format!("{}", s.metrics.attempts())),
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
        row(
            "  of which failed probes (one per interval)",
            &cells(&|s| format!("{}", s.probes_failed())),
        );
        row(
            "  sent before the first refusal was seen",
            &cells(&|s| format!("{}", s.outage_connects() - s.probes_failed())),
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
    logs: PathBuf,
    scrape: reqwest::Client,
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

const SIDES: [(&str, &str); 2] = [("retries off", RETRIES_OFF), ("retryctl", SHIPPED_POLICY)];

async fn backlog1(run: &Run, args: &Args) -> Result<bool, Error> {
    let seconds = args.seconds.unwrap_or(30);
    let opts = ConnOptions {
        service: Duration::from_millis(args.service_ms),
        keepalive_requests: args.keepalive_requests.unwrap_or(1),
    };
    let every = Duration::from_millis(args.accept_every_ms);
    let mut upstreams = Vec::new();
    let mut gateways = Vec::new();
    for (name, policy) in SIDES {
        let upstream = Upstream::start(1, Some(every), opts)?;
        let gw = Gateway::start(
            &run.bin,
            run.dir.path(),
            &run.logs,
            gw_name("backlog1", name),
            policy,
            upstream.addr,
            &args.connect_timeout,
        )
        .await?;
        upstreams.push(upstream);
        gateways.push(gw);
    }
    println!(
        "\nbacklog1 through `retryctl serve`: {seconds} s, {} keep-alive clients per gateway (closed loop)",
        args.clients
    );
    println!(
        "upstream: listen(1), one accept every {} ms, {} ms per response, {}; provider connect_timeout {}\n",
        args.accept_every_ms,
        args.service_ms,
        keepalive(opts.keepalive_requests),
        args.connect_timeout
    );
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut loads = Vec::new();
    for gw in &gateways {
        let samples = Arc::new(Samples::default());
        let set = closed_loop(gw.url.clone(), args.clients, end, samples.clone());
        loads.push((set, samples));
    }
    let mut sides = Vec::new();
    for ((mut set, samples), (name, _)) in loads.into_iter().zip(SIDES) {
        while set.join_next().await.is_some() {}
        sides.push((name, samples));
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
    Ok(met)
}

fn gw_name(scenario: &str, side: &str) -> &'static str {
    match (scenario, side) {
        ("backlog1", "retries off") => "backlog1-off",
        ("backlog1", _) => "backlog1-retryctl",
        (_, "retries off") => "restart-off",
        _ => "restart-retryctl",
    }
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
    sides: Vec<(&'static str, Arc<Samples>)>,
    gateways: &[Gateway],
    upstreams: &[Upstream],
    outage: Option<Vec<BTreeMap<String, f64>>>,
) -> Result<Vec<Side>, Error> {
    let mut out = Vec::new();
    for (i, (name, samples)) in sides.into_iter().enumerate() {
        out.push(Side {
            name,
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
    let mut upstreams = Vec::new();
    let mut gateways = Vec::new();
    for (name, policy) in SIDES {
        let upstream = Upstream::start(1024, None, opts)?;
        let gw = Gateway::start(
            &run.bin,
            run.dir.path(),
            &run.logs,
            gw_name("restart", name),
            policy,
            upstream.addr,
            &args.connect_timeout,
        )
        .await?;
        upstreams.push(upstream);
        gateways.push(gw);
    }
    let intervals = probe_intervals(OUTAGE)?;
    println!(
        "\nrestart through `retryctl serve`: {seconds} s, {} requests/s arriving at each gateway (open loop)",
        args.rate
    );
    println!(
        "upstream: port closed for {} s every {} s (first at {} s), {} ms per response, {}; provider connect_timeout {}\n",
        OUTAGE.as_secs(),
        PERIOD.as_secs(),
        FIRST_OUTAGE.as_secs(),
        args.service_ms,
        keepalive(opts.keepalive_requests),
        args.connect_timeout
    );
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
    for ((task, samples), (name, _)) in loads.into_iter().zip(SIDES) {
        task.await?;
        sides.push((name, samples));
    }
    let sides = collect(run, sides, &gateways, &upstreams, Some(during)).await?;
    let (absorbed, _) = print_table(&sides, Some((outages, intervals)));
    let per_interval = sides[1].outage_connects() / outages.max(1) as f64 / intervals;
    for gw in gateways {
        println!("{} log: {}", gw.name, gw.log.display());
        gw.stop().await;
    }
    let probes = sides[1].probes_failed() / outages.max(1) as f64 / (intervals - 1.0).max(1.0);
    let met = absorbed >= 0.999 && per_interval <= 1.0;
    println!(
        "target >= 99.9% absorbed, <= 1 connect per probe interval during outages: {:.2}% absorbed, {per_interval:.2} per interval: {}",
        absorbed * 100.0,
        if met { "met" } else { "MISSED" }
    );
    println!(
        "  once the gate had seen the first refusal: {probes:.2} probe per probe interval after it"
    );
    Ok(met)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Error> {
    let args = Args::parse();
    let run = Run {
        dir: tempfile::tempdir()?,
        bin: binary(&args)?,
        logs: Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
            .join("target/serve-scenarios"),
        scrape: reqwest::Client::new(),
    };
    println!(
        "gateway: {} ({} logical CPUs)",
        run.bin.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
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
