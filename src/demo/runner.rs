//! Drives the same traffic through a baseline pool (no retries, as
//! production was) and a pool under the policy, each against its own set of
//! faulty upstreams following the same schedule at the same time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tokio::time::{Instant, MissedTickBehavior};

use super::faults::{ATTEMPT_HEADER, FaultServer, REQUEST_HEADER};
use super::schedule::Schedule;
use crate::classify::{Cause, Classification};
use crate::live::LivePolicy;
use crate::policy::{Policy, PolicyError};
use crate::pool::{BuildError, CallOptions, Pool};
use crate::upstream::{self, UpstreamError};

/// The model the demo serves (one provider per model, as in production).
pub const MODEL: &str = "openai/gpt-oss-120b";

/// What one request did.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The request id (same for both pools).
    pub id: u64,
    /// When it was sent, from the start of traffic.
    pub sent: Duration,
    /// Whether it succeeded.
    pub ok: bool,
    /// Time to the outcome.
    pub latency: Duration,
    /// Upstream attempts made.
    pub attempts: u32,
    /// Rounds used.
    pub rounds: u32,
    /// The first failed attempt's cause, if any attempt failed.
    pub first_failure: Option<Cause>,
    /// Why it failed, when it did (a [`FailReason`](crate::FailReason) label).
    pub reason: Option<&'static str>,
    /// Whether an attempt followed a permanent (client error) failure:
    /// must never happen.
    pub retried_client_error: bool,
}

impl Sample {
    /// Whether the first round failed (what would fail without retries).
    pub fn first_round_failed(&self) -> bool {
        !self.ok || self.rounds > 1
    }
}

/// One side's results.
#[derive(Debug, Default)]
pub struct SideRun {
    /// Every request, by id.
    pub samples: Vec<Sample>,
    /// Connections the side's upstream accepted.
    pub upstream_accepted: u64,
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    /// The policy is invalid.
    #[error("invalid policy: {0}")]
    Policy(#[from] PolicyError),
    /// A pool could not be built.
    #[error("cannot build the pool: {0}")]
    Pool(#[from] BuildError),
    /// A socket could not be opened.
    #[error("cannot start a demo upstream: {0}")]
    Io(#[from] std::io::Error),
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    /// Options out of range.
    #[error("{0}")]
    Options(String),
}

/// How to run the demo.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// Seed of the fault schedule and the noise.
    pub seed: u64,
    /// Requests per second (to each pool).
    pub rps: u32,
    /// How long traffic runs.
    pub duration: Duration,
    /// The policy of the retrying pool (the baseline uses it with
    /// `max_rounds = 1`).
    pub policy: Policy,
    /// Upper bound for the policy's connect timeout: loopback connects take
    /// microseconds, and the production default (5 s) would turn a stalled
    /// accept queue into latency instead of a visible connect failure.
    pub connect_timeout: Duration,
    /// Show a progress bar.
    pub progress: bool,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            seed: 1,
            rps: 200,
            duration: Duration::from_secs(30),
            policy: Policy::default(),
            connect_timeout: Duration::from_millis(250),
            progress: false,
        }
    }
}

/// One upstream of a demo pool.
#[derive(Clone, Debug)]
pub(crate) struct Upstream {
    pub(crate) client: reqwest::Client,
    pub(crate) url: String,
}

fn build_pool(policy: Policy, url: String, prefix: &str) -> Result<Pool<Upstream>, DemoError> {
    // A fresh connection per request: connection faults hit every request
    // sent while they last, as in the incident.
    let client = upstream::client_builder(&policy.timeouts)
        .pool_max_idle_per_host(0)
        .build()?;
    Ok(Pool::builder()
        .provider(MODEL, "proxy", Upstream { client, url })
        .policy(LivePolicy::new(policy)?)
        .metrics_prefix(prefix)
        .build()?)
}

/// Sends request `id` through `pool` and records what happened.
pub(crate) async fn one(
    pool: &Pool<Upstream>,
    id: u64,
    sent: Duration,
    deadline: Duration,
) -> Sample {
    let started = Instant::now();
    let mut attempt = 0u32;
    let result = pool
        .call_with(MODEL, CallOptions::timeout(deadline), |p: &Upstream| {
            attempt += 1;
            let request = p
                .client
                .post(format!("{}/v1/chat/completions", p.url))
                .header(REQUEST_HEADER, id)
                .header(ATTEMPT_HEADER, attempt)
                .body(r#"{"model":"openai/gpt-oss-120b","messages":[]}"#);
            async move {
                let response = upstream::check(request.send().await?).await?;
                response.bytes().await.map_err(UpstreamError::from)?;
                Ok::<_, UpstreamError>(())
            }
        })
        .await;
    let latency = started.elapsed();
    let (ok, report, reason) = match result {
        Ok(served) => (true, served.report, None),
        Err(e) => (false, e.report, Some(e.reason.as_str())),
    };
    let failures = report.failures();
    let retried_client_error = failures
        .iter()
        .position(|f| f.verdict.class == Classification::Permanent)
        .is_some_and(|i| (i as u32) + 1 < report.attempts);
    Sample {
        id,
        sent,
        ok,
        latency,
        attempts: report.attempts,
        rounds: report.rounds,
        first_failure: failures.first().map(|f| f.verdict.cause),
        reason,
        retried_client_error,
    }
}

/// Runs the traffic; returns (baseline, retrying).
pub async fn run(
    config: &DemoConfig,
    schedule: Arc<Schedule>,
) -> Result<(SideRun, SideRun), DemoError> {
    if config.rps == 0 || config.rps > 5_000 {
        return Err(DemoError::Options(format!(
            "--rps {} is out of range 1..=5000",
            config.rps
        )));
    }
    if config.duration.is_zero() || config.duration > Duration::from_secs(24 * 3600) {
        return Err(DemoError::Options(
            "--duration must be within 1s..=24h".into(),
        ));
    }
    let mut policy = config.policy.clone();
    policy.timeouts.connect = policy.timeouts.connect.min(config.connect_timeout);
    policy.validate()?;
    let baseline_policy = Policy {
        max_rounds: 1,
        ..policy.clone()
    };

    let epoch = Instant::now() + Duration::from_millis(300);
    let base_server = FaultServer::start(schedule.clone(), epoch).await?;
    let retry_server = FaultServer::start(schedule.clone(), epoch).await?;
    let baseline = Arc::new(build_pool(
        baseline_policy,
        base_server.url(),
        "retryctl_baseline_",
    )?);
    let retrying = Arc::new(build_pool(
        policy,
        retry_server.url(),
        crate::telemetry::DEFAULT_PREFIX,
    )?);

    let total = (u128::from(config.rps) * config.duration.as_millis() / 1000) as u64;
    let period = Duration::from_secs_f64(1.0 / f64::from(config.rps));
    let failed = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let done = Arc::new(AtomicU64::new(0));
    let bar = if config.progress {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} requests  {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    // Each request has its own deadline: long enough for a restart plus a
    // retry round, short enough that the demo always ends.
    let deadline = Duration::from_secs(15);
    let mut tasks = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval_at(epoch, period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut last_message = Instant::now();
    for id in 0..total {
        tick.tick().await;
        let sent = Instant::now().saturating_duration_since(epoch);
        for (side, pool) in [(0usize, baseline.clone()), (1, retrying.clone())] {
            let failed = failed.clone();
            let done = done.clone();
            tasks.spawn(async move {
                let sample = one(&pool, id, sent, deadline).await;
                if !sample.ok {
                    failed[side].fetch_add(1, Ordering::Relaxed);
                }
                done.fetch_add(1, Ordering::Relaxed);
                (side, sample)
            });
        }
        bar.set_position(id + 1);
        if last_message.elapsed() >= Duration::from_millis(200) {
            last_message = Instant::now();
            bar.set_message(format!(
                "failed: baseline {} | retryctl {}",
                failed[0].load(Ordering::Relaxed),
                failed[1].load(Ordering::Relaxed)
            ));
        }
    }
    let mut sides = (SideRun::default(), SideRun::default());
    while let Some(joined) = tasks.join_next().await {
        if let Ok((side, sample)) = joined {
            if side == 0 {
                sides.0.samples.push(sample);
            } else {
                sides.1.samples.push(sample);
            }
        }
    }
    bar.finish_with_message(format!(
        "failed: baseline {} | retryctl {}",
        failed[0].load(Ordering::Relaxed),
        failed[1].load(Ordering::Relaxed)
    ));
    sides.0.samples.sort_by_key(|s| s.id);
    sides.1.samples.sort_by_key(|s| s.id);
    sides.0.upstream_accepted = base_server.counters().accepted.load(Ordering::Relaxed);
    sides.1.upstream_accepted = retry_server.counters().accepted.load(Ordering::Relaxed);
    Ok(sides)
}
