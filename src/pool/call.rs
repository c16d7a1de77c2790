//! `Pool::call`: the first attempt from a few locals, then one loop over
//! rounds, each a queue of steps, with exact accounting.
//!
//! ```text
//! call_with          clock, model, snapshot, deadline, budget deposit,
//!                    order; the first attempt when nothing else is in
//!                    play (no probe, no shadow, a gate that admits at
//!                    once): a success returns here
//! Round1::go_on      the rest, one Call (its full state):
//! for each round:
//!   for each step (provider) in the round's queue:
//!     wait           the round's delay (later rounds: schedule, budget)
//!     admit          the provider's gate: go, defer (another provider can
//!                    go now), or wait                    (admission.rs)
//!     attempt        op(provider) under the attempt's limit
//!     record         health, stats, metrics, hooks (adaptive, shadow)
//!     decide         served | stop | again at the gate (never received)
//!                    | next round (received, retryable) | next provider
//!   plan next round  waits, budget, deadline                (schedule.rs)
//! ```

use std::future::Future;
use std::time::Duration;

use smallvec::SmallVec;
use tokio::time::Instant;

use crate::clock::Moment;

use super::admission::{self, Outcome, Permit, Refused};
use super::order::{self, Order, ProbeGuard};
use super::outcome::{AttemptError, FailReason, FailedAttempt, PoolError, Report, Served};
use super::schedule::{Retry, schedule};
use super::shadow::{Ended, ShadowCall};
use super::timer::{Expired, Timer};
use super::{Model, Pool, Route};
use crate::classifier::Classifier;
use crate::classify::{Cause, Classification, Verdict};
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

/// How long after the client's connect timeout an attempt admitted by a
/// limiting gate is taken to be connected.
const CONNECT_MARGIN: Duration = Duration::from_millis(5);

/// One step of a round: a provider to attempt, and why.
#[derive(Clone, Copy)]
enum Step {
    /// Round 1: the provider's first attempt.
    First(u8),
    /// Its gate would have made the request wait while another provider
    /// could go at once: tried after those, waiting if need be.
    Deferred(u8),
    /// The upstream never received the last attempt: again, when the gate
    /// admits it (no round, no budget).
    Again(u8),
    /// A later round's retry after its planned wait.
    Timed(Retry),
}

impl Step {
    fn index(self) -> u8 {
        match self {
            Step::First(i) | Step::Deferred(i) | Step::Again(i) => i,
            Step::Timed(r) => r.index,
        }
    }
}

/// A round's steps in order, inline (no allocation for up to 8): taken
/// from the front, added at the back.
#[derive(Default)]
struct Steps {
    items: SmallVec<[Step; 8]>,
    next: usize,
}

impl Steps {
    #[inline]
    fn pop_front(&mut self) -> Option<Step> {
        let step = self.items.get(self.next).copied()?;
        self.next += 1;
        Some(step)
    }

    #[inline]
    fn push_back(&mut self, step: Step) {
        if self.next == self.items.len() {
            // Everything was taken: reuse the space.
            self.items.clear();
            self.next = 0;
        }
        self.items.push(step);
    }

    fn extend(&mut self, steps: impl IntoIterator<Item = Step>) {
        for step in steps {
            self.push_back(step);
        }
    }

    /// The steps not taken yet.
    fn iter(&self) -> impl Iterator<Item = &Step> {
        self.items[self.next..].iter()
    }

    /// Keeps the steps not taken yet that `keep` accepts.
    fn retain(&mut self, keep: impl Fn(&Step) -> bool) {
        let mut rest: SmallVec<[Step; 8]> = self.items.drain(self.next..).collect();
        rest.retain(|s| keep(s));
        self.items = rest;
        self.next = 0;
    }
}

/// What the gate said about one step.
enum Admit<'a> {
    /// Go, holding the gate's slot (`None`: admission is off).
    Go(Option<Permit<'a>>),
    /// Another provider can go now: come back to this one after it.
    Defer,
    /// Not admitted in time, or the queue was full.
    Refused(FailReason),
}

/// How a failed attempt ended.
enum Attempted {
    /// Failure, and when the attempt ended.
    Failed(Verdict, Moment),
    /// The call's deadline ended the attempt.
    Expired,
}

/// An attempt under way: what `record_served` and `record_failure` needs from its start.
struct Begun {
    /// When it started.
    now: Moment,
    /// Its time limit.
    until: Moment,
    /// The limit is the adaptive one (from the provider's recent p99).
    adaptive: bool,
    /// It carries the provider's health probe.
    was_probe: bool,
}

/// Where a step leaves the call.
enum Next {
    /// On to the next step.
    Continue,
    /// The call failed, for this reason.
    Done(FailReason),
}

/// The state of one call: one policy snapshot, its clock readings and its
/// accounting.
struct Call<'a, P, E> {
    m: &'a Model<P>,
    /// Runs on failed attempts only (a dynamic call there costs nothing
    /// that matters, and keeps one `Call` per provider and error type).
    classifier: &'a (dyn Classifier<E> + Sync),
    resolved: &'a ModelPolicy,
    policy: &'a Policy,
    start: Moment,
    deadline: Moment,
    /// The latest clock reading: each attempt's end is the next step's
    /// "now" (the bookkeeping between them takes microseconds), so a call
    /// reads the clock once per attempt, plus once per wait.
    latest: Moment,
    /// The provider tried first (a success elsewhere is a fallback).
    first: u8,
    /// Providers already attempted, and those whose failure was counted
    /// against their health.
    tried: u64,
    counted: u64,
    report: Report,
    last: Option<AttemptError<E>>,
    /// A demoted provider's health probe, if this call carries it.
    probe: Option<ProbeGuard<'a>>,
    /// With a `[shadow]` candidate: what it needs when the request ends.
    shadow: Option<ShadowCall>,
    /// Why the last provider given up on was given up on.
    stopped: Option<FailReason>,
    /// Retryable failures of providers the upstream received: the next
    /// round's retries.
    pending: SmallVec<[(u8, Classification); 8]>,
    /// When the round being retried ended: its retries' waits count from
    /// here.
    round_end: Moment,
}

impl<P, C> Pool<P, C> {
    /// Calls `op` with a provider of `model` until it succeeds or the policy
    /// says stop. See the [`Pool`](crate::Pool) docs for the exact rules.
    ///
    /// (The future of [`Pool::call_with`] itself, not one wrapping it: an
    /// `async fn` here would add a state switch to every poll and a move
    /// of the result.)
    pub fn call<T, E, F, Fut>(
        &self,
        model: &str,
        op: F,
    ) -> impl Future<Output = Result<Served<T>, PoolError<E>>>
    where
        F: FnMut(&P) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: std::fmt::Display,
        C: Classifier<E> + Sync,
    {
        self.call_with(model, CallOptions::default(), op)
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
        E: std::fmt::Display,
        C: Classifier<E> + Sync,
    {
        // The clock first: the counter's reading takes tens of cycles, and
        // it overlaps the lookup and the snapshot's load instead of waiting
        // behind the snapshot's locked write (a read-modify-write lets
        // nothing after it start early), which then waits for the
        // deposit's store into the slot this reading chose.
        let start = self.clock.now();
        let Some(m) = self.model(model) else {
            return Err(self.unknown(model));
        };
        // One snapshot for the whole request, resolved for this model.
        let active = self.policy.snapshot();
        self.note_version(&active);
        let resolved = active.for_model(m.name);
        let policy = resolved.policy();
        let deadline = deadline_of(options, start, resolved);
        m.deposit(start, resolved);
        let shadow = ShadowCall::start(m, &active, resolved, start, deadline);
        // Round 1: every provider once, no waiting between them.
        let (first, probe, order) = if let [route] = &m.routes[..] {
            // One provider, the common deployment: no order to plan.
            (0, order::probe_alone(&route.health, start), Order::new())
        } else {
            let (order, probe) = m.plan(start, &policy.adaptive);
            (order[0], probe, order)
        };
        let route = &m.routes[usize::from(first)];
        // The first attempt, when nothing but itself is in play (no probe,
        // no shadow candidate, a gate that admits at once), is made here,
        // its state a few locals, and a success returns from here. The
        // call's full state (`Call`: the report, the failures, the retries'
        // plan) is built only when the attempt fails or when the call needs
        // it from the start: a success at once would pay for building,
        // moving and dropping it, a fifth of its instructions.
        let admitted = if probe.is_none() && shadow.is_none() && start < deadline {
            try_admit(policy, route, start)
        } else {
            None
        };
        let resume = match admitted {
            Some(Admit::Go(permit)) if !permit.as_ref().is_some_and(Permit::connecting) => {
                let begun = attempt_limit(resolved, route, start, deadline, false);
                let fut = std::pin::pin!(op(&route.provider));
                let failed = match Timer::limit_lazily(fut, begun.until).await {
                    Ok(Ok(value)) => {
                        let (_, took) = record_served(m, route, policy, false, &begun, permit);
                        m.metrics.served_at_once(&route.metrics, took, false);
                        return Ok(Served {
                            value,
                            provider: route.name,
                            fell_back: false,
                            report: Report {
                                attempts: 1,
                                rounds: 1,
                                elapsed: Duration::from_nanos(took),
                                ..Report::default()
                            },
                        });
                    }
                    Ok(Err(e)) => Ok(e),
                    Err(expired) => Err(expired),
                };
                Resume::Failed {
                    begun,
                    permit,
                    failed,
                }
            }
            admitted => Resume::Fresh {
                admitted,
                probe,
                shadow,
            },
        };
        // Polled out of line: inlined, the rest of the call would make the
        // call's own poll too large for the caller to inline, and every
        // success would pay a call and a move of its result.
        let round1 = Round1 {
            m,
            classifier: &self.classifier,
            resolved,
            start,
            deadline,
            first,
            order,
        };
        let mut rest = std::pin::pin!(round1.go_on(resume, op));
        std::future::poll_fn(|cx| poll_out_of_line(rest.as_mut(), cx)).await
    }
}

/// Polls `fut` in a function of its own (see [`Pool::call_with`]).
#[inline(never)]
fn poll_out_of_line<F: Future>(
    fut: std::pin::Pin<&mut F>,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<F::Output> {
    fut.poll(cx)
}

/// What the rest of a call needs from its start.
struct Round1<'a, P, E> {
    m: &'a Model<P>,
    classifier: &'a (dyn Classifier<E> + Sync),
    resolved: &'a ModelPolicy,
    start: Moment,
    deadline: Moment,
    /// The provider round 1 tries first.
    first: u8,
    /// Round 1's order, `first` included (empty for a model of one
    /// provider).
    order: Order,
}

/// Where [`Round1::go_on`] takes a call up.
enum Resume<'a, E> {
    /// Nothing attempted yet: the first provider's admission if it was
    /// asked (`None`: ask it), the probe and the shadow candidate's call.
    Fresh {
        admitted: Option<Admit<'a>>,
        probe: Option<ProbeGuard<'a>>,
        shadow: Option<ShadowCall>,
    },
    /// The first provider's attempt failed.
    Failed {
        begun: Begun,
        permit: Option<Permit<'a>>,
        failed: Result<E, Expired>,
    },
}

impl<'a, P, E: std::fmt::Display> Round1<'a, P, E> {
    /// The call from `resume` on: every round until it is served or
    /// stops, in this one state machine. The steps' bookkeeping is
    /// synchronous (`try_admit`, `begin`, `record_served` or
    /// `record_failure`, `decide`) and the loop awaits only what really
    /// waits (a later round's delay, a gate that limits, the operation). A
    /// nested async step would be a future of its own, polled through one
    /// more state switch and handing its output up by one more move.
    async fn go_on<T, F, Fut>(
        self,
        resume: Resume<'a, E>,
        mut op: F,
    ) -> Result<Served<T>, PoolError<E>>
    where
        F: FnMut(&P) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut call = Call::new(&self);
        let Round1 {
            m, first, order, ..
        } = self;
        let mut steps = Steps::default();
        let mut carried = None;
        match resume {
            Resume::Fresh {
                admitted,
                probe,
                shadow,
            } => {
                call.probe = probe;
                call.shadow = shadow;
                carried = admitted;
                steps.push_back(Step::First(first));
                steps.extend(order.iter().skip(1).map(|&i| Step::First(i)));
            }
            Resume::Failed {
                begun,
                permit,
                failed,
            } => {
                steps.extend(order.iter().skip(1).map(|&i| Step::First(i)));
                call.count_attempt(first);
                let route = &m.routes[usize::from(first)];
                let attempted = call.record_failure(first, route, 1, false, begun, permit, failed);
                if let Next::Done(reason) = call.decide(first, attempted, &mut steps) {
                    return Err(call.fail(reason));
                }
            }
        }
        let reason = 'run: {
            let mut round = 1;
            loop {
                while let Some(step) = steps.pop_front() {
                    let i = step.index();
                    // Looked up once per step (an index into the routes is
                    // a bounds check and a multiplication each time).
                    let route = &m.routes[usize::from(i)];
                    if let Step::Timed(retry) = step {
                        // Paid for synchronously; only a wait that really
                        // waits is awaited (a zero delay, or a retry already
                        // due, never builds the sleep's future).
                        let Some(ready) = call.pay_retry(retry, round, &mut steps) else {
                            continue;
                        };
                        if ready > call.latest {
                            call.wait_until(ready).await;
                        }
                    }
                    // The first step's admission, when it was asked for
                    // before the loop.
                    let admitted = carried
                        .take()
                        .or_else(|| try_admit(call.policy, route, call.latest));
                    let admitted = match admitted {
                        Some(admitted) => admitted,
                        None => {
                            let others_ready = matches!(step, Step::First(_) | Step::Again(_))
                                && steps.iter().any(|s| {
                                    matches!(s, Step::First(_) | Step::Again(_)) && s.index() != i
                                });
                            // Boxed: a wait at a limiting gate is rare and
                            // already allocates its place in line, and the
                            // wait's future (~350 bytes) would otherwise
                            // be room in every call's future.
                            Box::pin(call.admit(i, others_ready)).await
                        }
                    };
                    let mut permit = match admitted {
                        Admit::Go(permit) => permit,
                        Admit::Defer => {
                            steps.push_back(Step::Deferred(i));
                            continue;
                        }
                        Admit::Refused(reason) => {
                            call.stopped = Some(reason);
                            continue;
                        }
                    };
                    let Some(begun) = call.begin(i, route) else {
                        // A wait ended at the deadline (timers round up to the
                        // millisecond). A retry it paid for stays paid: like
                        // one cancelled during its wait, it is counted.
                        break 'run FailReason::DeadlineExceeded { wait: None };
                    };
                    let mut fut = std::pin::pin!(op(&route.provider));
                    // The future is polled where it was pinned, never moved:
                    // an HTTP client's request future can be over a kilobyte.
                    let result = match permit.as_mut().filter(|p| p.connecting()) {
                        // The timer is armed only if the first poll does not
                        // finish the operation: arming it takes a timer from
                        // the thread's stock and registers the task's waker,
                        // which an operation that completes at once (a cached
                        // answer, a local call) should not pay.
                        None => Timer::limit_lazily(fut, begun.until).await,
                        // Admitted by a limiting gate: the slot is held
                        // through the connect phase only (its end:
                        // `timeouts.connect`, plus a tick so the client's
                        // own connect timeout is seen first), then the
                        // attempt goes on to its own limit.
                        Some(p) => {
                            let connected = begun
                                .now
                                .checked_add(
                                    route.connect.unwrap_or(call.policy.timeouts.connect)
                                        + CONNECT_MARGIN,
                                )
                                .map_or(begun.until, |t| t.min(begun.until));
                            match Timer::limit_lazily(fut.as_mut(), connected).await {
                                Ok(output) => Ok(output),
                                Err(Expired) => {
                                    p.connected(&call.policy.admission);
                                    // `fut` is polled once more at once (it
                                    // was in this same poll): once per
                                    // attempt that outlives its connect
                                    // phase at a limiting gate.
                                    Timer::limit_lazily(fut, begun.until).await
                                }
                            }
                        }
                    };
                    let paid = matches!(step, Step::Timed(_));
                    // The value moves once, from the attempt's output into
                    // `Served`: a response passed on through the bookkeeping
                    // would be copied at every step (an HTTP response is
                    // ~200 bytes: a `memcpy` call each time).
                    let failed = match result {
                        Ok(Ok(value)) => {
                            let (ended, took) =
                                record_served(m, route, call.policy, paid, &begun, permit);
                            if begun.was_probe {
                                call.probe = None;
                            }
                            return Ok(call.served(i, route, value, ended, took));
                        }
                        Ok(Err(e)) => Ok(e),
                        Err(expired) => Err(expired),
                    };
                    let attempted =
                        call.record_failure(i, route, round, paid, begun, permit, failed);
                    match call.decide(i, attempted, &mut steps) {
                        Next::Continue => {}
                        Next::Done(reason) => break 'run reason,
                    }
                }
                // Further rounds over the providers whose own error was
                // retryable.
                if let Err(reason) = call.plan_round(round, &mut steps) {
                    break 'run reason;
                }
                round += 1;
            }
        };
        Err(call.fail(reason))
    }
}

impl<P, C> Pool<P, C> {
    /// The error for a model that is not configured: one counter, no
    /// other state touched.
    fn unknown<E>(&self, model: &str) -> PoolError<E> {
        self.unknown_model.increment(1);
        let mut name = model.to_owned();
        if name.len() > 128 {
            let mut cut = 128;
            while !name.is_char_boundary(cut) {
                cut -= 1;
            }
            name.truncate(cut);
        }
        PoolError::new(
            FailReason::UnknownModel { model: name },
            None,
            Report::default(),
        )
    }
}

impl<'a, P, E: std::fmt::Display> Call<'a, P, E> {
    /// The call's state at the start `r` describes, with round 1 under
    /// way and nothing attempted yet.
    fn new(r: &Round1<'a, P, E>) -> Self {
        Call {
            m: r.m,
            classifier: r.classifier,
            resolved: r.resolved,
            policy: r.resolved.policy(),
            start: r.start,
            deadline: r.deadline,
            latest: r.start,
            first: r.first,
            tried: 0,
            counted: 0,
            report: Report {
                rounds: 1,
                ..Report::default()
            },
            last: None,
            probe: None,
            shadow: None,
            stopped: None,
            pending: SmallVec::new(),
            round_end: r.start,
        }
    }

    /// What follows an attempt of provider `i`.
    #[inline(always)]
    fn decide(&mut self, i: u8, attempted: Attempted, steps: &mut Steps) -> Next {
        match attempted {
            Attempted::Failed(v, ended) => {
                self.latest = ended;
                match v.class {
                    Classification::Permanent => Next::Done(FailReason::Permanent),
                    _ if self.policy.admission.enabled && admission::is_unreached(v) => {
                        // Never received: again when its gate admits it.
                        steps.push_back(Step::Again(i));
                        Next::Continue
                    }
                    c if c.is_retryable() => {
                        self.pending.push((i, c));
                        Next::Continue
                    }
                    _ => Next::Continue,
                }
            }
            Attempted::Expired => Next::Done(FailReason::DeadlineExceeded { wait: None }),
        }
    }

    /// Plans the round after `round` into `steps` (in place: the plan is
    /// not returned by value, a copy of its inline array per round): `Err`
    /// with the reason when there is none.
    fn plan_round(&mut self, round: u32, steps: &mut Steps) -> Result<(), FailReason> {
        if self.pending.is_empty() {
            return Err(self.stopped.take().unwrap_or(FailReason::NotRetryable));
        }
        if round >= self.policy.max_rounds {
            return Err(FailReason::RoundsExhausted);
        }
        let m = self.m;
        let policy = self.policy;
        let round_end = self.latest;
        let learned = |i: u8| m.learned_delay(i, policy, round_end);
        let mut plan = SmallVec::new();
        let too_long = schedule(policy, round, &self.pending, &learned, &mut plan);
        if let Some(retry_after) = too_long {
            m.metrics.skipped(Skip::RetryAfter);
            self.stopped = Some(FailReason::RetryAfterTooLong { retry_after });
        }
        self.pending.clear();
        if plan.is_empty() {
            return Err(self.stopped.take().unwrap_or(FailReason::NotRetryable));
        }
        tracing::info!(
            target: "retryctl",
            model = m.name,
            round = round + 1,
            attempts = self.report.attempts,
            providers = plan.len(),
            delay_ms = plan[0].wait.as_millis() as u64,
            "retrying after transient failure"
        );
        self.round_end = round_end;
        steps.extend(plan.iter().map(|&r| Step::Timed(r)));
        Ok(())
    }
}

impl<'a, P, E: std::fmt::Display> Call<'a, P, E> {
    /// Checks the deadline and pays the budget for a later round's retry:
    /// when it can start (the caller waits until then, see
    /// [`Call::wait_until`]). `None`: this retry is not made (and, when
    /// the reason holds for every later one, neither are they). Out of
    /// line: the success path, inlined into the loop, should not carry it.
    #[inline(never)]
    fn pay_retry(&mut self, r: Retry, round: u32, steps: &mut Steps) -> Option<Moment> {
        let m = self.m;
        let policy = self.policy;
        // Not before now: an earlier retry of this round may have used the
        // time up to (or past) this one's planned start.
        let ready = (self.round_end + r.wait).max(self.latest);
        if ready >= self.deadline {
            tracing::info!(
                target: "retryctl",
                model = m.name,
                wait_ms = r.wait.as_millis() as u64,
                left_ms = self.deadline.saturating_duration_since(self.round_end).as_millis() as u64,
                "retry skipped: the wait would pass the deadline"
            );
            m.metrics.skipped(Skip::Deadline);
            self.stopped = Some(FailReason::DeadlineExceeded { wait: Some(r.wait) });
            // The round's later retries wait longer still.
            steps.retain(|s| !matches!(s, Step::Timed(_)));
            return None;
        }
        if let Some(p50) = cannot_finish(m, r.index, policy, self.round_end, ready, self.deadline) {
            tracing::info!(
                target: "retryctl",
                model = m.name,
                provider = m.routes[r.index as usize].name,
                wait_ms = r.wait.as_millis() as u64,
                p50_ms = p50.as_millis() as u64,
                "retry skipped: it could not finish before the deadline"
            );
            m.metrics.skipped(Skip::DeadlinePredicted);
            self.stopped = Some(FailReason::RetryCannotFinish { wait: r.wait, p50 });
            return None;
        }
        if !m.budget.withdraw_at(self.latest, &policy.budget) {
            tracing::warn!(
                target: "retryctl",
                model = m.name,
                attempts = self.report.attempts,
                "retry refused by the retry budget"
            );
            m.metrics.skipped(Skip::Budget);
            self.stopped = Some(FailReason::BudgetExhausted);
            steps.retain(|s| !matches!(s, Step::Timed(_)));
            return None;
        }
        if let Some(shadow) = &mut self.shadow {
            shadow.charge(m, round);
        }
        self.report.rounds = self.report.rounds.max(round);
        Some(ready)
    }

    /// Waits until `ready` (after the latest clock reading), and counts
    /// the wait.
    async fn wait_until(&mut self, ready: Moment) {
        let before = self.latest;
        // On a timer from the thread's stock (as an attempt's limit is):
        // no timer-wheel insertion and removal per retry.
        Timer::until(ready).expired().await;
        self.latest = self.m.clock.now();
        let waited = self.latest - before;
        self.report.waited += waited;
        self.m.metrics.retry_delay(waited);
    }

    /// Passes provider `i`'s limiting gate: defers to another provider
    /// that can go now, or waits in line, within `admission.max_wait`
    /// (counted over the whole call) and the deadline.
    async fn admit(&mut self, i: u8, others_ready: bool) -> Admit<'a> {
        let admission = &self.policy.admission;
        let gate = &self.m.routes[usize::from(i)].gate;
        if others_ready {
            return Admit::Defer;
        }
        let left = admission.max_wait.saturating_sub(self.report.queued);
        let until = self
            .latest
            .checked_add(left)
            .map_or(self.deadline, |t| t.min(self.deadline));
        let entered = gate.enter(admission, until).await;
        let now = self.m.clock.now();
        let waited = now.saturating_duration_since(self.latest);
        self.latest = now;
        self.report.waited += waited;
        self.report.queued += waited;
        match entered {
            Ok(permit) => Admit::Go(Some(permit)),
            Err(Refused::TimedOut) => {
                tracing::warn!(
                    target: "retryctl",
                    model = self.m.name,
                    provider = self.m.routes[usize::from(i)].name,
                    waited_ms = self.report.queued.as_millis() as u64,
                    "request not admitted in time: the provider is not accepting work"
                );
                Admit::Refused(FailReason::AdmissionTimeout {
                    waited: self.report.queued,
                })
            }
            Err(Refused::QueueFull) => Admit::Refused(FailReason::AdmissionQueueFull),
        }
    }

    /// Starts an attempt of provider `i`: its time limit and its
    /// accounting. `None`: the deadline has passed.
    #[inline(always)]
    fn begin(&mut self, i: u8, route: &Route<P>) -> Option<Begun> {
        let now = self.latest;
        if now >= self.deadline {
            return None;
        }
        let was_probe = self.probe.as_ref().is_some_and(|g| g.index == i);
        let begun = attempt_limit(self.resolved, route, now, self.deadline, was_probe);
        self.count_attempt(i);
        Some(begun)
    }

    /// Counts an attempt of provider `i` (a retry if it was tried before).
    #[inline(always)]
    fn count_attempt(&mut self, i: u8) {
        self.report.attempts += 1;
        let bit = 1u64 << i;
        if self.tried & bit != 0 {
            self.report.retries += 1;
            self.m.metrics.retry();
        }
        self.tried |= bit;
    }

    /// [`record_served`] for a failed attempt: `Err` when its time
    /// limit ended it. Out of line: the success path, inlined into the
    /// loop, should not carry it.
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn record_failure(
        &mut self,
        i: u8,
        route: &Route<P>,
        round: u32,
        paid: bool,
        begun: Begun,
        permit: Option<Permit<'a>>,
        failed: Result<E, Expired>,
    ) -> Attempted {
        let m = self.m;
        let active = self.resolved;
        let policy = self.policy;
        let Begun {
            now,
            until,
            adaptive,
            was_probe,
        } = begun;
        let bit = 1u64 << i;
        let (verdict, expired) = match failed {
            Ok(e) => {
                let v = self.classifier.verdict(&e, active.rules());
                self.last = Some(AttemptError::Upstream(e));
                (v, false)
            }
            Err(_) => {
                let limit = until.saturating_duration_since(now);
                self.last = Some(AttemptError::TimedOut(limit));
                if adaptive {
                    // Far beyond this provider's usual answer time: most
                    // likely a stalled connection, worth retrying.
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
        let ended = m.clock.now();
        let gate_probe = permit.as_ref().is_some_and(|p| p.probe);
        if let Some(permit) = permit {
            // A deadline cut says nothing about the upstream; a slow
            // answer is not a connection-level failure.
            let outcome = if expired {
                Outcome::Abandoned
            } else {
                Outcome::of(verdict)
            };
            permit.finish(outcome, &policy.admission);
        }
        if paid {
            m.budget.record_retry(ended, &policy.budget, false);
        }
        let took = ended.nanos_since(now);
        let elapsed = Duration::from_nanos(took);
        route.stats.record(ended, took, Some(verdict.cause));
        route.metrics.attempt(Some(verdict.cause), elapsed);
        route.record_recovery(policy, ended, Some(verdict.class));
        m.resolve_shadow(route, now, Some(verdict.class));
        if self.report.failures.capacity() == 0 {
            // Room for one failure per provider, allocated at once: a
            // first push would go through the vector's growth path and
            // take room for four, for the one failure most retried calls
            // have.
            self.report.failures = Vec::with_capacity(m.routes.len());
        }
        self.report.failures.push(FailedAttempt {
            provider: route.name,
            round,
            verdict,
            elapsed,
            probe: gate_probe,
        });
        tracing::debug!(
            target: "retryctl",
            model = m.name,
            provider = route.name,
            round,
            cause = verdict.cause.as_str(),
            "attempt failed"
        );
        // A deadline cut says nothing about the provider; neither does a
        // client error. Each provider counts at most once per request.
        if !expired
            && verdict.class != Classification::Permanent
            && verdict.cause.is_provider_fault()
            && self.counted & bit == 0
        {
            self.counted |= bit;
            match route.health.on_failure(ended, &policy.health, was_probe) {
                HealthEvent::Demoted => {
                    route.metrics.demoted();
                    tracing::warn!(
                        target: "retryctl",
                        model = m.name,
                        provider = route.name,
                        after = policy.health.demote_after,
                        "provider demoted after consecutive failed requests"
                    )
                }
                HealthEvent::ProbeFailed => tracing::info!(
                    target: "retryctl",
                    model = m.name,
                    provider = route.name,
                    "probe of demoted provider failed"
                ),
                HealthEvent::Unchanged | HealthEvent::Recovered => {}
            }
        }
        if was_probe {
            self.probe = None;
        }
        if expired {
            Attempted::Expired
        } else {
            Attempted::Failed(verdict, ended)
        }
    }

    /// The call was served by provider `i`, whose attempt ended at `ended`
    /// after `took` nanoseconds.
    #[inline(always)]
    fn served<T>(
        &mut self,
        i: u8,
        route: &Route<P>,
        value: T,
        ended: Moment,
        took: u64,
    ) -> Served<T> {
        let m = self.m;
        let fell_back = i != self.first;
        // The first attempt started at `start`, and one that did not wait
        // at a gate lasted as long as the request.
        let at_once = self.report.attempts == 1 && self.report.queued.is_zero();
        self.report.elapsed = Duration::from_nanos(if at_once {
            took
        } else {
            ended.nanos_since(self.start)
        });
        let r = &self.report;
        if at_once {
            m.metrics.served_at_once(&route.metrics, took, fell_back);
        } else {
            route.metrics.attempt(None, Duration::from_nanos(took));
            m.metrics
                .served(r.retries > 0, r.attempts, r.elapsed, fell_back);
        }
        if let Some(shadow) = &self.shadow {
            shadow.observe(m, r, Ended::Served(i));
        }
        Served {
            value,
            provider: route.name,
            fell_back,
            // The call ends here: its report is copied out, its (empty)
            // list of failures taken, and nothing else reset.
            report: Report {
                failures: std::mem::take(&mut self.report.failures),
                ..self.report
            },
        }
    }

    /// The call failed: its accounting, metrics and log. Out of line, so
    /// the success path neither moves the call's state nor carries this.
    #[cold]
    #[inline(never)]
    fn fail(mut self, reason: FailReason) -> PoolError<E> {
        let m = self.m;
        self.report.elapsed = m.clock.now().saturating_duration_since(self.start);
        let r = &self.report;
        m.metrics
            .failed(reason.as_str(), r.retries > 0, r.attempts, r.elapsed);
        if let Some(shadow) = &self.shadow {
            shadow.observe(m, r, Ended::Failed(&reason));
        }
        let last = self
            .last
            .as_ref()
            .map(|e| e.to_string())
            .unwrap_or_default();
        if matches!(reason, FailReason::Permanent) {
            tracing::debug!(
                target: "retryctl",
                model = m.name,
                attempts = r.attempts,
                last_error = %last,
                "request rejected by the upstream (not retried)"
            );
        } else {
            tracing::warn!(
                target: "retryctl",
                model = m.name,
                attempts = r.attempts,
                rounds = r.rounds,
                reason = reason.as_str(),
                elapsed_ms = r.elapsed.as_millis() as u64,
                last_error = %last,
                "all providers failed"
            );
        }
        let below = match &self.last {
            Some(AttemptError::Upstream(e)) => chain_below(self.classifier.error_source(e)),
            _ => None,
        };
        PoolError {
            reason,
            last: self.last,
            report: self.report,
            below,
        }
    }
}

/// Provider `route`'s admission gate when it does not limit: admission
/// off, or the gate open (one atomic add). `None`: the gate limits, see
/// [`Call::admit`].
#[inline(always)]
fn try_admit<'a, P>(policy: &Policy, route: &'a Route<P>, now: Moment) -> Option<Admit<'a>> {
    let gate = &route.gate;
    if !policy.admission.enabled {
        if !gate.is_open() {
            // Switched off while the gate held requests: let them go.
            gate.open_now();
        }
        return Some(Admit::Go(None));
    }
    gate.try_enter(now).map(|p| Admit::Go(Some(p)))
}

/// The time limit of an attempt of `route` starting at `now`, before
/// `deadline` (which has not passed).
#[inline(always)]
fn attempt_limit<P>(
    resolved: &ModelPolicy,
    route: &Route<P>,
    now: Moment,
    deadline: Moment,
    was_probe: bool,
) -> Begun {
    // Moments, not durations: the limit as a duration is only needed when
    // the attempt times out.
    let fixed = now
        .checked_add_nanos(resolved.attempt_nanos())
        .map_or(deadline, |end| end.min(deadline));
    let adaptive = adaptive_limit(route, resolved.policy(), now)
        .and_then(|a| now.checked_add(a))
        .filter(|end| *end < fixed);
    Begun {
        now,
        until: adaptive.unwrap_or(fixed),
        adaptive: adaptive.is_some(),
        was_probe,
    }
}

/// Records that an attempt of `route` succeeded, in the provider's
/// health, statistics and gate and in the hooks (`paid`: a later round's
/// retry, the budget paid), and returns when it ended and how long it
/// took, in nanoseconds. Its metrics are recorded with the request's. (A probe it carried
/// is the caller's to let go.)
#[inline(always)]
fn record_served<P>(
    m: &Model<P>,
    route: &Route<P>,
    policy: &Policy,
    paid: bool,
    begun: &Begun,
    permit: Option<Permit<'_>>,
) -> (Moment, u64) {
    let ended = m.clock.now();
    if let Some(permit) = permit {
        permit.finish(Outcome::Reached, &policy.admission);
    }
    if paid {
        m.budget.record_retry(ended, &policy.budget, true);
    }
    let elapsed = ended.nanos_since(begun.now);
    route.stats.record(ended, elapsed, None);
    route.record_recovery(policy, ended, None);
    m.resolve_shadow(route, begun.now, None);
    if route.health.on_success() == HealthEvent::Recovered {
        route.metrics.recovered();
        tracing::info!(
            target: "retryctl",
            model = m.name,
            provider = route.name,
            probe = begun.was_probe,
            "provider recovered"
        );
    }
    (ended, elapsed)
}

/// The call's deadline: the caller's, else its timeout from `start`, else
/// the policy's `timeouts.request` (a day past `start` if even that
/// overflows).
#[inline(always)]
fn deadline_of(options: CallOptions, start: Moment, resolved: &ModelPolicy) -> Moment {
    options
        .deadline
        .map(Moment::of)
        .or_else(|| options.timeout.and_then(|t| start.checked_add(t)))
        .or_else(|| start.checked_add_nanos(resolved.request_nanos()))
        .unwrap_or(start + Duration::from_secs(86_400))
}

/// `error` and every error below it, `": "`-joined.
fn chain_below(error: Option<&(dyn std::error::Error + 'static)>) -> Option<Box<str>> {
    use std::fmt::Write as _;
    let first = error?;
    let mut text = first.to_string();
    let mut below = first.source();
    while let Some(cause) = below {
        let _ = write!(text, ": {cause}");
        below = cause.source();
    }
    Some(text.into_boxed_str())
}

/// With `adaptive.deadline_aware`: `Some(p50)` when a retry of provider
/// `i` that starts at `ready` would, at the provider's recent median
/// attempt latency, end past the deadline. With too few samples, `None`
/// (the fixed rule, the wait alone, already applied).
fn cannot_finish<P>(
    m: &Model<P>,
    i: u8,
    policy: &Policy,
    now: Moment,
    ready: Moment,
    deadline: Moment,
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
/// provider's recent p99, when there are enough samples. The option's
/// check is inline (every attempt makes it, and it is off by default);
/// the statistics are read out of line.
#[inline(always)]
fn adaptive_limit<P>(route: &super::Route<P>, policy: &Policy, now: Moment) -> Option<Duration> {
    if !policy.adaptive.attempt_timeout {
        return None;
    }
    p99_limit(route, policy, now)
}

/// [`adaptive_limit`] once the option is on.
#[inline(never)]
fn p99_limit<P>(route: &super::Route<P>, policy: &Policy, now: Moment) -> Option<Duration> {
    let a = &policy.adaptive;
    let (_, p99) = route.stats.recent_latency(now, a.min_samples)?;
    Some(
        p99.mul_f64(a.attempt_timeout_factor)
            .clamp(a.attempt_timeout_min, a.attempt_timeout_max),
    )
}
