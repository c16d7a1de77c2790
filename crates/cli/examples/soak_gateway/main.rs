//! The gateway soak: `retryctl serve` (the release binary) in front of
//! real nginx upstreams on loopback, at thousands of requests per second,
//! while nginx is reloaded and restarted on a seeded schedule and the
//! policy file is rewritten every second.
//!
//! ```sh
//! cargo build --release -p retryctl-cli     # the gateway binary
//! cargo run --release -p retryctl-cli --example soak_gateway -- --secs 60
//! RETRYCTL_SOAK_GATEWAY_SECS=600 bash .ci/soak-gateway   # the 10-minute run
//! ```
//!
//! * **Upstreams**: two nginx masters (`a`, `b`), each its own process
//!   with its own prefix under `target/soak-gateway/`, answering a fixed
//!   JSON completion under `/json/` and a fixed event stream under
//!   `/sse/` (see `nginx.rs`). The gateway has four providers (`json-a`,
//!   `json-b`, `sse-a`, `sse-b`) and two models, `soak-json` and
//!   `soak-sse`, each served by both instances.
//! * **Faults** (`faults.rs`): each instance is reloaded (`nginx -s
//!   reload`) every 100-500 ms and restarted (`-s stop` or `-s quit`, a
//!   closed port for 0.2-1.5 s, started again on the same port) about
//!   three times a minute, never both at once; every fault is recorded as
//!   a window.
//! * **Policy** (`policy.rs`): the file the gateway follows is replaced
//!   every second, alternately by a new valid version and an invalid one.
//! * **Load** (`load.rs`): keep-alive clients at a fixed rate (2,500/s by
//!   default), half JSON and half streamed completions, one request in ten
//!   for one of 10,000 unknown model names; every answer is read to its
//!   end and compared with what nginx sent.
//!
//! It prints a report (`report.rs`) and exits non-zero unless every
//! request was answered, every failure falls in a fault window of the
//! providers it names, unknown models got 404 and no metric series, the
//! reloads were counted, the rate was reached, and the gateway's memory,
//! file descriptors and threads stayed flat after warm-up.

mod faults;
mod gateway;
mod load;
mod nginx;
mod policy;
mod report;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;
use tokio::time::Instant;

use crate::faults::{FaultOptions, Windows};
use crate::gateway::{Gateway, Process};
use crate::load::LoadOptions;
use crate::nginx::Nginx;
use crate::report::{ProcessFigures, Run};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Names of the nginx instances (and the suffix of their providers).
const INSTANCES: [&str; 4] = ["a", "b", "c", "d"];
/// Warm-up and end figures are medians over this many one-second samples.
const MEDIAN_OF: usize = 5;

#[derive(Parser, Debug)]
#[command(
    about = "retryctl serve in front of real nginx under reloads, restarts and policy rewrites"
)]
struct Args {
    /// How long the load runs, in seconds.
    #[arg(long, default_value_t = 60)]
    secs: u64,
    /// Warm-up before the first figures, in seconds (default: a tenth of
    /// the run, 10 to 30 s).
    #[arg(long)]
    warmup: Option<u64>,
    /// Requests per second sent.
    #[arg(long, default_value_t = 2500.0)]
    rate: f64,
    /// The run fails below this many answered requests per second.
    #[arg(long, default_value_t = 2000.0)]
    min_rate: f64,
    /// Keep-alive clients, each with one request at a time.
    #[arg(long, default_value_t = 128)]
    workers: usize,
    /// Seed of the fault schedule and of the request mix.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// nginx instances (2 to 4).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(2..=4))]
    upstreams: u8,
    /// Reloads of each instance come this many ms apart, at least...
    #[arg(long, default_value_t = 100)]
    reload_min_ms: u64,
    /// ...and at most.
    #[arg(long, default_value_t = 500)]
    reload_max_ms: u64,
    /// Each instance is restarted about once per this many seconds.
    #[arg(long, default_value_t = 20)]
    restart_every: u64,
    /// A restart keeps the port closed this many ms, at least...
    #[arg(long, default_value_t = 200)]
    gap_min_ms: u64,
    /// ...and at most.
    #[arg(long, default_value_t = 1500)]
    gap_max_ms: u64,
    /// Share of requests for unknown models.
    #[arg(long, default_value_t = 0.1)]
    unknown_share: f64,
    /// Share of the other requests that stream.
    #[arg(long, default_value_t = 0.5)]
    stream_share: f64,
    /// A request without its complete answer after this many seconds is
    /// counted as a hang.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// The gateway binary (default: target/release/retryctl).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// The nginx binary.
    #[arg(long, default_value = nginx::DEFAULT_BINARY)]
    nginx: PathBuf,
}

fn workspace() -> PathBuf {
    let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

fn gateway_binary(args: &Args) -> Result<PathBuf, Error> {
    let path = args
        .bin
        .clone()
        .unwrap_or_else(|| target_dir().join("release/retryctl"));
    if !path.is_file() {
        return Err(format!(
            "{} not found: build it first with `cargo build --release -p retryctl-cli` (or pass --bin)",
            path.display()
        )
        .into());
    }
    Ok(path)
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The nginx instances, each on a free port with its own prefix.
async fn start_upstreams(args: &Args, dir: &Path) -> Result<Vec<Nginx>, Error> {
    let mut upstreams = Vec::new();
    for name in INSTANCES.iter().take(usize::from(args.upstreams)) {
        let addr = loopback(gateway::free_port()?);
        let prefix = dir.join(format!("nginx-{name}"));
        upstreams.push(Nginx::start(name, &args.nginx, prefix, addr).await?);
    }
    Ok(upstreams)
}

/// One sample a second of the gateway's process (and its task count, if
/// `/metrics` has it) until `end`.
async fn monitor(
    gateway: Arc<tokio::sync::Mutex<Gateway>>,
    epoch: Instant,
    end: Instant,
) -> Result<Vec<(Duration, Process, Option<f64>)>, Error> {
    let scrape = reqwest::Client::new();
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        if now >= end {
            return Ok(samples);
        }
        let mut gw = gateway.lock().await;
        if !gw.alive() {
            return Err("the gateway process exited during the soak".into());
        }
        let process = gw.process()?;
        let tasks = gw.metrics(&scrape).await.ok().and_then(|m| m.tasks);
        drop(gw);
        samples.push((now.saturating_duration_since(epoch), process, tasks));
    }
}

fn median(mut xs: Vec<u64>) -> u64 {
    xs.sort_unstable();
    xs.get(xs.len() / 2).copied().unwrap_or(0)
}

/// The median of each figure over the last [`MEDIAN_OF`] samples taken
/// before `until`.
fn settled(
    samples: &[(Duration, Process, Option<f64>)],
    until: Duration,
) -> (Process, Option<u64>) {
    let window: Vec<_> = samples.iter().filter(|(at, ..)| *at <= until).collect();
    let window = &window[window.len().saturating_sub(MEDIAN_OF)..];
    let pick = |f: fn(&Process) -> u64| median(window.iter().map(|(_, p, _)| f(p)).collect());
    let tasks: Vec<u64> = window
        .iter()
        .filter_map(|(.., t)| t.map(|t| t as u64))
        .collect();
    let process = Process {
        rss: pick(|p| p.rss),
        fds: pick(|p| p.fds),
        threads: pick(|p| p.threads),
    };
    (process, (!tasks.is_empty()).then(|| median(tasks)))
}

fn peak(samples: &[(Duration, Process, Option<f64>)]) -> Process {
    let max = |f: fn(&Process) -> u64| samples.iter().map(|(_, p, _)| f(p)).max().unwrap_or(0);
    Process {
        rss: max(|p| p.rss),
        fds: max(|p| p.fds),
        threads: max(|p| p.threads),
    }
}

async fn soak(args: Args) -> Result<bool, Error> {
    let bin = gateway_binary(&args)?;
    let version = nginx::check(&args.nginx).map_err(|e| {
        format!(
            "{}: {e} (install nginx, or pass --nginx)",
            args.nginx.display()
        )
    })?;
    if args.secs < 10 {
        return Err("--secs must be at least 10 (warm-up and end figures need samples)".into());
    }
    let secs = Duration::from_secs(args.secs);
    let warmup = Duration::from_secs(args.warmup.unwrap_or((args.secs / 10).clamp(10, 30)));
    if warmup + Duration::from_secs(MEDIAN_OF as u64) > secs {
        return Err("the warm-up leaves no time to measure: raise --secs or lower --warmup".into());
    }
    let dir = target_dir().join("soak-gateway");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    println!(
        "gateway: {}; {version}; {} logical CPUs; files in {}",
        bin.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        dir.display()
    );

    let upstreams = start_upstreams(&args, &dir).await?;
    let mut providers = BTreeMap::new();
    for (i, n) in upstreams.iter().enumerate() {
        providers.insert(format!("json-{}", n.name), i);
        providers.insert(format!("sse-{}", n.name), i);
    }
    let policy_path = dir.join("policy.toml");
    policy::write(&policy_path, 0)?;
    let (listen, metrics) = (
        loopback(gateway::free_port()?),
        loopback(gateway::free_port()?),
    );
    let config_path = dir.join("gateway.toml");
    std::fs::write(
        &config_path,
        gateway::config_text(listen, metrics, &policy_path, &upstreams),
    )?;
    let gw = Gateway::start(&bin, &config_path, listen, metrics, dir.join("gateway.log")).await?;
    let url = gw.url.clone();
    let idle_start = gw.process()?;
    let gw = Arc::new(tokio::sync::Mutex::new(gw));

    let epoch = Instant::now() + Duration::from_millis(100);
    let end = epoch + secs;
    let options = FaultOptions {
        reload_every: (
            Duration::from_millis(args.reload_min_ms),
            Duration::from_millis(args.reload_max_ms),
        ),
        restart_every: Duration::from_secs(args.restart_every.max(1)),
        restart_gap: (
            Duration::from_millis(args.gap_min_ms),
            Duration::from_millis(args.gap_max_ms),
        ),
    };
    let windows = Arc::new(Windows::default());
    let count = upstreams.len();
    let mut fault_tasks = Vec::new();
    for (i, n) in upstreams.into_iter().enumerate() {
        let planned = faults::plan(args.seed, i, count, secs, &options);
        fault_tasks.push(tokio::spawn(faults::run(
            n,
            i,
            planned,
            epoch,
            end,
            windows.clone(),
        )));
    }
    let writes = Arc::new(policy::Writes::default());
    let writer = tokio::spawn(policy::rewrite(policy_path.clone(), end, writes.clone()));
    let monitor = tokio::spawn(monitor(gw.clone(), epoch, end));
    let load = LoadOptions {
        rate: args.rate,
        workers: args.workers.max(1),
        unknown_share: args.unknown_share,
        stream_share: args.stream_share,
        timeout: Duration::from_secs(args.timeout),
        seed: args.seed,
    };
    println!(
        "soak: {} s at {:.0} requests/s ({} workers), {count} nginx instances, warm-up {} s ...",
        args.secs,
        args.rate,
        load.workers,
        warmup.as_secs()
    );
    let tally = load::run(&url, load, epoch, end).await?;
    let samples = monitor.await??;
    writer.await??;
    let mut upstreams = Vec::new();
    for t in fault_tasks {
        upstreams.push(t.await??);
    }

    // Final figures: the reload counters once the last write has been
    // read, then the process at rest once idle upstream connections have
    // expired (the providers' idle_timeout, 4 s by default).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let gw = Arc::try_unwrap(gw)
        .map_err(|_| "the monitor still holds the gateway")?
        .into_inner();
    let metrics = gw.metrics(&reqwest::Client::new()).await?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let idle_end = gw.process()?;
    let (warm, warm_tasks) = settled(&samples, warmup);
    let (end_figures, end_tasks) = settled(&samples, secs);
    let log = gw.log.clone();
    let stopped_cleanly = gw.stop().await.map_err(|e| e.to_string());
    drop(upstreams);

    let run = Run {
        secs: secs.as_secs_f64(),
        target_rate: args.rate,
        min_rate: args.min_rate,
        workers: load.workers,
        seed: args.seed,
        tally,
        windows: windows.take(),
        instances: INSTANCES[..count].to_vec(),
        providers,
        metrics,
        valid_writes: writes.valid.load(Ordering::Relaxed),
        invalid_writes: writes.invalid.load(Ordering::Relaxed),
        process: ProcessFigures {
            idle_start,
            warm,
            end: end_figures,
            peak: peak(&samples),
            idle_end,
            tasks: warm_tasks.zip(end_tasks),
        },
        stopped_cleanly,
    };
    let ok = run.print();
    println!("gateway log: {}", log.display());
    Ok(ok)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("soak_gateway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(soak(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak_gateway: {e}");
            ExitCode::FAILURE
        }
    }
}
