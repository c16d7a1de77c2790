//! The invariants, checked after a run against the providers' own log.
//!
//! Time is paused and every duration the test chooses is a whole number
//! of milliseconds (the tokio timer's resolution), so instants compare
//! exactly: an attempt's duration is the time between the two clock
//! readings the pool and the provider both take, with nothing in between.

use std::collections::BTreeMap;
use std::time::Duration;

use retryctl::{Cause, FailReason, Policy, Report, RetryBudget};
use tokio::time::Instant;

use crate::provider::{Kind, Seen};

macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+));
        }
    };
}

/// How a call that was not cancelled ended.
#[derive(Debug)]
pub enum Outcome {
    Served {
        provider: &'static str,
        value: usize,
        fell_back: bool,
        report: Report,
    },
    Failed {
        reason: FailReason,
        report: Report,
    },
}

impl Outcome {
    pub fn report(&self) -> &Report {
        match self {
            Outcome::Served { report, .. } | Outcome::Failed { report, .. } => report,
        }
    }
}

/// One call as the test drove it.
#[derive(Debug)]
pub struct CallRecord {
    pub id: u32,
    /// When the pool was called (the pool reads the clock at the same
    /// instant: nothing awaits in between).
    pub start: Instant,
    /// When the call returned or was cancelled.
    pub end: Instant,
    /// `CallOptions::timeout`.
    pub timeout: Duration,
    /// `None`: cancelled by the caller's `tokio::time::timeout`.
    pub outcome: Option<Outcome>,
}

/// Calls started together (one, or a few concurrently), and what the pool
/// showed before and after them.
#[derive(Debug)]
pub struct Batch {
    pub calls: Vec<u32>,
    /// `consecutive_failures` per provider.
    pub health_before: Vec<u32>,
    pub health_after: Vec<u32>,
    /// `Pool::budget_available` right after the batch, and when.
    pub budget_available: f64,
    pub at: Instant,
}

/// Everything one property case produced.
#[derive(Debug)]
pub struct Run {
    pub policy: Policy,
    pub names: Vec<String>,
    /// When the pool (and so its retry budget) was built.
    pub origin: Instant,
    pub log: Vec<Seen>,
    pub calls: Vec<CallRecord>,
    pub batches: Vec<Batch>,
    pub demotions: u64,
    pub recoveries: u64,
}

/// What the cases exercised, to show the properties are not vacuous.
#[derive(Debug, Default)]
pub struct Coverage {
    pub cases: u64,
    pub calls: u64,
    pub concurrent_calls: u64,
    pub served: u64,
    pub served_after_retry: u64,
    pub cancelled: u64,
    pub cancelled_in_wait: u64,
    pub reasons: BTreeMap<&'static str, u64>,
    pub retries: u64,
    pub demotions: u64,
    pub recoveries: u64,
    /// Retries paid for but never made (see
    /// `a_retry_past_the_deadline_spends_no_budget`).
    pub paid_not_made: u64,
}

impl Coverage {
    pub fn reason(&self, name: &str) -> u64 {
        self.reasons.get(name).copied().unwrap_or(0)
    }
}

/// Whether a failed attempt counts against the provider's health: a
/// provider fault that returned, or the attempt timer (not the deadline
/// or a cancellation) cutting it.
fn counts_against_health(a: &Seen, attempt_timeout: Duration) -> bool {
    if a.returned {
        a.step
            .kind
            .cause()
            .is_some_and(|c| c.is_provider_fault() && c != Cause::ClientError)
    } else {
        a.elapsed() == attempt_timeout
    }
}

/// The retries a call withdrew from the budget, by time: one per retry
/// attempt (withdrawn when the previous attempt ended, in the same poll),
/// plus one the call paid for and never made (`extra`).
fn withdrawals(atts: &[&Seen], rounds: &[u32], extra: bool) -> Vec<Instant> {
    let mut out: Vec<Instant> = (1..atts.len())
        .filter(|&k| rounds[k] >= 2)
        .map(|k| atts[k - 1].end.expect("ended"))
        .collect();
    if extra {
        out.push(atts.last().and_then(|a| a.end).expect("an attempt"));
    }
    out
}

pub fn check(run: &Run, coverage: &mut Coverage) -> Result<(), String> {
    let policy = &run.policy;
    let n = run.names.len();
    let attempt_timeout = policy.timeouts.attempt;
    let mut deposits: BTreeMap<u32, Instant> = BTreeMap::new();
    let mut withdrawn: BTreeMap<u32, Vec<Instant>> = BTreeMap::new();
    coverage.cases += 1;
    coverage.demotions += run.demotions;
    coverage.recoveries += run.recoveries;
    coverage.concurrent_calls += run
        .batches
        .iter()
        .filter(|b| b.calls.len() > 1)
        .map(|b| b.calls.len() as u64)
        .sum::<u64>();

    for c in &run.calls {
        let id = c.id;
        coverage.calls += 1;
        deposits.insert(id, c.start);
        let deadline = c.start + c.timeout;
        let atts: Vec<&Seen> = run.log.iter().filter(|s| s.call == id).collect();
        // The round of each attempt, from the provider's side: the pool
        // tries each provider once per round, every provider in round 1.
        let mut per_provider = vec![0u32; n];
        let rounds: Vec<u32> = atts
            .iter()
            .map(|a| {
                per_provider[a.provider] += 1;
                per_provider[a.provider]
            })
            .collect();
        let max_round = rounds.iter().copied().max().unwrap_or(0);
        let distinct = per_provider.iter().filter(|&&k| k > 0).count();

        ensure!(!atts.is_empty(), "call {id}: no attempt at all");
        for (k, a) in atts.iter().enumerate() {
            ensure!(
                a.end.is_some(),
                "call {id}: attempt {k} still in flight after the call ended"
            );
            ensure!(
                a.start >= c.start && a.end.unwrap() <= c.end,
                "call {id}: attempt {k} outside the call"
            );
            ensure!(
                a.start < deadline,
                "call {id}: attempt {k} started at or after the deadline"
            );
            ensure!(
                a.elapsed() <= attempt_timeout,
                "call {id}: attempt {k} ran {:?}, past timeouts.attempt {attempt_timeout:?}",
                a.elapsed()
            );
            if a.returned {
                ensure!(
                    a.elapsed() == Duration::from_millis(a.step.delay_ms),
                    "call {id}: attempt {k} returned after {:?}, scripted {} ms",
                    a.elapsed(),
                    a.step.delay_ms
                );
            }
            if a.returned && a.step.kind == Kind::Status400 {
                ensure!(
                    k + 1 == atts.len(),
                    "call {id}: a 400 (attempt {k}) was followed by another attempt"
                );
            }
            if a.returned && a.step.kind == Kind::Ok {
                ensure!(
                    k + 1 == atts.len(),
                    "call {id}: a success (attempt {k}) was followed by another attempt"
                );
            }
            if k > 0 {
                ensure!(
                    a.start >= atts[k - 1].end.unwrap(),
                    "call {id}: attempts {} and {k} overlap",
                    k - 1
                );
            }
        }
        ensure!(
            max_round <= policy.max_rounds,
            "call {id}: a provider saw {max_round} attempts, max_rounds = {}",
            policy.max_rounds
        );
        let last = *atts.last().unwrap();
        let returned_ok = last.returned && last.step.kind == Kind::Ok;
        let cut_by_deadline = !last.returned && last.elapsed() < attempt_timeout;

        let Some(outcome) = &c.outcome else {
            // Cancelled by the caller: every attempt it started has ended
            // (checked above); none of them returned a success (the pool is
            // polled before the caller's timer, so a success wins).
            coverage.cancelled += 1;
            ensure!(
                !returned_ok,
                "call {id}: cancelled although an attempt succeeded"
            );
            // Not in an attempt, so in the wait before a retry: that retry
            // was paid for when the wait began.
            let in_wait = !cut_by_deadline;
            if in_wait {
                coverage.cancelled_in_wait += 1;
            }
            if policy.budget.enabled {
                withdrawn.insert(id, withdrawals(&atts, &rounds, in_wait));
            }
            continue;
        };

        let report = outcome.report();
        ensure!(
            report.attempts as usize == atts.len(),
            "call {id}: report.attempts = {}, the providers saw {}",
            report.attempts,
            atts.len()
        );
        ensure!(
            report.rounds <= policy.max_rounds,
            "call {id}: {} rounds > max_rounds {}",
            report.rounds,
            policy.max_rounds
        );
        ensure!(
            report.attempts <= report.rounds * n as u32,
            "call {id}: {} attempts in {} rounds of {n} providers",
            report.attempts,
            report.rounds
        );
        let retries_seen = rounds.iter().filter(|&&r| r >= 2).count();
        ensure!(
            report.retries as usize == retries_seen,
            "call {id}: report.retries = {}, the providers saw {retries_seen} after round 1",
            report.retries
        );
        coverage.retries += retries_seen as u64;
        let served = matches!(outcome, Outcome::Served { .. });
        let failures = report.failures();
        ensure!(
            failures.len() + usize::from(served) == atts.len(),
            "call {id}: {} failures listed, {} attempts seen (served: {served})",
            failures.len(),
            atts.len()
        );
        let mut in_later_rounds = 0;
        for (k, f) in failures.iter().enumerate() {
            let a = atts[k];
            ensure!(
                *f.provider == run.names[a.provider],
                "call {id}: failure {k} names {}, provider {} saw it",
                f.provider,
                run.names[a.provider]
            );
            ensure!(
                f.round == rounds[k],
                "call {id}: failure {k} in round {}, the provider's attempt {}",
                f.round,
                rounds[k]
            );
            ensure!(
                f.elapsed == a.elapsed(),
                "call {id}: failure {k} took {:?}, the provider saw {:?}",
                f.elapsed,
                a.elapsed()
            );
            let cause = if a.returned {
                a.step.kind.cause()
            } else {
                Some(Cause::ResponseTimeout)
            };
            ensure!(
                Some(f.verdict.cause) == cause,
                "call {id}: failure {k} has cause {:?}, the provider answered {:?} (returned: {})",
                f.verdict.cause,
                a.step,
                a.returned
            );
            in_later_rounds += u32::from(f.round >= 2);
        }
        if served && *rounds.last().unwrap() >= 2 {
            in_later_rounds += 1;
        }
        ensure!(
            report.retries == in_later_rounds,
            "call {id}: report.retries = {}, attempts in rounds >= 2 = {in_later_rounds}",
            report.retries
        );

        // Time: nothing but attempts and waits, and never past the deadline.
        ensure!(
            c.end - c.start == report.elapsed,
            "call {id}: report.elapsed = {:?}, the call took {:?}",
            report.elapsed,
            c.end - c.start
        );
        ensure!(
            c.end <= deadline && report.elapsed <= c.timeout,
            "call {id}: returned {:?} after its deadline",
            c.end - deadline
        );
        ensure!(
            c.start + report.waited <= deadline,
            "call {id}: waited {:?} with a timeout of {:?}",
            report.waited,
            c.timeout
        );
        let attempting: Duration = atts.iter().map(|a| a.elapsed()).sum();
        ensure!(
            attempting + report.waited == report.elapsed,
            "call {id}: attempts {attempting:?} + waits {:?} != elapsed {:?}",
            report.waited,
            report.elapsed
        );

        // Rounds: as the providers saw them, plus a round whose only retry
        // was paid for and then found the deadline passed.
        let mut paid_not_made = false;
        match outcome {
            Outcome::Served {
                provider,
                value,
                fell_back,
                report,
            } => {
                coverage.served += 1;
                if report.rounds > 1 {
                    coverage.served_after_retry += 1;
                }
                ensure!(
                    returned_ok && last.provider == *value && **provider == run.names[*value],
                    "call {id}: served by {provider}, the last attempt was {last:?}"
                );
                ensure!(
                    report.rounds == max_round,
                    "call {id}: served in round {}, the provider's attempt {max_round}",
                    report.rounds
                );
                ensure!(
                    *fell_back == (atts[0].provider != *value),
                    "call {id}: fell_back = {fell_back}, first tried {}, served by {value}",
                    atts[0].provider
                );
            }
            Outcome::Failed { reason, report } => {
                *coverage.reasons.entry(reason.as_str()).or_default() += 1;
                ensure!(
                    !atts.iter().any(|a| a.returned && a.step.kind == Kind::Ok),
                    "call {id}: failed ({reason:?}) although an attempt succeeded"
                );
                let last_is_400 = last.returned && last.step.kind == Kind::Status400;
                ensure!(
                    matches!(reason, FailReason::Permanent) == last_is_400,
                    "call {id}: reason {reason:?}, last attempt {last:?}"
                );
                match reason {
                    FailReason::RoundsExhausted => ensure!(
                        report.rounds == policy.max_rounds,
                        "call {id}: rounds exhausted after {} of {}",
                        report.rounds,
                        policy.max_rounds
                    ),
                    FailReason::BudgetExhausted => ensure!(
                        policy.budget.enabled,
                        "call {id}: budget exhausted with the budget disabled"
                    ),
                    FailReason::DeadlineExceeded { wait: Some(w) } => ensure!(
                        c.end + *w >= deadline,
                        "call {id}: skipped a wait of {w:?} that ended before the deadline"
                    ),
                    FailReason::DeadlineExceeded { wait: None } => {
                        ensure!(
                            c.end == deadline,
                            "call {id}: deadline exceeded {:?} before the deadline",
                            deadline - c.end
                        );
                        // The next retry was paid for, then found no time
                        // left: a known defect, modelled so the budget check
                        // stays exact.
                        paid_not_made = distinct == n && !cut_by_deadline;
                    }
                    FailReason::RetryAfterTooLong { retry_after } => {
                        let asked = atts.iter().any(|a| {
                            a.returned
                                && match a.step.kind {
                                    Kind::Status429(ra) | Kind::Status503(Some(ra)) => {
                                        Duration::from_millis(ra) == *retry_after
                                    }
                                    _ => false,
                                }
                        });
                        ensure!(
                            asked && *retry_after > policy.max_retry_after,
                            "call {id}: retry_after_too_long {retry_after:?} that nobody asked for"
                        );
                    }
                    _ => {}
                }
            }
        }
        if paid_not_made {
            coverage.paid_not_made += 1;
        }
        ensure!(
            report.rounds == max_round || (paid_not_made && report.rounds == max_round + 1),
            "call {id}: report.rounds = {}, the providers saw {max_round} rounds",
            report.rounds
        );
        if policy.budget.enabled {
            withdrawn.insert(id, withdrawals(&atts, &rounds, paid_not_made));
        }
    }

    check_health(run)?;
    check_budget(run, &deposits, &withdrawn)
}

/// Health moves once per request at most: replaying the attempts of a
/// batch in the order they ended, a provider's count goes up by exactly one
/// at the first failure of a request that was its fault, and back to zero
/// when it serves one. With one call per batch this is "+1, 0 or reset".
fn check_health(run: &Run) -> Result<(), String> {
    let attempt_timeout = run.policy.timeouts.attempt;
    for (b, batch) in run.batches.iter().enumerate() {
        let mut ended: Vec<&Seen> = run
            .log
            .iter()
            .filter(|s| batch.calls.contains(&s.call))
            .collect();
        ended.sort_by_key(|s| s.end_seq);
        let mut expected = batch.health_before.clone();
        let mut counted: Vec<(u32, usize)> = Vec::new();
        for a in ended {
            let h = &mut expected[a.provider];
            if a.returned && a.step.kind == Kind::Ok {
                *h = 0;
            } else if counts_against_health(a, attempt_timeout)
                && !counted.contains(&(a.call, a.provider))
            {
                counted.push((a.call, a.provider));
                *h += 1;
            }
        }
        ensure!(
            batch.health_after == expected,
            "batch {b} (calls {:?}): consecutive failures {:?} -> {:?}, expected {:?}",
            batch.calls,
            batch.health_before,
            batch.health_after,
            expected
        );
        if batch.calls.len() == 1 {
            for (before, after) in batch.health_before.iter().zip(&batch.health_after) {
                ensure!(
                    *after == 0 || after.abs_diff(*before) <= 1,
                    "batch {b}: one request moved a count {before} -> {after}"
                );
            }
        }
    }
    Ok(())
}

/// The budget's epoch of an instant, as `RetryBudget` slices time.
fn epoch(origin: Instant, t: Instant, granularity: u128) -> u128 {
    (t - origin).as_nanos() / granularity + 1
}

/// The retry budget never pays for more than the policy allows, and what
/// it reports available is exactly deposits minus withdrawals.
fn check_budget(
    run: &Run,
    deposits: &BTreeMap<u32, Instant>,
    withdrawn: &BTreeMap<u32, Vec<Instant>>,
) -> Result<(), String> {
    let p = &run.policy.budget;
    let g = RetryBudget::granularity(p).as_nanos().max(1);
    let slots = p.window.as_nanos() / g;
    // Fixed point, thousandths of a retry, rounded as the budget does.
    let per_request = (p.ratio * 1000.0).round() as i64;
    let reserve = (f64::from(p.min_per_second) * p.window.as_secs_f64() * 1000.0) as i64;
    let live = |now: Instant, t: Instant| {
        let (j, e) = (epoch(run.origin, now, g), epoch(run.origin, t, g));
        e <= j && j - e < slots
    };

    // 1. What the budget reports equals the model, after every batch.
    let mut seen_calls: Vec<u32> = Vec::new();
    for (b, batch) in run.batches.iter().enumerate() {
        seen_calls.extend(&batch.calls);
        let now = batch.at;
        let d = seen_calls
            .iter()
            .filter(|id| live(now, deposits[id]))
            .count() as i64;
        let w = seen_calls
            .iter()
            .filter_map(|id| withdrawn.get(id))
            .flatten()
            .filter(|t| live(now, **t))
            .count() as i64;
        let model = per_request * d - 1000 * w + reserve;
        let reported = (batch.budget_available * 1000.0).round() as i64;
        ensure!(
            reported == model,
            "batch {b}: budget_available = {}, expected {} ({d} live requests, {w} live retries)",
            batch.budget_available,
            model as f64 / 1000.0
        );
    }
    if !p.enabled {
        return Ok(());
    }

    let all_w: Vec<Instant> = withdrawn.values().flatten().copied().collect();
    let all_d: Vec<Instant> = deposits.values().copied().collect();
    for &t in &all_w {
        // 2. The budget's own window (the 10 slots live when the retry was
        //    paid for): retries <= ratio x requests + reserve, exactly.
        let w = all_w.iter().filter(|u| live(t, **u)).count() as i64;
        let d = all_d.iter().filter(|u| live(t, **u)).count() as i64;
        ensure!(
            1000 * w <= per_request * d + reserve,
            "{w} retries paid for in the window ending at {:?}, with {d} requests: \
             over ratio {} + {}/s",
            t - run.origin,
            p.ratio,
            p.min_per_second
        );
        // 3. Any window, in plain terms: the live slots span between 9 and
        //    10 tenths of the window, so the retries of the last 9 tenths
        //    are paid by the requests of the last window, plus the reserve
        //    (+1 for the thousandths the budget rounds to).
        let recent = Duration::from_nanos(((slots - 1) * g) as u64);
        let w = all_w
            .iter()
            .filter(|u| **u <= t && t - **u <= recent)
            .count() as f64;
        let d = all_d
            .iter()
            .filter(|u| **u <= t && t - **u < p.window)
            .count() as f64;
        let allowed = p.ratio * d + f64::from(p.min_per_second) * p.window.as_secs_f64() + 1.0;
        let within = w <= allowed;
        ensure!(
            within,
            "{w} retries within {recent:?} before {:?}, {d} requests in the window: over {allowed}",
            t - run.origin
        );
    }
    Ok(())
}
