//! Soak: the pool at a steady load against faulty upstreams on loopback,
//! with the policy file rewritten every second and followed by the real
//! watcher, for a configurable time.
//!
//! The demo runner builds its own `LivePolicy`, so this driver is built
//! from the same public pieces instead: two [`FaultServer`]s (one per
//! provider, each on its own seeded [`Schedule`]: reloads, backlog stalls,
//! a restart, 5xx with and without Retry-After, 400s, slow answers), one
//! [`Pool`] whose [`LivePolicy`] a [`PolicyWatcher`] keeps in step with a
//! file that a writer thread replaces every second (one second in ten
//! with a file that is invalid, which must be rejected while the last good
//! policy stays in force).
//!
//! What it asserts:
//!
//! * **every request has an outcome**: each spawned request task returns
//!   (no panic, nothing left running), within its deadline plus a margin;
//! * **resident memory is flat after warm-up**: VmRSS at the end is at
//!   most `max(16 MiB, 20%)` above VmRSS right after warm-up;
//! * **tasks are flat**: the runtime's alive tasks other than in-flight
//!   requests (`num_alive_tasks() - in_flight`) end within 16 of where
//!   they were after warm-up;
//! * **threads are flat**: `Threads` in `/proc/self/status` ends at most 2
//!   above where it was after warm-up;
//! * the reloads happened: the applied count follows the writes, the bad
//!   files were rejected.
//!
//! `cargo test` runs it for 5 s. `RETRYCTL_SOAK_SECS=60` (what `.ci/soak`
//! sets) or longer runs the real soak; `RETRYCTL_SOAK_RPS` sets the load
//! (default 100 requests/s). Run with `--nocapture` to see the figures.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use retryctl::policy::LivePolicy;
use retryctl::reload::{PolicyWatcher, ReloadOptions};
use retryctl::upstream::{self, UpstreamError};
use retryctl::{CallOptions, Pool};
use retryctl_testkit::faults::FaultServer;
use retryctl_testkit::schedule::Schedule;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

const MODEL: &str = "openai/gpt-oss-120b";
/// Each request's deadline; a request task must return within it plus
/// [`MARGIN`].
const DEADLINE: Duration = Duration::from_secs(10);
const MARGIN: Duration = Duration::from_secs(2);
/// Allowed growth of resident memory after warm-up: the larger of these.
const RSS_SLACK_BYTES: u64 = 16 << 20;
const RSS_SLACK_RATIO: f64 = 0.20;
/// Allowed growth of background tasks and of threads after warm-up.
const TASK_SLACK: usize = 16;
const THREAD_SLACK: u64 = 2;

/// How long and how hard, from the environment.
struct Settings {
    duration: Duration,
    warmup: Duration,
    rps: u32,
}

impl Settings {
    fn from_env() -> Settings {
        let secs = std::env::var("RETRYCTL_SOAK_SECS")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .filter(|&s| s >= 2)
            .unwrap_or(5);
        let rps = std::env::var("RETRYCTL_SOAK_RPS")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .filter(|&r| (1..=2000).contains(&r))
            .unwrap_or(100);
        Settings {
            duration: Duration::from_secs(secs),
            // A tenth of the run, 1 s to 30 s: allocator arenas, connection
            // pools and the budget's windows fill up first.
            warmup: Duration::from_secs((secs / 10).clamp(1, 30)),
            rps,
        }
    }
}

/// One line of `/proc/self/status`, as a number (`kB` values in bytes).
fn proc_status(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    let mut words = line.split_whitespace();
    let n: u64 = words.next().and_then(|w| w.parse().ok()).expect("a number");
    match words.next() {
        Some("kB") => n * 1024,
        _ => n,
    }
}

fn rss() -> u64 {
    proc_status("VmRSS")
}

fn threads() -> u64 {
    proc_status("Threads")
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// The policy written in second `n`: every field that matters to the
/// pool changes with `n`, every other second with a per-model override;
/// every tenth second the file is invalid (`max_rounds = 0`).
fn policy_text(n: u64) -> String {
    if n % 10 == 9 {
        return format!("# write {n}: invalid on purpose\nmax_rounds = 0\n");
    }
    let mut text = format!(
        "# write {n}\n\
         max_rounds = {rounds}\n\
         delay = \"{delay}ms\"\n\
         jitter = 0.2\n\
         [timeouts]\n\
         connect = \"250ms\"\n\
         attempt = \"3s\"\n\
         request = \"10s\"\n\
         [budget]\n\
         min_per_second = {per_second}\n",
        rounds = 1 + n % 3,
        delay = 100 + (n % 5) * 100,
        per_second = 10 + n,
    );
    if n % 2 == 0 {
        text.push_str(&format!(
            "[models.\"{MODEL}\"]\nmax_rounds = {}\n[models.\"{MODEL}\".budget]\nratio = 0.{}\n",
            2 + n % 2,
            1 + n % 5
        ));
    }
    text
}

/// Replaces the file atomically (write a temporary file, rename it over).
fn write_policy(path: &Path, n: u64) {
    let tmp = path.with_extension(format!("tmp{n}"));
    std::fs::write(&tmp, policy_text(n)).expect("write the policy");
    std::fs::rename(&tmp, path).expect("rename the policy");
}

#[derive(Clone, Debug)]
struct Upstream {
    client: reqwest::Client,
    url: String,
}

#[derive(Default)]
struct Outcomes {
    spawned: AtomicU64,
    returned: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    late: AtomicU64,
}

/// Figures sampled once a second.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    rss: u64,
    threads: u64,
    alive_tasks: usize,
    in_flight: usize,
}

impl Sample {
    fn take(in_flight: usize) -> Sample {
        Sample {
            rss: rss(),
            threads: threads(),
            alive_tasks: tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks(),
            in_flight,
        }
    }

    /// Alive tasks that are not request tasks: servers, connections.
    fn background(self) -> usize {
        self.alive_tasks.saturating_sub(self.in_flight)
    }
}

async fn one(pool: &Pool<Upstream>, outcomes: &Outcomes) -> Result<(), String> {
    let started = Instant::now();
    let result = pool
        .call_with(MODEL, CallOptions::timeout(DEADLINE), |p: &Upstream| {
            let request = p
                .client
                .post(format!("{}/v1/chat/completions", p.url))
                .body(r#"{"model":"openai/gpt-oss-120b","messages":[]}"#);
            async move {
                let response = upstream::check(request.send().await?).await?;
                response.bytes().await.map_err(UpstreamError::from)?;
                Ok::<_, UpstreamError>(())
            }
        })
        .await;
    if started.elapsed() > DEADLINE + MARGIN {
        outcomes.late.fetch_add(1, Ordering::Relaxed);
    }
    match result {
        Ok(_) => outcomes.ok.fetch_add(1, Ordering::Relaxed),
        Err(e) => {
            if matches!(e.reason, retryctl::FailReason::UnknownModel { .. }) {
                return Err(format!("unexpected failure: {e}"));
            }
            outcomes.failed.fetch_add(1, Ordering::Relaxed)
        }
    };
    Ok(())
}

#[test]
fn steady_load_with_faults_and_a_reload_every_second() {
    let settings = Settings::from_env();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temporary directory");
    let path: PathBuf = dir.path().join("policy.toml");
    write_policy(&path, 0);
    let live = LivePolicy::default();
    let watcher = PolicyWatcher::start(&path, live.clone(), ReloadOptions::default())
        .expect("the watcher starts");

    // The writer: a new file every second until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, writes, path) = (stop.clone(), writes.clone(), path.clone());
        std::thread::spawn(move || {
            let mut n = 1;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                write_policy(&path, n);
                writes.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
        })
    };

    let report = runtime.block_on(drive(&settings, live.clone()));
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("the writer thread");
    let counts = watcher.counts();
    let writes = writes.load(Ordering::Relaxed);
    drop(watcher);
    drop(runtime);

    let Report {
        outcomes,
        warm,
        end,
        peak,
        mid,
        errors,
    } = report;
    let spawned = outcomes.spawned.load(Ordering::Relaxed);
    let returned = outcomes.returned.load(Ordering::Relaxed);
    let ok = outcomes.ok.load(Ordering::Relaxed);
    let failed = outcomes.failed.load(Ordering::Relaxed);
    let late = outcomes.late.load(Ordering::Relaxed);
    let rss_allowed = RSS_SLACK_BYTES.max((warm.rss as f64 * RSS_SLACK_RATIO) as u64);
    println!(
        "soak: {} s at {} req/s, warm-up {} s",
        settings.duration.as_secs(),
        settings.rps,
        settings.warmup.as_secs()
    );
    println!(
        "requests: spawned {spawned}, returned {returned}, ok {ok}, failed {failed}, \
         late {late}, without an outcome {}",
        spawned - returned
    );
    println!(
        "policy: {writes} writes, applied {}, unchanged {}, rejected {}",
        counts.applied, counts.unchanged, counts.rejected
    );
    println!(
        "rss: warm {:.1} MiB, mid {:.1} MiB, end {:.1} MiB, peak {:.1} MiB (allowed end <= {:.1} MiB)",
        mib(warm.rss),
        mib(mid.rss),
        mib(end.rss),
        mib(peak.rss),
        mib(warm.rss + rss_allowed)
    );
    println!(
        "tasks: warm {} alive ({} in flight, {} background), end {} alive ({} in flight, {} background), peak {} alive",
        warm.alive_tasks,
        warm.in_flight,
        warm.background(),
        end.alive_tasks,
        end.in_flight,
        end.background(),
        peak.alive_tasks
    );
    println!(
        "threads: warm {}, end {}, peak {}",
        warm.threads, end.threads, peak.threads
    );

    assert!(errors.is_empty(), "request tasks failed: {errors:?}");
    assert_eq!(spawned, returned, "requests without an outcome");
    assert_eq!(ok + failed, returned);
    assert_eq!(late, 0, "requests past their deadline + {MARGIN:?}");
    assert!(ok > 0, "no request succeeded");
    assert!(
        end.rss <= warm.rss + rss_allowed,
        "resident memory grew after warm-up: {:.1} -> {:.1} MiB",
        mib(warm.rss),
        mib(end.rss)
    );
    assert_eq!(end.in_flight, 0);
    assert!(
        end.background() <= warm.background() + TASK_SLACK,
        "tasks grew after warm-up: {} -> {}",
        warm.background(),
        end.background()
    );
    assert!(
        end.threads <= warm.threads + THREAD_SLACK,
        "threads grew after warm-up: {} -> {}",
        warm.threads,
        end.threads
    );
    // Every valid write changes the policy; the debounce (150 ms) is far
    // below the write interval, so almost every write is applied.
    let valid_writes = (1..=writes).filter(|n| n % 10 != 9).count() as u64;
    assert!(
        counts.applied >= valid_writes / 2,
        "{} applied for {valid_writes} valid writes",
        counts.applied
    );
    if writes >= 10 {
        assert!(counts.rejected >= 1, "the invalid files were not rejected");
    }
}

struct Report {
    outcomes: Arc<Outcomes>,
    warm: Sample,
    mid: Sample,
    end: Sample,
    peak: Sample,
    errors: Vec<String>,
}

async fn drive(settings: &Settings, live: LivePolicy) -> Report {
    let total = settings.duration + Duration::from_secs(1);
    let epoch = Instant::now() + Duration::from_millis(200);
    let mut pool = Pool::builder().policy(live);
    let mut servers = Vec::new();
    for (seed, name) in [(1, "proxy-a"), (2, "proxy-b")] {
        let schedule = Arc::new(Schedule::generate(seed, total));
        let server = FaultServer::start(schedule, epoch)
            .await
            .expect("fault server");
        let client = upstream::client_builder(&retryctl::policy::Timeouts {
            connect: Duration::from_millis(250),
            ..retryctl::policy::Timeouts::default()
        })
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
        pool = pool.provider(
            MODEL,
            name,
            Upstream {
                client,
                url: server.url(),
            },
        );
        servers.push(server);
    }
    let pool = Arc::new(pool.build().expect("pool"));
    let outcomes = Arc::new(Outcomes::default());
    let mut tasks: JoinSet<Result<(), String>> = JoinSet::new();
    let mut errors = Vec::new();
    let reap = |tasks: &mut JoinSet<Result<(), String>>, errors: &mut Vec<String>| {
        while let Some(joined) = tasks.try_join_next() {
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(e),
                Err(e) => errors.push(format!("request task panicked or was cancelled: {e}")),
            }
        }
    };

    let period = Duration::from_secs_f64(1.0 / f64::from(settings.rps));
    let mut tick = tokio::time::interval_at(epoch, period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let warm_at = epoch + settings.warmup;
    let mid_at = epoch + settings.warmup + (settings.duration - settings.warmup) / 2;
    let end_at = epoch + settings.duration;
    let mut next_sample = epoch + Duration::from_secs(1);
    let (mut warm, mut mid, mut peak) = (None, None, Sample::default());
    loop {
        let now = tick.tick().await;
        if now >= end_at {
            break;
        }
        reap(&mut tasks, &mut errors);
        let (pool, o) = (pool.clone(), outcomes.clone());
        o.spawned.fetch_add(1, Ordering::Relaxed);
        tasks.spawn(async move {
            let result = one(&pool, &o).await;
            o.returned.fetch_add(1, Ordering::Relaxed);
            result
        });
        if now >= next_sample {
            next_sample += Duration::from_secs(1);
            let s = Sample::take(tasks.len());
            peak.rss = peak.rss.max(s.rss);
            peak.threads = peak.threads.max(s.threads);
            peak.alive_tasks = peak.alive_tasks.max(s.alive_tasks);
            if warm.is_none() && now >= warm_at {
                warm = Some(s);
            }
            if mid.is_none() && now >= mid_at {
                mid = Some(s);
            }
        }
    }
    // Every request task must return: bounded by its deadline.
    let drained = tokio::time::timeout(DEADLINE + MARGIN, async {
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(e),
                Err(e) => errors.push(format!("request task panicked or was cancelled: {e}")),
            }
        }
    })
    .await;
    if drained.is_err() {
        errors.push(format!("{} request tasks still running", tasks.len()));
        tasks.abort_all();
    }
    // Connections closing, answers being written: let them finish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let end = Sample::take(tasks.len());
    drop(servers);
    let warm = warm.unwrap_or(end);
    Report {
        outcomes,
        warm,
        mid: mid.unwrap_or(warm),
        end,
        peak,
        errors,
    }
}
