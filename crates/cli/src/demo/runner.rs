//! Drives the same traffic through a baseline pool (no retries, as
//! production was) and a pool under the policy, each against its own set of
//! faulty upstreams following the same schedule at the same time.
//!
//! With a policy file ([`DemoConfig::policy_file`]) the retrying pool
//! follows the file as the gateway does: a [`PolicyWatcher`] keeps its
//! [`LivePolicy`] in step with the file, so an edit made while the demo
//! runs changes retries live (every reload applied or refused is printed
//! and reported). The baseline stays on the policy read at start.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::time::{Instant, MissedTickBehavior};

use retryctl::policy::LivePolicy;
use retryctl::policy::{Policy, PolicyError, Timeouts};
use retryctl::reload::{PolicyWatcher, ReloadCounts, ReloadOptions, ReloadStatus, StartError};
use retryctl::upstream::{self, UpstreamError};
use retryctl::{BuildError, CallOptions, Pool, Report};
use retryctl::{Cause, Classification};
use retryctl_testkit::faults::{ATTEMPT_HEADER, FaultServer, REQUEST_HEADER};
use retryctl_testkit::schedule::Schedule;

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
    /// Rounds used. With the admission gate a re-attempt after a
    /// connection-level failure stays in its round: `rounds == 1` does not
    /// mean "not retried" (see [`Sample::any_attempt_failed`]).
    pub rounds: u32,
    /// The first failed attempt's cause, if any attempt failed (the first
    /// failed attempt is always the request's first attempt: attempts run
    /// one after another and only the last one can succeed).
    pub first_failure: Option<Cause>,
    /// Why it failed, when it did (a [`FailReason`](retryctl::FailReason) label).
    pub reason: Option<&'static str>,
    /// Whether an attempt followed a permanent (client error) failure:
    /// must never happen.
    pub retried_client_error: bool,
    /// Attempts that cost the upstream a connection for nothing: failed
    /// attempts other than the request's first, plus failed admission
    /// probes (even a probe that was the request's first attempt).
    pub wasted: u32,
    /// Time spent waiting at admission gates.
    pub queued: Duration,
}

impl Sample {
    /// The sample of request `id`, from its call's outcome.
    pub fn from_report(
        id: u64,
        sent: Duration,
        latency: Duration,
        report: &Report,
        reason: Option<&'static str>,
    ) -> Sample {
        let failures = report.failures();
        let retried_client_error = failures
            .iter()
            .position(|f| f.verdict.class == Classification::Permanent)
            .is_some_and(|i| (i as u32) + 1 < report.attempts);
        let wasted = failures
            .iter()
            .enumerate()
            .filter(|(i, f)| *i > 0 || f.probe)
            .count() as u32;
        Sample {
            id,
            sent,
            ok: reason.is_none(),
            latency,
            attempts: report.attempts,
            rounds: report.rounds,
            first_failure: failures.first().map(|f| f.verdict.cause),
            reason,
            retried_client_error,
            wasted,
            queued: report.queued,
        }
    }

    /// Whether any attempt failed, or the request failed without one
    /// succeeding: what would have failed without retries. Not
    /// `rounds > 1`: with the admission gate, a request re-attempted after
    /// a connection-level failure can be served in its first round.
    pub fn any_attempt_failed(&self) -> bool {
        !self.ok || self.first_failure.is_some()
    }
}

/// One side's results.
#[derive(Debug, Default)]
pub struct SideRun {
    /// Every request, by id.
    pub samples: Vec<Sample>,
    /// Connections the side's upstream accepted.
    pub upstream_accepted: u64,
    /// What the policy file watcher did, when the side followed a file.
    pub reloads: Option<ReloadSummary>,
}

/// One reload of the followed policy file, as seen by the demo.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReloadEvent {
    /// When it was seen, from the start of traffic (zero before it; seen
    /// within [`RELOAD_POLL`] of the watcher's reload).
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    /// What happened: `applied`, `refused`, or `valid_again` (a good file
    /// after a refused one, saying what was already in force).
    pub result: &'static str,
    /// Applied: the keys that changed, as `key = value`; refused: why
    /// (`path:line:column: message`).
    pub detail: String,
}

impl std::fmt::Display for ReloadEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = self.at.as_secs_f64();
        match self.result {
            "applied" => write!(f, "policy reloaded at {at:.1} s: {}", self.detail),
            "refused" => write!(
                f,
                "policy reload refused at {at:.1} s, the previous policy stays: {}",
                self.detail
            ),
            _ => write!(f, "policy file valid again at {at:.1} s; policy unchanged"),
        }
    }
}

/// What the watcher of the retrying side's policy file did during a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ReloadSummary {
    /// The file followed.
    pub path: String,
    /// Reloads that put a new policy in force (the load at start not
    /// counted).
    pub applied: u64,
    /// Reads of a good file that said what was in force.
    pub unchanged: u64,
    /// Reads of a bad or missing file (the previous policy stayed).
    pub refused: u64,
    /// Why the file on disk was refused at the end, if it still was.
    pub last_error: Option<String>,
    /// Each reload applied or refused, in order.
    pub events: Vec<ReloadEvent>,
}

impl ReloadSummary {
    /// One line: what was applied and refused.
    pub fn line(&self) -> String {
        let plural = |n: u64| if n == 1 { "" } else { "s" };
        let mut line = format!(
            "policy file {}: {} reload{} applied, {} refused",
            self.path,
            self.applied,
            plural(self.applied),
            self.refused
        );
        if let Some(e) = &self.last_error {
            line.push_str(&format!(" (still refused: {e})"));
        }
        line
    }
}

/// How often the demo looks at the watcher's counts.
pub const RELOAD_POLL: Duration = Duration::from_millis(50);

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
    /// The policy file could not be loaded or followed.
    #[error("{0}")]
    PolicyFile(#[from] StartError),
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
    /// The policy of the retrying pool (the baseline uses it as
    /// [`baseline_policy`] makes it). Not used with `policy_file`.
    pub policy: Policy,
    /// Read the policy from this file instead, and follow it while the demo
    /// runs, as the gateway does ([`PolicyWatcher`], default options): the
    /// retrying pool uses whatever the file says from the moment it is
    /// applied; a bad file is refused and the previous policy stays. The
    /// baseline and the HTTP clients' connect timeout keep the policy read
    /// at start.
    pub policy_file: Option<PathBuf>,
    /// Upper bound for the policy's connect timeout: loopback connects take
    /// microseconds, and the production default (5 s) would turn a stalled
    /// accept queue into latency instead of a visible connect failure.
    /// Applied to the HTTP clients, and to the embedded policy, whose
    /// `timeouts.connect` the pool reads as the end of an attempt's
    /// connect phase (how long an admission slot is held at most). A
    /// `--policy` file's value is the file's: set it to the same bound
    /// there, or slow responses hold admission slots for up to 5 s.
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
            policy_file: None,
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

/// The baseline's policy: `policy` with retries off, as production was.
/// One round (`max_rounds = 1`, top level and every model override) and
/// no admission gate (`admission.enabled = false`, likewise): the gate
/// re-attempts a connection-level failure within its round, which would
/// be a retry.
pub fn baseline_policy(policy: &Policy) -> Policy {
    let mut baseline = Policy {
        max_rounds: 1,
        ..policy.clone()
    };
    baseline.admission.enabled = false;
    for o in baseline.models.values_mut() {
        o.max_rounds = None;
        o.admission.enabled = None;
    }
    baseline
}

/// The HTTP client of a demo pool: `timeouts` with the connect timeout
/// capped at `cap`, and a fresh connection per request (connection faults
/// hit every request sent while they last, as in the incident).
pub(crate) fn client(timeouts: &Timeouts, cap: Duration) -> Result<reqwest::Client, DemoError> {
    let timeouts = Timeouts {
        connect: timeouts.connect.min(cap),
        ..timeouts.clone()
    };
    Ok(upstream::client_builder(&timeouts)
        .pool_max_idle_per_host(0)
        .build()?)
}

fn build_pool(
    live: LivePolicy,
    client: reqwest::Client,
    url: String,
    prefix: &str,
) -> Result<Pool<Upstream>, DemoError> {
    Ok(Pool::builder()
        .provider(MODEL, "proxy", Upstream { client, url })
        .policy(live)
        .metrics_prefix(prefix)
        .build()?)
}

/// The keys whose values differ between two policies, as `key = value`
/// with the new value (`key removed` when the new policy lacks it), sorted
/// by key (keys removed last); dotted paths as in a policy file
/// (`admission.enabled`, `models."name".max_rounds`).
pub fn changed_keys(old: &Policy, new: &Policy) -> Vec<String> {
    fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
        match value {
            toml::Value::Table(table) => {
                for (k, v) in table {
                    let plain = !k.is_empty()
                        && k.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                    let k = if plain { k.clone() } else { format!("{k:?}") };
                    let key = if prefix.is_empty() {
                        k
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_owned(), other.to_string());
            }
        }
    }
    let flat = |p: &Policy| {
        let mut out = BTreeMap::new();
        if let Ok(v) = toml::Value::try_from(p) {
            flatten("", &v, &mut out);
        }
        out
    };
    let (old, new) = (flat(old), flat(new));
    let mut changed: Vec<String> = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k} = {v}"))
        .collect();
    changed.extend(
        old.keys()
            .filter(|k| !new.contains_key(*k))
            .map(|k| format!("{k} removed")),
    );
    changed
}

/// Follows the watcher's counts while the demo runs: each reload applied
/// or refused becomes a [`ReloadEvent`], printed above the progress bar.
struct ReloadFollower {
    status: Arc<ReloadStatus>,
    live: LivePolicy,
    epoch: Instant,
    bar: ProgressBar,
    start: ReloadCounts,
    seen: ReloadCounts,
    in_force: Policy,
    events: Vec<ReloadEvent>,
}

impl ReloadFollower {
    fn check(&mut self) {
        let now = self.status.counts();
        if now == self.seen {
            return;
        }
        let at = Instant::now().saturating_duration_since(self.epoch);
        let mut new = Vec::new();
        if now.applied > self.seen.applied {
            let policy = self.live.load().policy().clone();
            let changed = changed_keys(&self.in_force, &policy);
            let detail = if changed.is_empty() {
                "no value changed".to_owned()
            } else {
                changed.join(", ")
            };
            self.in_force = policy;
            new.push(ReloadEvent {
                at,
                result: "applied",
                detail,
            });
        }
        if now.rejected > self.seen.rejected {
            let detail = self
                .status
                .last_error()
                .map_or_else(|| "the file was refused".to_owned(), |e| e.to_string());
            new.push(ReloadEvent {
                at,
                result: "refused",
                detail,
            });
        } else if now.unchanged > self.seen.unchanged
            && self.events.last().is_some_and(|e| e.result == "refused")
            && self.status.last_error().is_none()
        {
            new.push(ReloadEvent {
                at,
                result: "valid_again",
                detail: String::new(),
            });
        }
        self.seen = now;
        for event in new {
            self.bar.suspend(|| eprintln!("{event}"));
            self.events.push(event);
        }
    }

    fn summary(mut self, path: &std::path::Path) -> ReloadSummary {
        self.check();
        ReloadSummary {
            path: path.display().to_string(),
            // the watcher counts the load at start as applied
            applied: self.seen.applied.saturating_sub(self.start.applied),
            unchanged: self.seen.unchanged.saturating_sub(self.start.unchanged),
            refused: self.seen.rejected.saturating_sub(self.start.rejected),
            last_error: self.status.last_error().map(|e| e.to_string()),
            events: self.events,
        }
    }
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
    let (report, reason) = match result {
        Ok(served) => (served.report, None),
        Err(e) => (e.report, Some(e.reason.as_str())),
    };
    Sample::from_report(id, sent, latency, &report, reason)
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
    // The retrying side's policy: the file's, followed, or the one given.
    let (live, watcher) = match &config.policy_file {
        Some(path) => {
            let live = LivePolicy::default();
            let watcher = PolicyWatcher::start(path, live.clone(), ReloadOptions::default())?;
            (live, Some(watcher))
        }
        None => {
            // The cap applies to the policy in force too: the pool reads
            // `timeouts.connect` as the end of an attempt's connect phase
            // (an admission slot is held that long at most), and must
            // agree with the client.
            let mut policy = config.policy.clone();
            policy.timeouts.connect = policy.timeouts.connect.min(config.connect_timeout);
            (LivePolicy::new(policy)?, None)
        }
    };
    // Counts first: a reload between the two reads is then reported (as
    // changing nothing), never lost.
    let start_counts = watcher
        .as_ref()
        .map(PolicyWatcher::counts)
        .unwrap_or_default();
    let initial = live.load().policy().clone();
    let baseline_live = LivePolicy::new(baseline_policy(&initial))?;
    // One client per side, built from the policy at start: a reload does
    // not rebuild it.
    let base_client = client(&initial.timeouts, config.connect_timeout)?;
    let retry_client = client(&initial.timeouts, config.connect_timeout)?;

    let epoch = Instant::now() + Duration::from_millis(300);
    let base_server = FaultServer::start(schedule.clone(), epoch).await?;
    let retry_server = FaultServer::start(schedule.clone(), epoch).await?;
    let baseline = Arc::new(build_pool(
        baseline_live,
        base_client,
        base_server.url(),
        "retryctl_baseline_",
    )?);
    let retrying = Arc::new(build_pool(
        live.clone(),
        retry_client,
        retry_server.url(),
        retryctl::telemetry::DEFAULT_PREFIX,
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
    let traffic_done = Arc::new(AtomicBool::new(false));
    let follower = watcher.as_ref().map(|w| {
        let mut follower = ReloadFollower {
            status: w.status(),
            live: live.clone(),
            epoch,
            bar: bar.clone(),
            start: start_counts,
            seen: start_counts,
            in_force: initial.clone(),
            events: Vec::new(),
        };
        let done = traffic_done.clone();
        tokio::spawn(async move {
            while !done.load(Ordering::Acquire) {
                tokio::time::sleep(RELOAD_POLL).await;
                follower.check();
            }
            follower
        })
    });
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
    traffic_done.store(true, Ordering::Release);
    if let (Some(follower), Some(watcher)) = (follower, watcher) {
        if let Ok(follower) = follower.await {
            sides.1.reloads = Some(follower.summary(watcher.path()));
        }
        // Dropping the watcher joins its threads: not on a runtime worker.
        let _ = tokio::task::spawn_blocking(move || drop(watcher)).await;
    }
    sides.0.samples.sort_by_key(|s| s.id);
    sides.1.samples.sort_by_key(|s| s.id);
    sides.0.upstream_accepted = base_server.counters().accepted.load(Ordering::Relaxed);
    sides.1.upstream_accepted = retry_server.counters().accepted.load(Ordering::Relaxed);
    Ok(sides)
}

#[cfg(test)]
mod tests {
    use super::*;
    use retryctl::FailedAttempt;
    use retryctl::Verdict;

    fn failed(class: Classification, cause: Cause, round: u32, probe: bool) -> FailedAttempt {
        FailedAttempt {
            provider: "proxy",
            round,
            verdict: Verdict::new(class, cause),
            elapsed: Duration::from_millis(1),
            probe,
        }
    }

    fn refused(round: u32, probe: bool) -> FailedAttempt {
        failed(
            Classification::Transient,
            Cause::ConnectRefused,
            round,
            probe,
        )
    }

    fn sample(attempts: u32, rounds: u32, failures: Vec<FailedAttempt>, ok: bool) -> Sample {
        let report = Report {
            attempts,
            rounds,
            retries: attempts.saturating_sub(1),
            queued: Duration::from_millis(u64::from(attempts) * 10),
            failures,
            ..Report::default()
        };
        let reason = (!ok).then_some("rounds_exhausted");
        Sample::from_report(7, Duration::ZERO, Duration::from_millis(3), &report, reason)
    }

    #[test]
    fn wasted_counts_failed_retries_and_failed_probes_not_the_first_attempt() {
        let s = sample(1, 1, vec![], true);
        assert_eq!((s.wasted, s.any_attempt_failed()), (0, false));

        // re-attempted within round 1 (the admission gate): failed, then served
        let s = sample(2, 1, vec![refused(1, false)], true);
        assert!(s.ok && s.any_attempt_failed(), "{s:?}");
        assert_eq!(s.wasted, 0, "the first attempt is not wasted");
        assert_eq!(s.first_failure, Some(Cause::ConnectRefused));
        assert_eq!(s.queued, Duration::from_millis(20));

        // a failed probe is wasted even as the request's first attempt
        let s = sample(2, 1, vec![refused(1, true)], true);
        assert_eq!(s.wasted, 1);

        // first, a failed probe, a failed retry, then failed for good
        let s = sample(
            3,
            2,
            vec![refused(1, false), refused(1, true), refused(2, false)],
            false,
        );
        assert_eq!(s.wasted, 2, "a failed probe that is a retry counts once");
        assert!(!s.ok && s.any_attempt_failed());

        // failed without any attempt (e.g. an admission timeout)
        let s = sample(0, 1, vec![], false);
        assert!(s.any_attempt_failed());
        assert_eq!(s.wasted, 0);
    }

    #[test]
    fn a_client_error_followed_by_another_attempt_is_flagged() {
        let client = || failed(Classification::Permanent, Cause::ClientError, 1, false);
        assert!(!sample(1, 1, vec![client()], false).retried_client_error);
        let s = sample(2, 1, vec![client(), refused(1, false)], false);
        assert!(s.retried_client_error, "{s:?}");
        let s = sample(3, 2, vec![refused(1, false), client()], true);
        assert!(s.retried_client_error, "{s:?}");
        let s = sample(2, 2, vec![refused(1, false), client()], false);
        assert!(!s.retried_client_error, "{s:?}");
    }

    #[test]
    fn the_baseline_has_one_round_and_no_gate_whatever_the_policy_says() {
        let mut policy = Policy::from_toml(
            "max_rounds = 3\n[admission]\nenabled = true\n\
             [models.\"openai/gpt-oss-120b\"]\nmax_rounds = 4\n\
             [models.\"openai/gpt-oss-120b\".admission]\nenabled = true\nmax_wait = \"2s\"\n",
        )
        .unwrap();
        policy.jitter = 0.1;
        let baseline = baseline_policy(&policy);
        baseline.validate().unwrap();
        for resolved in [baseline.clone(), baseline.resolve(MODEL)] {
            assert_eq!(resolved.max_rounds, 1);
            assert!(!resolved.admission.enabled);
        }
        assert_eq!(
            baseline.resolve(MODEL).admission.max_wait,
            Duration::from_secs(2)
        );
        assert_eq!(baseline.jitter, 0.1, "the rest is the policy's");
        assert!(!baseline_policy(&Policy::default()).admission.enabled);
    }

    #[test]
    fn changed_keys_name_each_changed_value_with_its_table() {
        let old = Policy::default();
        let new = Policy::from_toml(
            "max_rounds = 3\n[admission]\nenabled = false\n\
             [models.\"openai/gpt-oss-120b\"]\njitter = 0.0\n",
        )
        .unwrap();
        assert_eq!(
            changed_keys(&old, &new),
            [
                "admission.enabled = false",
                "max_rounds = 3",
                "models.\"openai/gpt-oss-120b\".jitter = 0.0"
            ]
        );
        assert_eq!(
            changed_keys(&new, &old),
            [
                "admission.enabled = true",
                "max_rounds = 2",
                "models.\"openai/gpt-oss-120b\".jitter removed"
            ]
        );
        assert!(changed_keys(&old, &old).is_empty());
    }
}
