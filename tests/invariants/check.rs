//! The invariants, checked after a run against the providers' own log.
//!
//! With `[admission]` on, the checks follow the gate's rules
//! (docs/decisions.md, "The admission gate's rules"): an attempt the
//! upstream never received (connect refused, another connect failure,
//! connect timeout, not sent) is attempted again in the same round when
//! the gate admits it, without spending budget or a round; waits at gates
//! count in `Report::queued`, never past `admission.max_wait` or the
//! deadline; and the gates' own counts are held to the attempts the
//! providers saw (`check_gates`).
//!
//! Time is paused and every duration the test chooses is a whole number
//! of milliseconds (the tokio timer's resolution), so instants compare
//! exactly: an attempt's duration is the time between the two clock
//! readings the pool and the provider both take, with nothing in between.

use std::collections::BTreeMap;
use std::time::Duration;

use retryctl::policy::Policy;
use retryctl::stats::GateSnapshot;
use retryctl::{Cause, FailReason, Report, RetryBudget};
use tokio::time::Instant;

use crate::provider::{GateSeen, Kind, Seen};

/// How long after its start an attempt admitted by a limiting gate holds
/// its slot: `timeouts.connect` plus the pool's `CONNECT_MARGIN` (5 ms).
const CONNECT_MARGIN: Duration = Duration::from_millis(5);

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
    /// Every provider's gate right after the batch.
    pub gates: Vec<GateSnapshot>,
}

/// Everything one property case produced.
#[derive(Debug)]
pub struct Run {
    pub policy: Policy,
    pub names: Vec<String>,
    /// When the pool (and so its retry budget) was built.
    pub origin: Instant,
    pub log: Vec<Seen>,
    /// The gates as the providers saw them (admission on only).
    pub gates: Vec<GateSeen>,
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
    /// Retries paid for but never made: a wait whose timer rounded up to
    /// the deadline (the case of `a_retry_past_the_deadline_spends_no_budget`
    /// is fixed and must not come back).
    pub paid_not_made: u64,
    /// Attempts made again at the gate after a connection-level failure.
    pub again: u64,
    /// Calls that waited at a gate.
    pub queued: u64,
    /// Calls that made no attempt (turned away at the gates).
    pub no_attempt: u64,
    /// Gate observations: limited, down, with a probe in flight, and with
    /// more in flight than the limit (after a shrink).
    pub gate_limited: u64,
    pub gate_down: u64,
    pub gate_probing: u64,
    pub gate_over_limit: u64,
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

/// A retry the budget paid for: at an instant in `lo..=hi` (one instant
/// but where a wait at a gate may have come first); `certain: false` for
/// one the call may or may not have paid for (a retry refused at a gate,
/// or cut by the deadline or a cancellation, after it was paid).
#[derive(Clone, Copy, Debug)]
struct Paid {
    lo: Instant,
    hi: Instant,
    certain: bool,
}

impl Paid {
    fn at(t: Instant) -> Paid {
        Paid {
            lo: t,
            hi: t,
            certain: true,
        }
    }
}

/// The retries a call withdrew from the budget, by time: one per retry
/// attempt of a later round (`timed`; withdrawn when the step before it
/// ended, in the same poll: the previous attempt's end, unless the call
/// `queued` at a gate in between), plus one the call paid for and never
/// made (`extra`), plus up to `maybe` it may have paid for and not made,
/// by `end`.
fn withdrawals(
    atts: &[&Seen],
    timed: &[bool],
    extra: bool,
    queued: bool,
    maybe: usize,
    start: Instant,
    end: Instant,
) -> Vec<Paid> {
    let mut out: Vec<Paid> = (1..atts.len())
        .filter(|&k| timed[k])
        .map(|k| {
            let lo = atts[k - 1].end.expect("ended");
            if queued {
                Paid {
                    lo,
                    hi: atts[k].start,
                    certain: true,
                }
            } else {
                Paid::at(lo)
            }
        })
        .collect();
    if extra {
        let lo = atts.last().and_then(|a| a.end).expect("an attempt");
        out.push(if queued {
            Paid {
                lo,
                hi: end,
                certain: true,
            }
        } else {
            Paid::at(lo)
        });
    }
    out.extend((0..maybe).map(|_| Paid {
        lo: start,
        hi: end,
        certain: false,
    }));
    out
}

/// Whether the upstream certainly never received this attempt (with the
/// gate on, it is attempted again in the same round).
fn unreached(a: &Seen) -> bool {
    a.returned && a.step.kind.unreached()
}

pub fn check(run: &Run, coverage: &mut Coverage) -> Result<(), String> {
    let policy = &run.policy;
    let n = run.names.len();
    let attempt_timeout = policy.timeouts.attempt;
    let gated = policy.admission.enabled;
    let max_wait = policy.admission.max_wait;
    let mut deposits: BTreeMap<u32, Instant> = BTreeMap::new();
    let mut withdrawn: BTreeMap<u32, Vec<Paid>> = BTreeMap::new();
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
        // The round of each attempt, from the providers' side: every
        // provider once in round 1; a provider again in the next round
        // after a failure it received, and (gate on) again in the same
        // round after one it never received.
        let mut last_of: Vec<Option<usize>> = vec![None; n];
        let mut rounds: Vec<u32> = Vec::with_capacity(atts.len());
        let mut again: Vec<bool> = Vec::with_capacity(atts.len());
        for (k, a) in atts.iter().enumerate() {
            let (round, same) = match last_of[a.provider] {
                None => (1, false),
                Some(j) if gated && unreached(atts[j]) => (rounds[j], true),
                Some(j) => (rounds[j] + 1, false),
            };
            rounds.push(round);
            again.push(same);
            last_of[a.provider] = Some(k);
        }
        // A later round's retry, paid from the budget.
        let timed: Vec<bool> = (0..atts.len())
            .map(|k| rounds[k] >= 2 && !again[k])
            .collect();
        let timed_count = timed.iter().filter(|&&t| t).count();
        let agains = again.iter().filter(|&&g| g).count();
        coverage.again += agains as u64;
        let max_round = rounds.iter().copied().max().unwrap_or(0);
        let distinct = last_of.iter().filter(|k| k.is_some()).count();

        if !gated {
            ensure!(!atts.is_empty(), "call {id}: no attempt at all");
        } else if atts.is_empty() {
            coverage.no_attempt += 1;
        }
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
            "call {id}: an attempt in round {max_round}, max_rounds = {}",
            policy.max_rounds
        );
        let last = atts.last().copied();
        let returned_ok = last.is_some_and(|l| l.returned && l.step.kind == Kind::Ok);
        // Cut in its attempt (by the deadline or the caller), not by the
        // attempt's own timer.
        let cut_by_deadline = last.is_some_and(|l| !l.returned && l.elapsed() < attempt_timeout);
        // With the gate on, a later round's retry may be paid for and then
        // turned away at the gate (or find the deadline passed): at most
        // one per provider per round after the first, but those made.
        let maybe_paid = |rounds_started: u32| {
            if gated {
                ((rounds_started.saturating_sub(1) as usize) * n).saturating_sub(timed_count)
            } else {
                0
            }
        };

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
            // was paid for when the wait began. (Gate on: or at a gate, in
            // a wait nothing paid for.)
            let in_wait = !atts.is_empty() && !cut_by_deadline;
            if in_wait {
                coverage.cancelled_in_wait += 1;
            }
            if policy.budget.enabled {
                let rounds_started = (max_round + 1).min(policy.max_rounds);
                withdrawn.insert(
                    id,
                    withdrawals(
                        &atts,
                        &timed,
                        in_wait && !gated,
                        gated,
                        maybe_paid(rounds_started),
                        c.start,
                        c.end,
                    ),
                );
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
            (report.attempts as usize - agains) <= report.rounds as usize * n,
            "call {id}: {} attempts ({agains} again at a gate) in {} rounds of {n} providers",
            report.attempts,
            report.rounds
        );
        // Every attempt of a provider already tried is a retry (a later
        // round's, or one made again at the gate).
        let retries_seen = atts.len() - distinct;
        ensure!(
            report.retries as usize == retries_seen,
            "call {id}: report.retries = {}, the providers saw {retries_seen} repeated",
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
        let mut repeats = 0;
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
                "call {id}: failure {k} in round {}, the providers' log says round {}",
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
            ensure!(
                gated || !f.probe,
                "call {id}: failure {k} marked a gate's probe with the gate off"
            );
            repeats += u32::from(failures[..k].iter().any(|g| g.provider == f.provider));
        }
        if let Outcome::Served { provider, .. } = outcome {
            repeats += u32::from(failures.iter().any(|g| g.provider == *provider));
        }
        ensure!(
            report.retries == repeats,
            "call {id}: report.retries = {}, its failures list {repeats} repeated providers",
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
            "call {id}: attempts {attempting:?} + waits {:?} != elapsed {:?} (queued {:?})",
            report.waited,
            report.elapsed,
            report.queued
        );
        // Waits at gates: part of the waits, within max_wait over the whole
        // call, so the call ends by min(deadline, start + max_wait + its
        // attempts + its waits between rounds).
        ensure!(
            report.queued <= report.waited,
            "call {id}: queued {:?} of {:?} waited",
            report.queued,
            report.waited
        );
        // Round 1 has no wait but at gates; nor has the time before the
        // first attempt.
        ensure!(
            (report.rounds > 1 || report.queued == report.waited)
                && atts
                    .first()
                    .is_none_or(|a| a.start - c.start <= report.queued),
            "call {id}: queued {:?} of {:?} waited in {} rounds, first attempt after {:?}",
            report.queued,
            report.waited,
            report.rounds,
            atts.first().map(|a| a.start - c.start)
        );
        if gated {
            ensure!(
                report.queued <= max_wait
                    && c.end <= c.start + attempting + (report.waited - report.queued) + max_wait,
                "call {id}: queued {:?} at gates, max_wait {max_wait:?}",
                report.queued
            );
            if !report.queued.is_zero() {
                coverage.queued += 1;
            }
        } else {
            ensure!(
                report.queued.is_zero(),
                "call {id}: queued {:?} with the gate off",
                report.queued
            );
        }

        // Rounds: as the providers saw them, plus a round whose only retry
        // was paid for and then found the deadline passed (or, gate on,
        // was turned away at the gate).
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
                let last = last.expect("served by an attempt");
                ensure!(
                    returned_ok && last.provider == *value && **provider == run.names[*value],
                    "call {id}: served by {provider}, the last attempt was {last:?}"
                );
                ensure!(
                    report.rounds == max_round,
                    "call {id}: served in round {}, the providers' log says {max_round}",
                    report.rounds
                );
                // (With the gate on, the first provider of the order may
                // have been deferred behind one that could go at once.)
                ensure!(
                    (gated && n > 1) || *fell_back == (atts[0].provider != *value),
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
                let last_is_400 =
                    last.is_some_and(|l| l.returned && l.step.kind == Kind::Status400);
                ensure!(
                    matches!(reason, FailReason::Permanent) == last_is_400,
                    "call {id}: reason {reason:?}, last attempt {last:?}"
                );
                ensure!(
                    !atts.is_empty()
                        || matches!(
                            reason,
                            FailReason::AdmissionTimeout { .. }
                                | FailReason::AdmissionQueueFull
                                | FailReason::DeadlineExceeded { wait: None }
                        ),
                    "call {id}: no attempt, reason {reason:?}"
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
                        // left: modelled so the budget check stays exact.
                        paid_not_made = !gated && distinct == n && !cut_by_deadline;
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
                    // Waited at gates until max_wait was spent, or until
                    // the deadline (then nothing came after it).
                    FailReason::AdmissionTimeout { waited } => ensure!(
                        gated
                            && *waited <= report.queued
                            && (*waited == max_wait || c.end == deadline),
                        "call {id}: admission_timeout after {waited:?} (queued {:?}, max_wait \
                         {max_wait:?}, {:?} before the deadline)",
                        report.queued,
                        deadline - c.end
                    ),
                    FailReason::AdmissionQueueFull => {
                        ensure!(gated, "call {id}: admission_queue_full with the gate off")
                    }
                    _ => {}
                }
            }
        }
        if paid_not_made {
            coverage.paid_not_made += 1;
        }
        let seen_rounds = max_round.max(1);
        ensure!(
            report.rounds == seen_rounds
                || ((paid_not_made || gated) && report.rounds == seen_rounds + 1),
            "call {id}: report.rounds = {}, the providers saw {max_round} rounds",
            report.rounds
        );
        if policy.budget.enabled {
            withdrawn.insert(
                id,
                withdrawals(
                    &atts,
                    &timed,
                    paid_not_made,
                    !report.queued.is_zero(),
                    maybe_paid(report.rounds),
                    c.start,
                    c.end,
                ),
            );
        }
    }

    check_health(run)?;
    if gated {
        check_gates(run, coverage)?;
    }
    check_budget(run, &deposits, &withdrawn)
}

/// The gates against the attempts the providers saw (observed at every
/// attempt's start, just admitted, and at every answer, before the pool
/// hears it; see `Provider::attempt_observed`):
/// * every attempt in its connect phase holds a slot: the count in flight
///   is at least the provider's attempts started less than
///   `timeouts.connect` + 5 ms ago and still running;
/// * a limited gate admits only below its limit, a down one only its
///   probe. A limit shrinks only when an attempt's answer (observed just
///   before) reaches the pool, and may leave more in flight than the new
///   limit; after that shrink, until the next observation, the limit only
///   grows. So from one observation to the next the count in flight grows
///   past neither the limit nor the count before (not "in flight <=
///   limit" at every instant, which a shrink breaks, nor at every start:
///   a slot granted to a waiter may be taken up after another answer
///   shrank the limit);
/// * after every batch (cancelled calls included) nothing waits, nothing
///   is in flight, no probe is out.
fn check_gates(run: &Run, coverage: &mut Coverage) -> Result<(), String> {
    let phase = run.policy.timeouts.connect + CONNECT_MARGIN;
    let mut before = vec![0u32; run.names.len()];
    for o in &run.gates {
        let g = o.gate;
        let p = o.provider;
        coverage.gate_limited += u64::from(g.limit.is_some());
        coverage.gate_down += u64::from(g.down);
        coverage.gate_probing += u64::from(g.probing);
        coverage.gate_over_limit += u64::from(g.limit.is_some_and(|l| g.in_flight > l));
        if let Some(slot) = o.start_of {
            let connecting = run
                .log
                .iter()
                .filter(|a| {
                    a.provider == p
                        && a.start_seq < o.seq
                        && a.end_seq > o.seq
                        && o.at - a.start < phase
                })
                .count() as u32;
            ensure!(
                g.in_flight >= connecting,
                "{}: at the start of attempt {slot} (call {}), {g:?} counts fewer than the \
                 {connecting} attempts connecting",
                run.names[p],
                run.log[slot].call
            );
        }
        if let Some(limit) = g.limit {
            ensure!(
                g.in_flight <= before[p].max(limit),
                "{}: {g:?} admitted past its limit ({} in flight before), seq {}",
                run.names[p],
                before[p],
                o.seq
            );
        }
        if g.down {
            ensure!(
                g.in_flight <= before[p] + u32::from(g.probing),
                "{}: {g:?} admitted more than its probe while down ({} in flight before)",
                run.names[p],
                before[p]
            );
        }
        before[p] = g.in_flight;
    }
    for (b, batch) in run.batches.iter().enumerate() {
        for (p, g) in batch.gates.iter().enumerate() {
            ensure!(
                g.waiting == 0 && g.in_flight == 0 && !g.probing,
                "batch {b} (calls {:?}): {} left {g:?}",
                batch.calls,
                run.names[p]
            );
        }
    }
    Ok(())
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
/// it reports available is exactly deposits minus withdrawals (with the
/// gate on: within the withdrawals a call may have made, see [`Paid`]).
fn check_budget(
    run: &Run,
    deposits: &BTreeMap<u32, Instant>,
    withdrawn: &BTreeMap<u32, Vec<Paid>>,
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
    // Live at `now` whenever in `lo..=hi` it was paid (a later instant
    // is live if an earlier one is), and live if paid at `hi`.
    let surely = |now: Instant, w: &Paid| w.certain && live(now, w.lo) && live(now, w.hi);
    let maybe = |now: Instant, w: &Paid| live(now, w.hi);

    // 1. What the budget reports equals the model, after every batch.
    let mut seen_calls: Vec<u32> = Vec::new();
    for (b, batch) in run.batches.iter().enumerate() {
        seen_calls.extend(&batch.calls);
        let now = batch.at;
        let d = seen_calls
            .iter()
            .filter(|id| live(now, deposits[id]))
            .count() as i64;
        let paid = || {
            seen_calls
                .iter()
                .filter_map(|id| withdrawn.get(id))
                .flatten()
        };
        let w = paid().filter(|w| surely(now, w)).count() as i64;
        let w_max = paid().filter(|w| maybe(now, w)).count() as i64;
        let model = per_request * d - 1000 * w + reserve;
        let model_min = per_request * d - 1000 * w_max + reserve;
        let reported = (batch.budget_available * 1000.0).round() as i64;
        ensure!(
            (model_min..=model).contains(&reported),
            "batch {b}: budget_available = {}, expected {} ({d} live requests, {w} live retries{})",
            batch.budget_available,
            model as f64 / 1000.0,
            if w_max > w {
                format!(", up to {w_max} with those paid at a gate or at an unknown instant")
            } else {
                String::new()
            }
        );
    }
    if !p.enabled {
        return Ok(());
    }

    // Retries paid at a known instant are where the budget is checked;
    // every retry surely paid and live then counts against it.
    let all_w: Vec<Paid> = withdrawn.values().flatten().copied().collect();
    let all_d: Vec<Instant> = deposits.values().copied().collect();
    for t in all_w
        .iter()
        .filter(|w| w.certain && w.lo == w.hi)
        .map(|w| w.lo)
    {
        // 2. The budget's own window (the 10 slots live when the retry was
        //    paid for): retries <= ratio x requests + reserve, exactly.
        let w = all_w.iter().filter(|u| surely(t, u)).count() as i64;
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
            .filter(|u| u.certain && u.hi <= t && t - u.lo <= recent)
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
