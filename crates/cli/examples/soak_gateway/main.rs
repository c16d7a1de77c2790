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
//! * **Phases**: warm-up (a tenth of the run, at least one restart period
//!   and 5 s; it ends with a 2 s unpaced burst, see [`BURST`]), 10 s at
//!   rest, the rest of the load, 10 s at rest. The gateway's memory,
//!   descriptors, threads and runtime tasks (its
//!   `retryctl_runtime_alive_tasks` gauge) are compared at the two rests,
//!   where they are its own and not its connections'; the figures under
//!   load are printed beside them.
//!
//! It prints a report (`report.rs`) and exits non-zero unless every
//! request was answered, every failure falls in a fault window of the
//! providers it names, unknown models got 404 and no metric series, the
//! reloads were counted, the rate was reached after warm-up, and the
//! gateway's memory, file descriptors, threads and tasks at rest stayed
//! flat from warm-up to the end.

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
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Parser;
use tokio::time::Instant;

use crate::faults::{FaultOptions, Windows};
use crate::gateway::{Gateway, Process};
use crate::load::{LoadOptions, Phase, Tally};
use crate::nginx::Nginx;
use crate::report::{ProcessFigures, Run};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Names of the nginx instances (and the suffix of their providers).
const INSTANCES: [&str; 4] = ["a", "b", "c", "d"];
/// The under-load figures at warm-up and at the end are medians over this
/// many one-second samples.
const MEDIAN_OF: usize = 5;
/// The load pauses this long after warm-up, and waits this long after it
/// ends, before the gateway is measured at rest: its clients' connections
/// are closed, and its idle upstream connections have expired. They
/// expire after the providers' `idle_timeout` (4 s by default), but the
/// HTTP client's pool reaps them on a timer of that same period, so one
/// can stay open up to twice as long (measured: 8 s after the load).
const REST: Duration = Duration::from_secs(10);
/// The warm-up ends with this long unpaced: every worker sends as fast as
/// it is answered. The gateway's memory follows the most connections it
/// has had open at once (client and upstream, tens of KiB each), and at
/// the paced rate they are few until a restart releases the requests
/// that waited for it all at once; the burst opens them all during
/// warm-up, so the plateau is in the warm-up figure rather than counted
/// as growth after it.
const BURST: Duration = Duration::from_secs(2);

#[derive(Parser, Debug)]
#[command(
    about = "retryctl serve in front of real nginx under reloads, restarts and policy rewrites"
)]
struct Args {
    /// How long the load runs, in seconds.
    #[arg(long, default_value_t = 60)]
    secs: u64,
    /// Seconds of warm-up load before the first figures (default: a tenth
    /// of the run, at least one restart period and 5 s, at most 60 s).
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

/// The gateway's process sampled once a second, from the start of the
/// load.
type Samples = Vec<(Duration, Process)>;

/// One sample a second of the gateway's process until `end`; fails if
/// the process exits.
async fn monitor(
    gateway: Arc<tokio::sync::Mutex<Gateway>>,
    epoch: Instant,
    end: Instant,
) -> Result<Samples, Error> {
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
        samples.push((now.saturating_duration_since(epoch), gw.process()?));
    }
}

fn median(mut xs: Vec<u64>) -> u64 {
    xs.sort_unstable();
    xs.get(xs.len() / 2).copied().unwrap_or(0)
}

/// The median of each figure over the last [`MEDIAN_OF`] samples taken
/// before `until`.
fn settled(samples: &Samples, until: Duration) -> Process {
    let window: Vec<_> = samples.iter().filter(|(at, _)| *at <= until).collect();
    let window = &window[window.len().saturating_sub(MEDIAN_OF)..];
    let pick = |f: fn(&Process) -> u64| median(window.iter().map(|(_, p)| f(p)).collect());
    Process {
        rss: pick(|p| p.rss),
        fds: pick(|p| p.fds),
        threads: pick(|p| p.threads),
        // Not sampled under load (a scrape per sample would be load).
        tasks: 0,
    }
}

fn peak(samples: &Samples) -> Process {
    let max = |f: fn(&Process) -> u64| samples.iter().map(|(_, p)| f(p)).max().unwrap_or(0);
    Process {
        rss: max(|p| p.rss),
        fds: max(|p| p.fds),
        threads: max(|p| p.threads),
        tasks: 0,
    }
}

/// Ten samples evenly spread over the run, the last one included.
fn timeline(samples: &Samples) -> Vec<(Duration, Process)> {
    let n = samples.len();
    (1..=10)
        .filter_map(|i| samples.get((n * i / 10).saturating_sub(1)))
        .copied()
        .collect()
}

/// When things happen, as offsets from the start of the load: warm-up
/// load, a rest, the rest of the load, a rest.
#[derive(Clone, Copy, Debug)]
struct Timing {
    /// Seconds of load in all.
    load: Duration,
    warmup: Duration,
}

impl Timing {
    /// The default warm-up is a tenth of the run, but at least one
    /// restart period and 5 s more, so that every instance has been
    /// restarted once: the gateway's memory reaches its plateau with the
    /// first burst of requests released by a restart, and a figure taken
    /// before that would count the plateau as growth. At most 60 s.
    fn new(args: &Args) -> Result<Timing, Error> {
        let load = Duration::from_secs(args.secs);
        let default = (args.secs / 10).max(args.restart_every + 5).min(60);
        let warmup = Duration::from_secs(args.warmup.unwrap_or(default));
        if warmup < Duration::from_secs(MEDIAN_OF as u64)
            || warmup + Duration::from_secs(2 * MEDIAN_OF as u64) > load
        {
            return Err(format!(
                "a warm-up of {} s in {} s of load leaves too little to measure: \
                 at least {} s of each are needed (raise --secs or lower --warmup)",
                warmup.as_secs(),
                load.as_secs(),
                2 * MEDIAN_OF
            )
            .into());
        }
        Ok(Timing { load, warmup })
    }

    /// The load before and after the rest after warm-up.
    fn phases(&self, epoch: Instant) -> [Phase; 2] {
        let resume = epoch + self.warmup + REST;
        [
            Phase {
                number: 0,
                start: epoch,
                end: epoch + self.warmup,
                burst: BURST,
            },
            Phase {
                number: 1,
                start: resume,
                end: resume + (self.load - self.warmup),
                burst: Duration::ZERO,
            },
        ]
    }

    /// The middle of the load after warm-up, from the start of the load.
    fn middle(&self) -> Duration {
        self.warmup + REST + (self.load - self.warmup) / 2
    }

    /// When the faults and the policy writes stop: with the load.
    fn end(&self, epoch: Instant) -> Instant {
        epoch + self.load + REST
    }
}

/// The load, in two phases with the gateway measured at rest after each.
async fn drive(
    url: &str,
    options: LoadOptions,
    epoch: Instant,
    timing: Timing,
    gateway: &tokio::sync::Mutex<Gateway>,
) -> Result<(Tally, [Process; 2]), Error> {
    let unknown = Arc::new(AtomicU64::new(0));
    let mut tally = Tally::new();
    let mut rest = [Process::default(); 2];
    for (i, phase) in timing.phases(epoch).into_iter().enumerate() {
        tally.merge(load::run(url, options, epoch, phase, unknown.clone()).await?);
        rest[i] = at_rest(gateway).await?;
    }
    tally.unknown_names = unknown.load(Ordering::Relaxed).min(load::UNKNOWN_NAMES);
    Ok((tally, rest))
}

/// The gateway once the load has stopped and its clients have closed
/// their connections, and [`REST`] has passed: `/proc`, and the tasks its
/// `/metrics` counts (read once a second, so after a second more).
async fn at_rest(gateway: &tokio::sync::Mutex<Gateway>) -> Result<Process, Error> {
    tokio::time::sleep(REST).await;
    let gateway = gateway.lock().await;
    let mut process = gateway.process()?;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // A client of its own, closed before the next rest, so its
    // connection is not one of the tasks counted then.
    let client = reqwest::Client::new();
    let tasks = gateway.metrics(&client).await?.tasks;
    process.tasks = tasks.ok_or("no retryctl_runtime_alive_tasks in /metrics")? as u64;
    Ok(process)
}

/// Directories, upstreams, policy and gateway, started.
struct Setup {
    dir: PathBuf,
    upstreams: Vec<Nginx>,
    providers: BTreeMap<String, usize>,
    policy: PathBuf,
    gateway: Gateway,
}

async fn setup(args: &Args) -> Result<Setup, Error> {
    let bin = gateway_binary(args)?;
    let version = nginx::check(&args.nginx).map_err(|e| {
        format!(
            "{}: {e} (install nginx, or pass --nginx)",
            args.nginx.display()
        )
    })?;
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
    let upstreams = start_upstreams(args, &dir).await?;
    let mut providers = BTreeMap::new();
    for (i, n) in upstreams.iter().enumerate() {
        providers.insert(format!("json-{}", n.name), i);
        providers.insert(format!("sse-{}", n.name), i);
    }
    let policy = dir.join("policy.toml");
    policy::write(&policy, 0)?;
    let (listen, metrics) = (
        loopback(gateway::free_port()?),
        loopback(gateway::free_port()?),
    );
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        gateway::config_text(listen, metrics, &policy, &upstreams),
    )?;
    let gateway = Gateway::start(&bin, &config, listen, metrics, dir.join("gateway.log")).await?;
    Ok(Setup {
        dir,
        upstreams,
        providers,
        policy,
        gateway,
    })
}

fn fault_options(args: &Args) -> FaultOptions {
    let ms = Duration::from_millis;
    FaultOptions {
        reload_every: (ms(args.reload_min_ms), ms(args.reload_max_ms)),
        restart_every: Duration::from_secs(args.restart_every.max(1)),
        restart_gap: (ms(args.gap_min_ms), ms(args.gap_max_ms)),
    }
}

async fn soak(args: Args) -> Result<bool, Error> {
    let timing = Timing::new(&args)?;
    let Setup {
        dir,
        upstreams,
        providers,
        policy,
        gateway,
    } = setup(&args).await?;
    let url = gateway.url.clone();
    let idle_start = gateway.process()?;
    let cpu_start = gateway.cpu_time()?;
    let gateway = Arc::new(tokio::sync::Mutex::new(gateway));

    let epoch = Instant::now() + Duration::from_millis(100);
    let end = timing.end(epoch);
    let windows = Arc::new(Windows::default());
    let count = upstreams.len();
    let mut fault_tasks = Vec::new();
    for (i, n) in upstreams.into_iter().enumerate() {
        let planned = faults::plan(args.seed, i, count, end - epoch, &fault_options(&args));
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
    let writer = tokio::spawn(policy::rewrite(policy, end, writes.clone()));
    let monitor = tokio::spawn(monitor(gateway.clone(), epoch, end));
    let load = LoadOptions {
        rate: args.rate,
        workers: args.workers.max(1),
        unknown_share: args.unknown_share,
        stream_share: args.stream_share,
        timeout: Duration::from_secs(args.timeout),
        seed: args.seed,
    };
    println!(
        "soak: {} s of load at {:.0} requests/s ({} workers), {count} nginx instances, \
         {} s of it warm-up, then {} s at rest ...",
        timing.load.as_secs(),
        args.rate,
        load.workers,
        timing.warmup.as_secs(),
        REST.as_secs()
    );
    let (tally, [warm_rest, end_rest]) = drive(&url, load, epoch, timing, &gateway).await?;
    let samples = monitor.await??;
    writer.await??;
    let mut upstreams = Vec::new();
    for t in fault_tasks {
        upstreams.push(t.await??);
    }
    let gateway = Arc::try_unwrap(gateway)
        .map_err(|_| "the monitor still holds the gateway")?
        .into_inner();
    // The last write was made a second or more ago: it has been read.
    let metrics = gateway.metrics(&reqwest::Client::new()).await?;
    let cpu = gateway.cpu_time()?.saturating_sub(cpu_start);
    let log = gateway.log.clone();
    let stopped_cleanly = gateway.stop().await.map_err(|e| e.to_string());
    drop(upstreams);

    let run = Run {
        secs: timing.load.as_secs_f64(),
        fault_secs: (end - epoch).as_secs_f64(),
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
            warm: settled(&samples, timing.warmup),
            warm_rest,
            middle: settled(&samples, timing.middle()),
            end: settled(&samples, timing.load + REST),
            end_rest,
            peak: peak(&samples),
            timeline: timeline(&samples),
        },
        stopped_cleanly,
        cpu,
    };
    let ok = run.print();
    println!(
        "gateway log: {}; nginx: {}/nginx-*",
        log.display(),
        dir.display()
    );
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
