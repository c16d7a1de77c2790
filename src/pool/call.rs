//! `Pool::call`: rounds over the providers with exact accounting.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use smallvec::SmallVec;
use tokio::time::Instant;
use tokio::time::error::Elapsed;

use super::order::ProbeGuard;
use super::outcome::{AttemptError, FailReason, FailedAttempt, PoolError, Report, Served};
use super::shadow::{Ended, ShadowCall};
use super::{Model, Pool};
use crate::classify::{Cause, Classification, Classify, Verdict};
use crate::health::HealthEvent;
use crate::live::ModelPolicy;
use crate::policy::Policy;
use crate::telemetry::Skip;

/// Per-call options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallOptions {
    /// An absolute deadline for the whole call.
    pub deadline: Option<Instant>,
    /// A time limit for the whole call, from its start (used when
    /// `deadline` is unset). Default: the policy's `timeouts.request`.
    pub timeout: Option<Duration>,
}

impl CallOptions {
    /// Options with an absolute deadline.
    pub fn deadline(deadline: Instant) -> Self {
        CallOptions {
            deadline: Some(deadline),
            timeout: None,
        }
    }

    /// Options with a time limit from the call's start.
    pub fn timeout(timeout: Duration) -> Self {
        CallOptions {
            deadline: None,
            timeout: Some(timeout),
        }
    }
}

/// The mutable state of one request.
struct Request<'a, E> {
    model: &'a str,
    /// Providers whose failure was already counted against their health.
    counted: u64,
    report: Report,
    last: Option<AttemptError<E>>,
    probe: Option<ProbeGuard<'a>>,
    /// With a `[shadow]` candidate: what it needs when the request ends.
    shadow: Option<ShadowCall>,
}

/// How one attempt ended.
enum Attempted<T> {
    /// Success, when the attempt ended and how long it took.
    Served(T, Instant, Duration),
    /// Failure, and when the attempt ended.
    Failed(Verdict, Instant),
    /// The call's deadline ended the attempt.
    Expired,
    /// The deadline had passed before the attempt could start.
    NotStarted,
}

/// A provider to retry in the next round, and the wait it needs.
#[derive(Clone, Copy)]
struct Retry {
    index: u8,
    wait: Duration,
}

/// `base x backoff^(retry - 1)`, capped.
pub(super) fn backoff(base: Duration, factor: f64, retry: u32, cap: Duration) -> Duration {
    let scaled = base.as_secs_f64() * factor.powi(retry.saturating_sub(1).min(64) as i32);
    if !scaled.is_finite() || scaled >= cap.as_secs_f64() {
        cap
    } else {
        Duration::from_secs_f64(scaled)
    }
}

/// Spreads `wait` uniformly over `wait x (1 +/- jitter)`.
fn jittered(wait: Duration, jitter: f64) -> Duration {
    if jitter <= 0.0 || wait.is_zero() {
        return wait;
    }
    let factor = 1.0 + jitter * (2.0 * fastrand::f64() - 1.0);
    wait.mul_f64(factor.max(0.0))
}

/// The waits before retry number `retry` (1-based) of the given providers,
/// in the order they become due; providers whose Retry-After exceeds the
/// policy's cap are left out and reported. `learned` gives a transient
/// provider's own delay (`delay = "auto"`); without one, transient
/// providers share one wait.
fn schedule(
    policy: &Policy,
    retry: u32,
    pending: &[(u8, Classification)],
    learned: &dyn Fn(u8) -> Option<Duration>,
) -> (SmallVec<[Retry; 8]>, Option<Duration>) {
    let transient = jittered(
        backoff(policy.base_delay(), policy.backoff, retry, policy.max_delay),
        policy.jitter,
    );
    let mut too_long = None;
    let mut out: SmallVec<[Retry; 8]> = SmallVec::new();
    for &(index, class) in pending {
        let wait = match class {
            Classification::RateLimited { retry_after } => {
                if let Some(ra) = retry_after.filter(|ra| *ra > policy.max_retry_after) {
                    too_long = Some(ra);
                    continue;
                }
                let own = jittered(
                    backoff(
                        policy.rate_limited_delay,
                        policy.backoff,
                        retry,
                        policy.max_retry_after,
                    ),
                    policy.jitter,
                );
                own.max(retry_after.unwrap_or_default())
            }
            _ => match learned(index) {
                Some(base) => jittered(
                    backoff(base, policy.backoff, retry, policy.max_delay),
                    policy.jitter,
                ),
                None => transient,
            },
        };
        out.push(Retry { index, wait });
    }
    // Stable: equal waits keep the round's provider order.
    out.sort_by_key(|r| r.wait);
    (out, too_long)
}

impl<P> Pool<P> {
    /// Calls `op` with a provider of `model` until it succeeds or the policy
    /// says stop. See the [module docs](crate::pool) for the exact rules.
    pub async fn call<T, E, F, Fut>(&self, model: &str, op: F) -> Result<Served<T>, PoolError<E>>
    where
        F: FnMut(&P) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: Classify + std::fmt::Display,
    {
        self.call_with(model, CallOptions::default(), op).await
    }

    /// [`Pool::call`] with a per-call deadline.
    pub async fn call_with<T, E, F, Fut>(
        &self,
        model: &str,
        options: CallOptions,
        mut op: F,
    ) -> Result<Served<T>, PoolError<E>>
    where
        F: FnMut(&P) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: Classify + std::fmt::Display,
    {
        let Some(m) = self.model(model) else {
            self.unknown_model.increment(1);
            let mut name = model.to_owned();
            if name.len() > 128 {
                let mut cut = 128;
                while !name.is_char_boundary(cut) {
                    cut -= 1;
                }
                name.truncate(cut);
            }
            return Err(PoolError {
                reason: FailReason::UnknownModel { model: name },
                last: None,
                report: Report::default(),
            });
        };
        // One snapshot for the whole request, resolved for this model.
        let active = self.policy.snapshot();
        self.note_version(active.version());
        let resolved = active.for_model(m.name);
        let policy = resolved.policy();
        let start = Instant::now();
        let deadline = options
            .deadline
            .or_else(|| options.timeout.and_then(|t| start.checked_add(t)))
            .or_else(|| start.checked_add(policy.timeouts.request))
            .unwrap_or(start + Duration::from_secs(86_400));
        let adaptive = &policy.adaptive;
        if adaptive.budget {
            let scale = m.budget.scale(
                start,
                &policy.budget,
                adaptive.budget_min_success,
                adaptive.budget_min_retries,
            );
            m.budget.deposit_scaled(start, &policy.budget, scale);
            m.metrics.budget_scale(scale);
        } else {
            m.budget.deposit(start, &policy.budget);
        }
        let (order, probe) = m.plan(start, adaptive);
        let mut req = Request {
            model: m.name,
            counted: 0,
            report: Report::default(),
            last: None,
            probe,
            shadow: ShadowCall::start(m, &active, resolved, start, deadline),
        };

        // Round 1: every provider once, no waiting between them.
        req.report.rounds = 1;
        let mut pending: SmallVec<[(u8, Classification); 8]> = SmallVec::new();
        // The latest clock reading: each attempt's end is the next step's
        // "now" (the bookkeeping between them takes microseconds), so a
        // call reads the clock once per attempt, plus once per wait.
        let mut latest = start;
        for (k, &i) in order.iter().enumerate() {
            match attempt(m, i, 1, latest, deadline, &mut op, resolved, &mut req).await {
                Attempted::Served(value, ended, took) => {
                    // The first attempt started at `start`: its duration
                    // is the request's.
                    let elapsed = if k == 0 {
                        took
                    } else {
                        ended.saturating_duration_since(start)
                    };
                    return Ok(served(m, i, order[0] != i, value, req, elapsed));
                }
                Attempted::Failed(v, ended) => {
                    latest = ended;
                    match v.class {
                        Classification::Permanent => {
                            return Err(fail(m, req, FailReason::Permanent, start));
                        }
                        c if c.is_retryable() => pending.push((i, c)),
                        _ => {}
                    }
                }
                Attempted::Expired | Attempted::NotStarted => {
                    return Err(fail(
                        m,
                        req,
                        FailReason::DeadlineExceeded { wait: None },
                        start,
                    ));
                }
            }
        }

        // Further rounds over the providers whose own error was retryable.
        let mut round = 1;
        let mut stopped: Option<FailReason> = None;
        loop {
            let round_end = latest;
            if pending.is_empty() {
                let reason = stopped.take().unwrap_or(FailReason::NotRetryable);
                return Err(fail(m, req, reason, start));
            }
            if round >= policy.max_rounds {
                return Err(fail(m, req, FailReason::RoundsExhausted, start));
            }
            let learned = |i: u8| m.learned_delay(i, policy, round_end);
            let (plan, too_long) = schedule(policy, round, &pending, &learned);
            if let Some(retry_after) = too_long {
                m.metrics.skipped(Skip::RetryAfter);
                stopped = Some(FailReason::RetryAfterTooLong { retry_after });
            }
            round += 1;
            pending.clear();
            if let Some(first) = plan.first() {
                tracing::info!(
                    target: "retryctl",
                    model = req.model,
                    round,
                    attempts = req.report.attempts,
                    providers = plan.len(),
                    delay_ms = first.wait.as_millis() as u64,
                    "retrying after transient failure"
                );
            }
            let mut started_round = false;
            for r in &plan {
                // Not before now: an earlier retry of this round may have used
                // the time up to (or past) this one's planned start.
                let ready = (round_end + r.wait).max(latest);
                if ready >= deadline {
                    tracing::info!(
                        target: "retryctl",
                        model = req.model,
                        wait_ms = r.wait.as_millis() as u64,
                        left_ms = deadline.saturating_duration_since(round_end).as_millis() as u64,
                        "retry skipped: the wait would pass the deadline"
                    );
                    m.metrics.skipped(Skip::Deadline);
                    stopped = Some(FailReason::DeadlineExceeded { wait: Some(r.wait) });
                    break;
                }
                if let Some(p50) = cannot_finish(m, r.index, policy, round_end, ready, deadline) {
                    tracing::info!(
                        target: "retryctl",
                        model = req.model,
                        provider = m.routes[r.index as usize].name,
                        wait_ms = r.wait.as_millis() as u64,
                        p50_ms = p50.as_millis() as u64,
                        "retry skipped: it could not finish before the deadline"
                    );
                    m.metrics.skipped(Skip::DeadlinePredicted);
                    stopped = Some(FailReason::RetryCannotFinish { wait: r.wait, p50 });
                    continue;
                }
                if !m.budget.withdraw(latest, &policy.budget) {
                    tracing::warn!(
                        target: "retryctl",
                        model = req.model,
                        attempts = req.report.attempts,
                        "retry refused by the retry budget"
                    );
                    m.metrics.skipped(Skip::Budget);
                    stopped = Some(FailReason::BudgetExhausted);
                    break;
                }
                if let Some(shadow) = &mut req.shadow {
                    shadow.charge(m, round);
                }
                if !started_round {
                    req.report.rounds = round;
                    started_round = true;
                }
                let before = latest;
                if ready > before {
                    tokio::time::sleep_until(ready).await;
                    latest = Instant::now();
                    req.report.waited += latest - before;
                    m.metrics.retry_delay(latest - before);
                }
                match attempt(
                    m, r.index, round, latest, deadline, &mut op, resolved, &mut req,
                )
                .await
                {
                    Attempted::Served(value, ended, _) => {
                        let fell_back = order[0] != r.index;
                        let elapsed = ended.saturating_duration_since(start);
                        return Ok(served(m, r.index, fell_back, value, req, elapsed));
                    }
                    Attempted::Failed(v, ended) => {
                        latest = ended;
                        match v.class {
                            Classification::Permanent => {
                                return Err(fail(m, req, FailReason::Permanent, start));
                            }
                            c if c.is_retryable() => pending.push((r.index, c)),
                            _ => {}
                        }
                    }
                    Attempted::Expired => {
                        let reason = FailReason::DeadlineExceeded { wait: None };
                        return Err(fail(m, req, reason, start));
                    }
                    Attempted::NotStarted => {
                        // The wait ended at the deadline (timers round up to
                        // the millisecond). The retry it paid for stays paid:
                        // like one cancelled during its wait, it is counted.
                        let reason = FailReason::DeadlineExceeded { wait: None };
                        return Err(fail(m, req, reason, start));
                    }
                }
            }
            if !started_round {
                let reason = stopped.take().unwrap_or(FailReason::NotRetryable);
                return Err(fail(m, req, reason, start));
            }
        }
    }
}

/// Runs `fut` until `deadline`. The timer is armed only if the first poll
/// does not finish the operation: arming it costs a runtime-handle clone
/// and a timer-wheel entry, which an operation that completes at once (a
/// cached answer, a local call) should not pay. The future is polled where
/// the caller pinned it, never moved: an HTTP client's request future is
/// over a kilobyte, and every move is a `memcpy` on every request.
async fn limited<F: Future>(deadline: Instant, mut fut: Pin<&mut F>) -> Result<F::Output, Elapsed> {
    let first = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
    match first {
        Poll::Ready(output) => Ok(output),
        Poll::Pending => tokio::time::timeout_at(deadline, fut).await,
    }
}

/// With `adaptive.deadline_aware`: `Some(p50)` when a retry of provider
/// `i` that starts at `ready` would, at the provider's recent median
/// attempt latency, end past the deadline. With too few samples, `None`
/// (the fixed rule, the wait alone, already applied).
fn cannot_finish<P>(
    m: &Model<P>,
    i: u8,
    policy: &Policy,
    now: Instant,
    ready: Instant,
    deadline: Instant,
) -> Option<Duration> {
    if !policy.adaptive.deadline_aware {
        return None;
    }
    let route = &m.routes[i as usize];
    let (p50, _) = route
        .stats
        .recent_latency(now, policy.adaptive.min_samples)?;
    (ready + p50 > deadline).then_some(p50)
}

/// With `adaptive.attempt_timeout`: the attempt limit derived from the
/// provider's recent p99, when there are enough samples.
fn adaptive_limit<P>(route: &super::Route<P>, policy: &Policy, now: Instant) -> Option<Duration> {
    let a = &policy.adaptive;
    if !a.attempt_timeout {
        return None;
    }
    let (_, p99) = route.stats.recent_latency(now, a.min_samples)?;
    Some(
        p99.mul_f64(a.attempt_timeout_factor)
            .clamp(a.attempt_timeout_min, a.attempt_timeout_max),
    )
}

/// Runs one attempt under the attempt's time limit, records its outcome in
/// the request's accounting and in the provider's health.
#[allow(clippy::too_many_arguments)]
async fn attempt<'a, P, T, E, F, Fut>(
    m: &'a Model<P>,
    i: u8,
    round: u32,
    now: Instant,
    deadline: Instant,
    op: &mut F,
    active: &ModelPolicy,
    req: &mut Request<'a, E>,
) -> Attempted<T>
where
    F: FnMut(&P) -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Classify,
{
    let policy = active.policy();
    let route = &m.routes[i as usize];
    if now >= deadline {
        return Attempted::NotStarted;
    }
    // Instants, not durations: an `Instant` sum is cheaper than the
    // subtraction a remaining-time `Duration` needs, and the limit as a
    // duration is only needed when the attempt times out.
    let fixed = now
        .checked_add(policy.timeouts.attempt)
        .map_or(deadline, |end| end.min(deadline));
    let adaptive = adaptive_limit(route, policy, now)
        .and_then(|a| now.checked_add(a))
        .filter(|end| *end < fixed);
    let until = adaptive.unwrap_or(fixed);
    req.report.attempts += 1;
    if round > 1 {
        req.report.retries += 1;
        m.metrics.retry();
    }
    let was_probe = req.probe.as_ref().is_some_and(|g| g.index == i);
    let fut = std::pin::pin!(op(&route.provider));
    let result = limited(until, fut).await;
    let (verdict, expired) = match result {
        Ok(Ok(value)) => {
            let ended = Instant::now();
            if round > 1 {
                m.budget.record_retry(ended, &policy.budget, true);
            }
            let elapsed = ended.saturating_duration_since(now);
            route.stats.record(ended, elapsed, None);
            route.metrics.attempt(None, elapsed);
            route.record_recovery(policy, ended, None);
            m.resolve_shadow(i, now, None);
            if was_probe {
                req.probe = None;
            }
            if route.health.on_success() == HealthEvent::Recovered {
                route.metrics.recovered();
                tracing::info!(
                    target: "retryctl",
                    model = req.model,
                    provider = route.name,
                    probe = was_probe,
                    "provider recovered"
                );
            }
            return Attempted::Served(value, ended, elapsed);
        }
        Ok(Err(e)) => {
            let v = e.classify(active.rules());
            req.last = Some(AttemptError::Upstream(e));
            (v, false)
        }
        Err(_) => {
            let limit = until.saturating_duration_since(now);
            req.last = Some(AttemptError::TimedOut(limit));
            if adaptive.is_some() {
                // Far beyond this provider's usual answer time: most likely
                // a stalled connection, worth retrying.
                let v = Verdict::new(Classification::Transient, Cause::AdaptiveTimeout);
                (v, false)
            } else {
                (
                    active.rules().response_timeout(),
                    limit < policy.timeouts.attempt,
                )
            }
        }
    };
    let ended = Instant::now();
    if round > 1 {
        m.budget.record_retry(ended, &policy.budget, false);
    }
    let elapsed = ended.saturating_duration_since(now);
    route.stats.record(ended, elapsed, Some(verdict.cause));
    route.metrics.attempt(Some(verdict.cause), elapsed);
    route.record_recovery(policy, ended, Some(verdict.class));
    m.resolve_shadow(i, now, Some(verdict.class));
    req.report.failures.push(FailedAttempt {
        provider: route.name,
        round,
        verdict,
        elapsed,
        probe: false,
    });
    tracing::debug!(
        target: "retryctl",
        model = req.model,
        provider = route.name,
        round,
        cause = verdict.cause.as_str(),
        "attempt failed"
    );
    // A deadline cut says nothing about the provider; neither does a
    // client error. Each provider counts at most once per request.
    let bit = 1u64 << i;
    if !expired
        && verdict.class != Classification::Permanent
        && verdict.cause.is_provider_fault()
        && req.counted & bit == 0
    {
        req.counted |= bit;
        match route.health.on_failure(ended, &policy.health, was_probe) {
            HealthEvent::Demoted => {
                route.metrics.demoted();
                tracing::warn!(
                target: "retryctl",
                model = req.model,
                provider = route.name,
                after = policy.health.demote_after,
                "provider demoted after consecutive failed requests"
                )
            }
            HealthEvent::ProbeFailed => tracing::info!(
                target: "retryctl",
                model = req.model,
                provider = route.name,
                "probe of demoted provider failed"
            ),
            HealthEvent::Unchanged | HealthEvent::Recovered => {}
        }
    }
    if was_probe {
        req.probe = None;
    }
    if expired {
        Attempted::Expired
    } else {
        Attempted::Failed(verdict, ended)
    }
}

fn served<P, T, E>(
    m: &Model<P>,
    i: u8,
    fell_back: bool,
    value: T,
    mut req: Request<'_, E>,
    elapsed: Duration,
) -> Served<T> {
    req.report.elapsed = elapsed;
    let r = &req.report;
    m.metrics.served(r.rounds, r.attempts, r.elapsed, fell_back);
    if let Some(shadow) = &req.shadow {
        shadow.observe(m, r, Ended::Served(i));
    }
    Served {
        value,
        provider: m.routes[i as usize].name,
        fell_back,
        report: req.report,
    }
}

fn fail<P, E: std::fmt::Display>(
    m: &Model<P>,
    mut req: Request<'_, E>,
    reason: FailReason,
    start: Instant,
) -> PoolError<E> {
    req.report.elapsed = Instant::now().saturating_duration_since(start);
    let r = &req.report;
    m.metrics
        .failed(reason.as_str(), r.rounds, r.attempts, r.elapsed);
    if let Some(shadow) = &req.shadow {
        shadow.observe(m, r, Ended::Failed(&reason));
    }
    let level_warn = !matches!(reason, FailReason::Permanent);
    let last = req.last.as_ref().map(|e| e.to_string()).unwrap_or_default();
    if level_warn {
        tracing::warn!(
            target: "retryctl",
            model = req.model,
            attempts = req.report.attempts,
            rounds = req.report.rounds,
            reason = reason.as_str(),
            elapsed_ms = req.report.elapsed.as_millis() as u64,
            last_error = %last,
            "all providers failed"
        );
    } else {
        tracing::debug!(
            target: "retryctl",
            model = req.model,
            attempts = req.report.attempts,
            last_error = %last,
            "request rejected by the upstream (not retried)"
        );
    }
    PoolError {
        reason,
        last: req.last,
        report: req.report,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let s = Duration::from_millis(500);
        let cap = Duration::from_secs(4);
        let waits: Vec<_> = (1..=5).map(|r| backoff(s, 2.0, r, cap)).collect();
        assert_eq!(
            waits,
            [500, 1000, 2000, 4000, 4000]
                .map(Duration::from_millis)
                .to_vec()
        );
    }

    #[test]
    fn jitter_stays_in_band() {
        let d = Duration::from_millis(500);
        for _ in 0..1000 {
            let j = jittered(d, 0.2);
            assert!(j >= Duration::from_millis(400) && j <= Duration::from_millis(600));
        }
        assert_eq!(jittered(d, 0.0), d);
    }

    #[test]
    fn schedule_honours_retry_after_and_drops_excessive_ones() {
        let policy = Policy {
            jitter: 0.0,
            ..Policy::default()
        };
        let pending = [
            (
                0,
                Classification::RateLimited {
                    retry_after: Some(Duration::from_secs(3)),
                },
            ),
            (1, Classification::Transient),
            (
                2,
                Classification::RateLimited {
                    retry_after: Some(Duration::from_secs(600)),
                },
            ),
            (3, Classification::RateLimited { retry_after: None }),
        ];
        let (plan, too_long) = schedule(&policy, 1, &pending, &|_| None);
        let got: Vec<_> = plan.iter().map(|r| (r.index, r.wait.as_millis())).collect();
        assert_eq!(got, vec![(1, 500), (3, 1000), (0, 3000)]);
        assert_eq!(too_long, Some(Duration::from_secs(600)));
    }
}
