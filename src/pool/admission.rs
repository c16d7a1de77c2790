//! The per-provider admission gate: requests wait for an unreachable
//! upstream instead of failing, and only a probe finds out whether it is
//! back.
//!
//! # Why a gate, and why not latency
//!
//! A retry on a timer helps only when the fault is shorter than the wait.
//! A restart lasts seconds and an overflowing accept queue refills with
//! the very retries sent into it, so blind retries fail again, spend the
//! retry budget and add load at the worst moment. gRPC's wait-for-ready,
//! linkerd's dispatch queue and HAProxy's turn-around all do better by
//! *waiting* for the upstream. The gate does that per provider, driven by
//! *connection-level* outcomes only: the upstream was not reached or
//! refused the work (see [`Outcome`]). Latency never closes it: an LLM
//! call's latency follows the length of its output, not the upstream's
//! load, so latency-driven limits (Envoy's adaptive concurrency, Netflix's
//! Gradient) misfire here.
//!
//! # States
//!
//! * **open** (the normal state): no limit. Entering and leaving cost one
//!   atomic add each on a word that packs the limit and the attempts in
//!   flight; nothing else is touched.
//! * **limited**: a connection-level failure set the limit to
//!   `decrease` x the attempts in flight (at least `min_limit`); further
//!   failures shrink it again from the count in flight at that moment.
//!   Attempts beyond the limit wait in FIFO order. An attempt counts
//!   against the limit only through its connect phase (`timeouts.connect`):
//!   the limit is about connections the upstream could not accept, and an
//!   LLM generation of minutes must not hold a slot. A success grows the
//!   limit while it is reached (slow start, +1 per success, up to the
//!   limit the last shrink set; then +1 per limit's worth of successes,
//!   not past the in-flight count of the last connect timeout for 10 s),
//!   and the gate opens again once nobody waits and the limit is at least
//!   twice the attempts in flight: it no longer limits anything. Growth
//!   waits for the stragglers: while an attempt admitted before the limit
//!   last changed is still connecting, successes do not grow it. A success
//!   comes back in a round trip, a connect the accept queue dropped only
//!   after `timeouts.connect`; growing on successes alone sends ever larger
//!   bursts into a full queue for that long (in the demo, 180 connect
//!   timeouts after each restart instead of a handful).
//!   An attempt whose connect phase passes without a connection-level
//!   failure has its connection: it counts as reached then (growth, or for
//!   the probe, recovery), not when its answer comes minutes later.
//! * **down**: a connection-level failure at the floor, or a refused
//!   connect that brings the limit to the floor: at the floor the next
//!   attempt (often the refused request itself) would go at once, and a
//!   closed port refuses it within a round trip, a probe without the
//!   probe's delay. A connect timeout keeps the floor: an overflowing
//!   accept queue may take one connect at a time. Only one attempt at a
//!   time goes through, the *probe*, after `probe_delay` (doubling
//!   after each failed probe, up to `probe_max_delay`); every other
//!   request waits for the probe's outcome instead of retrying on its own
//!   timer. The probe is the request at the head of the queue, or the next
//!   request to arrive. A probe that reaches the upstream (a success, or
//!   any answer that is not connection-level) reopens the gate with slow
//!   start from `min_limit`, so a restarted upstream is not hit by every
//!   waiting request at once: after refusals (an outage) doubling until
//!   the gate opens, after connect timeouts (overload) doubling only up to
//!   the last limit, then additively. Only the probe does: an attempt
//!   admitted before the provider went down may be on a connection older
//!   than the outage (keep-alive), and its answer, or a reset of it after
//!   the request was sent, says nothing about whether the upstream takes
//!   connections now.
//!
//! A 502/503 is not a connection-level outcome here: the upstream (or its
//! proxy) answered, so it is reachable. On the demo's mix, random 502/503
//! noise at 2% of attempts kept a healthy upstream's limit at 1, and the
//! requests queued behind it failed (`admission_queue_full`); those
//! statuses are retried in rounds, under the budget.
//!
//! The waits are bounded by the caller (the request's deadline and its
//! `admission.max_wait`); a waiter that gives up or is cancelled leaves
//! the queue at once, and a slot granted to a waiter that is gone is
//! handed to the next one.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::clock::Moment;
use metrics::{Counter, Gauge, Histogram};
use tokio::sync::Notify;

use crate::classify::{Cause, Verdict};
use crate::policy::AdmissionPolicy;
use crate::stripe::{self, Padded, STRIPES};

/// The limit's value while the gate is open.
const OPEN: u32 = u32::MAX;
/// The limit's value while the provider is down (only the probe enters).
const DOWN: u32 = 0;
/// The in-flight count's bits in the state word.
const IN_FLIGHT: u64 = u32::MAX as u64;

fn limit_of(word: u64) -> u32 {
    (word >> 32) as u32
}

fn in_flight_of(word: u64) -> u32 {
    (word & IN_FLIGHT) as u32
}

/// How an admitted attempt ended, as the gate sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The upstream was reached and answered (a success, or a failure
    /// that is not connection-level: it is up).
    Reached,
    /// Nothing took the connection: connect refused, another connect
    /// failure, a request handed back unsent. An outage (a restart):
    /// once the provider is back, it can take what it took before.
    Refused,
    /// The connect did not complete in time: the accept queue is full.
    /// Overload: the provider is back with the capacity it had.
    ConnectTimeout,
    /// The attempt was cancelled or cut by the caller's deadline: it says
    /// nothing about the upstream.
    Abandoned,
}

impl Outcome {
    /// The gate's view of a failed attempt's verdict.
    pub(crate) fn of(verdict: Verdict) -> Outcome {
        if verdict.cause == Cause::ConnectTimeout {
            Outcome::ConnectTimeout
        } else if is_unreached(verdict) {
            Outcome::Refused
        } else {
            Outcome::Reached
        }
    }

    /// A connection-level failure.
    fn is_failure(self) -> bool {
        matches!(self, Outcome::Refused | Outcome::ConnectTimeout)
    }
}

/// Whether the upstream certainly never received the request: re-sending
/// it is safe and costs the upstream almost nothing, so such a retry is
/// bounded by `admission.max_wait` and the deadline, not by `max_rounds`
/// or the retry budget.
pub(crate) fn is_unreached(verdict: Verdict) -> bool {
    matches!(
        verdict.cause,
        Cause::ConnectRefused | Cause::Connect | Cause::ConnectTimeout | Cause::NotSent
    )
}

/// Why a request was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The wait reached its bound (`max_wait` or the deadline).
    TimedOut,
    /// `max_waiting` requests were already waiting.
    QueueFull,
}

/// A waiter's state, written under the gate's lock.
const WAITING: u8 = 0;
const GRANTED: u8 = 1;
const GRANTED_PROBE: u8 = 2;

#[derive(Debug)]
struct Waiter {
    state: AtomicU8,
    notify: Notify,
}

/// The slow path's state: everything but the state word.
#[derive(Debug)]
struct Inner {
    waiters: VecDeque<Arc<Waiter>>,
    /// A probe is in flight.
    probing: bool,
    /// When the next probe may start (while down).
    probe_at: Moment,
    /// The wait after the next failed probe.
    probe_backoff: Duration,
    /// Above this limit, growth is additive; below it, slow start.
    threshold: u32,
    /// Successes counted toward the next additive step.
    credit: u32,
    /// The attempts in flight at the last connection-level failure: the
    /// limit does not grow back to it before `hold_until`.
    ceiling: u32,
    hold_until: Moment,
    /// The last failure was overload (a connect timeout), not
    /// refusal: recovery slow-starts only up to `threshold`, then grows
    /// additively, instead of doubling until the gate opens.
    overloaded: bool,
    /// Growth pacing. The limit's epoch changes with every shrink,
    /// recovery, doubling and additive step; `current` counts the attempts
    /// admitted in this epoch still connecting, `older` those admitted
    /// before it. The limit grows only while `older` is 0: an attempt that
    /// is still connecting may be a connect timeout on its way, and until
    /// it is known the gate must not admit more (see [`Gate::on_reached`]).
    epoch: u32,
    current: u32,
    older: u32,
    /// The limit when the epoch began: slow start doubles it, then waits
    /// for the epoch's stragglers.
    epoch_base: u32,
}

impl Inner {
    /// The limit changed to `limit`: what was admitted so far is older.
    fn new_epoch(&mut self, limit: u32) {
        self.epoch = self.epoch.wrapping_add(1);
        self.older = self.older.saturating_add(self.current);
        self.current = 0;
        self.epoch_base = limit;
    }

    /// An admitted attempt stopped connecting (it left, or its connect
    /// phase ended). `epoch`: the epoch it was admitted in (`None`:
    /// admitted while the gate was open, never counted).
    fn settle(&mut self, epoch: Option<u32>) {
        match epoch {
            Some(e) if e == self.epoch => self.current = self.current.saturating_sub(1),
            Some(_) => self.older = self.older.saturating_sub(1),
            None => {}
        }
    }
}

/// How long the limit stays below the in-flight count at which the
/// upstream last failed before additive growth probes past it again. An
/// overflowing accept queue costs a connect timeout per attempt beyond
/// its capacity: probing for more capacity once per 10 s instead of once
/// per few round trips keeps those failures rare while still finding
/// capacity that comes back.
const HOLD: Duration = Duration::from_secs(10);

/// The admission metric handles of one route, resolved once.
#[derive(Debug)]
pub(crate) struct GateMetrics {
    limit: Gauge,
    down: Gauge,
    in_flight: Gauge,
    waiting: Gauge,
    wait: Histogram,
    /// By [`Event`].
    events: [Counter; EVENTS.len()],
    /// By [`Transition`].
    transitions: [Counter; TRANSITIONS.len()],
}

/// `admission_total{outcome}` labels.
const EVENTS: [&str; 6] = [
    "admitted_after_wait",
    "timed_out",
    "queue_full",
    "cancelled",
    "probe_succeeded",
    "probe_failed",
];

#[derive(Clone, Copy)]
enum Event {
    AdmittedAfterWait = 0,
    TimedOut = 1,
    QueueFull = 2,
    Cancelled = 3,
    ProbeSucceeded = 4,
    ProbeFailed = 5,
}

/// `admission_transitions_total{event}` labels.
const TRANSITIONS: [&str; 4] = ["limited", "opened", "down", "recovered"];

#[derive(Clone, Copy)]
enum Transition {
    Limited = 0,
    Opened = 1,
    Down = 2,
    Recovered = 3,
}

impl GateMetrics {
    pub(crate) fn new(prefix: &str, model: &str, provider: &str) -> Self {
        let name = |n: &str| format!("{prefix}{n}");
        let (m, p) = (model.to_owned(), provider.to_owned());
        let gauge = |n: &str| {
            let g = metrics::gauge!(name(n), "model" => m.clone(), "provider" => p.clone());
            g.set(0.0);
            g
        };
        GateMetrics {
            limit: gauge("admission_limit"),
            down: gauge("admission_down"),
            in_flight: gauge("admission_in_flight"),
            waiting: gauge("admission_waiting"),
            wait: metrics::histogram!(name("admission_wait_seconds"), "model" => m.clone(), "provider" => p.clone()),
            events: EVENTS.map(|e| metrics::counter!(name("admission_total"), "model" => m.clone(), "provider" => p.clone(), "outcome" => e)),
            transitions: TRANSITIONS.map(|t| metrics::counter!(name("admission_transitions_total"), "model" => m.clone(), "provider" => p.clone(), "event" => t)),
        }
    }

    fn event(&self, e: Event) {
        self.events[e as usize].increment(1);
    }
}

/// Registers the HELP texts of the admission metrics.
pub(crate) fn describe(prefix: &str) {
    let n = |s: &str| format!("{prefix}{s}");
    metrics::describe_gauge!(
        n("admission_limit"),
        metrics::Unit::Count,
        "The provider's admission limit (attempts in flight); 0 while the gate is open (no limit)."
    );
    metrics::describe_gauge!(
        n("admission_down"),
        metrics::Unit::Count,
        "1 while the provider is down at its gate: only one probe attempt at a time goes through."
    );
    metrics::describe_gauge!(
        n("admission_in_flight"),
        metrics::Unit::Count,
        "Attempts in flight to the provider while its gate limits them (0 while the gate is open)."
    );
    metrics::describe_gauge!(
        n("admission_waiting"),
        metrics::Unit::Count,
        "Requests waiting at the provider's admission gate."
    );
    metrics::describe_histogram!(
        n("admission_wait_seconds"),
        metrics::Unit::Seconds,
        "Each wait at a provider's admission gate, admitted or not."
    );
    metrics::describe_counter!(
        n("admission_total"),
        metrics::Unit::Count,
        "Admission events by outcome: admitted_after_wait, timed_out (max_wait or the deadline), queue_full (max_waiting reached), cancelled (the request went away while waiting), probe_succeeded, probe_failed."
    );
    metrics::describe_counter!(
        n("admission_transitions_total"),
        metrics::Unit::Count,
        "Gate transitions: limited (a connection-level failure set a limit), opened (the limit no longer limited), down (a failure at the floor: probing), recovered (a probe reached the upstream)."
    );
    metrics::describe_gauge!(
        n("admission_max_wait_seconds"),
        metrics::Unit::Seconds,
        "The policy's admission.max_wait for the model: the longest a request waits at gates."
    );
}

/// One provider's admission gate (per route: model x provider).
#[derive(Debug)]
pub(crate) struct Gate {
    /// `limit << 32 | in_flight`; the limit is [`OPEN`] or [`DOWN`] in
    /// those states. `in_flight` counts the attempts admitted through the
    /// gate's lock (while it limited, or on its slow path).
    state: AtomicU64,
    /// Attempts admitted while the gate was open, per thread stripe: the
    /// open gate's enter and leave write only the calling thread's line,
    /// so requests on several cores do not pass a shared line back and
    /// forth on every call. In flight = `state`'s count + these.
    open: [Padded<AtomicU32>; STRIPES],
    inner: Mutex<Inner>,
    metrics: GateMetrics,
    model: &'static str,
    provider: &'static str,
}

/// An admitted attempt's slot: give it back with [`Permit::finish`];
/// dropping it (a cancelled attempt) gives it back as
/// [`Outcome::Abandoned`].
#[derive(Debug)]
pub(crate) struct Permit<'g> {
    gate: &'g Gate,
    /// This attempt is the probe of a down provider.
    pub(crate) probe: bool,
    /// Admitted while the gate limited: its slot counts only while it may
    /// still be connecting (see [`Permit::connected`]).
    limited: bool,
    /// The attempt still holds its slot.
    holding: bool,
    /// The gate's epoch when it was admitted (limited permits only).
    epoch: u32,
    /// Admitted by the open gate: the stripe of [`Gate::open`] it counts
    /// in ([`NOT_STRIPED`]: counted in `state`).
    stripe: u8,
}

/// [`Permit::stripe`] of a permit counted in the gate's `state`.
const NOT_STRIPED: u8 = u8::MAX;

impl Permit<'_> {
    /// Whether the caller should end this attempt's slot when its connect
    /// phase is over ([`Permit::connected`]): admitted while the gate
    /// limited or down. A probe past its connect phase has found the
    /// provider back: waiting for its answer (an LLM generation) would keep
    /// every other request waiting that long.
    pub(crate) fn connecting(&self) -> bool {
        self.limited && self.holding
    }

    /// The attempt is past its connect phase (`timeouts.connect` has
    /// passed): it has its connection, or has failed. The limit is about
    /// connections the upstream could not accept, so the attempt stops
    /// counting against it now; otherwise an LLM generation of minutes
    /// would hold a slot and every request behind it would wait.
    pub(crate) fn connected(&mut self, policy: &AdmissionPolicy) {
        if self.holding {
            self.holding = false;
            self.gate.release_slot(self.epoch(), self.probe, policy);
        }
    }

    /// The epoch it was admitted in, if admitted while the gate limited.
    fn epoch(&self) -> Option<u32> {
        self.limited.then_some(self.epoch)
    }

    /// Gives the slot back with the attempt's outcome.
    #[inline(always)]
    pub(crate) fn finish(self, outcome: Outcome, policy: &AdmissionPolicy) {
        self.gate.leave(
            self.probe,
            self.holding,
            self.stripe,
            self.epoch(),
            outcome,
            policy,
        );
        // Given back: its drop (an abandoned attempt's) must not run.
        std::mem::forget(self);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.gate.leave(
            self.probe,
            self.holding,
            self.stripe,
            self.epoch(),
            Outcome::Abandoned,
            &AdmissionPolicy::default(),
        );
    }
}

/// Removes a waiter from the queue if its wait is dropped (cancelled)
/// before it saw the outcome; a slot granted to it meanwhile goes back.
struct WaitGuard<'g> {
    gate: &'g Gate,
    waiter: Arc<Waiter>,
    armed: bool,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let gate = self.gate;
            let mut inner = gate.lock();
            gate.abandon_wait(&mut inner, &self.waiter);
            gate.metrics.event(Event::Cancelled);
            gate.dispatch(&mut inner, Moment::now());
            gate.publish(&inner);
        }
    }
}

impl Gate {
    pub(crate) fn new(metrics: GateMetrics, model: &'static str, provider: &'static str) -> Gate {
        Gate {
            state: AtomicU64::new(u64::from(OPEN) << 32),
            open: Default::default(),
            inner: Mutex::new(Inner {
                waiters: VecDeque::new(),
                probing: false,
                probe_at: Moment::now(),
                probe_backoff: Duration::ZERO,
                threshold: OPEN,
                credit: 0,
                ceiling: OPEN,
                hold_until: Moment::now(),
                overloaded: false,
                epoch: 0,
                current: 0,
                older: 0,
                epoch_base: 0,
            }),
            metrics,
            model,
            provider,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every
        // update is a few assignments): keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the gate is open (no limit): one relaxed load.
    #[inline]
    pub(crate) fn is_open(&self) -> bool {
        limit_of(self.state.load(Ordering::Relaxed)) == OPEN
    }

    /// Attempts in flight, given a load of `state`.
    fn in_flight(&self, word: u64) -> u32 {
        self.open.iter().fold(in_flight_of(word), |n, Padded(c)| {
            n.wrapping_add(c.load(Ordering::SeqCst))
        })
    }

    /// Admits an attempt now, or says it would have to wait (`None`).
    /// Open gate: one atomic add on this thread's own line, and a load.
    ///
    /// The add comes first and both are sequentially consistent, like
    /// [`Gate::set_limit`]'s store and the loads of [`Gate::in_flight`]
    /// after it: an attempt that saw the gate open is counted by every sum
    /// taken once the gate limits, and one that saw it limit backs out.
    #[inline(always)]
    pub(crate) fn try_enter(&self, now: Moment) -> Option<Permit<'_>> {
        let stripe = stripe::index();
        let Padded(count) = &self.open[stripe];
        count.fetch_add(1, Ordering::SeqCst);
        if limit_of(self.state.load(Ordering::SeqCst)) == OPEN {
            return Some(Permit {
                gate: self,
                probe: false,
                limited: false,
                holding: true,
                epoch: 0,
                stripe: stripe as u8,
            });
        }
        count.fetch_sub(1, Ordering::SeqCst);
        self.try_enter_limited(now)
    }

    /// [`Gate::try_enter`] when the gate was not open: out of line, so the
    /// open gate's path inlined into every call stays a few instructions.
    #[inline(never)]
    fn try_enter_limited(&self, now: Moment) -> Option<Permit<'_>> {
        let mut inner = self.lock();
        let admitted = if inner.waiters.is_empty() {
            self.admit_now(&mut inner, now)
        } else {
            None
        };
        self.dispatch(&mut inner, now);
        self.publish(&inner);
        admitted
    }

    /// Waits in FIFO order until admitted, or until `until`. A wait that
    /// is dropped leaves the queue at once.
    pub(crate) async fn enter(
        &self,
        policy: &AdmissionPolicy,
        until: Moment,
    ) -> Result<Permit<'_>, Refused> {
        let now = Moment::now();
        if let Some(permit) = self.try_enter(now) {
            return Ok(permit);
        }
        let waiter = Arc::new(Waiter {
            state: AtomicU8::new(WAITING),
            notify: Notify::new(),
        });
        {
            let mut inner = self.lock();
            if inner.waiters.len() >= policy.max_waiting as usize {
                self.metrics.event(Event::QueueFull);
                return Err(Refused::QueueFull);
            }
            // Checked again under the lock: a slot may have freed since.
            if inner.waiters.is_empty()
                && let Some(permit) = self.admit_now(&mut inner, now)
            {
                self.publish(&inner);
                return Ok(permit);
            }
            inner.waiters.push_back(waiter.clone());
            self.publish(&inner);
        }
        let mut guard = WaitGuard {
            gate: self,
            waiter,
            armed: true,
        };
        let result = self.wait(&guard.waiter, until).await;
        guard.armed = false;
        let waited = Moment::now().saturating_duration_since(now);
        self.metrics.wait.record(waited.as_secs_f64());
        if result.is_ok() {
            self.metrics.event(Event::AdmittedAfterWait);
        } else {
            self.metrics.event(Event::TimedOut);
        }
        result
    }

    async fn wait(&self, waiter: &Arc<Waiter>, until: Moment) -> Result<Permit<'_>, Refused> {
        loop {
            let wake = {
                let mut inner = self.lock();
                let now = Moment::now();
                if let Some(permit) = self.take_grant(&mut inner, waiter) {
                    return Ok(permit);
                }
                if now >= until {
                    self.abandon_wait(&mut inner, waiter);
                    self.dispatch(&mut inner, now);
                    self.publish(&inner);
                    return Err(Refused::TimedOut);
                }
                // While the provider is down, every waiter keeps a timer
                // for the next probe (the first to wake grants it to the
                // head of the queue): no waiter's departure can leave the
                // probe without a timer.
                let down = limit_of(self.state.load(Ordering::Acquire)) == DOWN;
                if down && !inner.probing {
                    Some(inner.probe_at)
                } else {
                    None
                }
            };
            let until = wake.map_or(until, |w| w.min(until));
            tokio::select! {
                _ = waiter.notify.notified() => {}
                _ = tokio::time::sleep_until(until.instant()) => {
                    let mut inner = self.lock();
                    self.dispatch(&mut inner, Moment::now());
                    self.publish(&inner);
                }
            }
        }
    }

    /// A grant made to `waiter`, if any, as its permit.
    fn take_grant(&self, inner: &mut Inner, waiter: &Waiter) -> Option<Permit<'_>> {
        match waiter.state.swap(WAITING, Ordering::AcqRel) {
            GRANTED => Some(self.permit(inner, false)),
            GRANTED_PROBE => Some(self.permit(inner, true)),
            _ => None,
        }
    }

    /// Takes `waiter` out of the queue, or gives back a slot granted to
    /// it that it will not use.
    fn abandon_wait(&self, inner: &mut Inner, waiter: &Arc<Waiter>) {
        if let Some(i) = inner.waiters.iter().position(|w| Arc::ptr_eq(w, waiter)) {
            let _ = inner.waiters.remove(i);
            return;
        }
        match waiter.state.swap(WAITING, Ordering::AcqRel) {
            GRANTED => {
                self.state.fetch_sub(1, Ordering::AcqRel);
            }
            GRANTED_PROBE => {
                self.state.fetch_sub(1, Ordering::AcqRel);
                inner.probing = false;
                Self::wake_all(inner);
            }
            _ => {}
        }
    }

    /// A slot taken on the slow path (the gate limited, or down).
    fn permit(&self, inner: &mut Inner, probe: bool) -> Permit<'_> {
        inner.current = inner.current.saturating_add(1);
        Permit {
            gate: self,
            probe,
            limited: true,
            holding: true,
            epoch: inner.epoch,
            stripe: NOT_STRIPED,
        }
    }

    /// An attempt past its connect phase frees its slot early.
    /// It connected (its connect phase passed without a connection-level
    /// failure): the upstream took the connection, which is what the
    /// limit is about, so it grows the limit now, not when the answer
    /// comes (an LLM generation may take minutes).
    fn release_slot(&self, epoch: Option<u32>, probe: bool, policy: &AdmissionPolicy) {
        let prev = self.state.fetch_sub(1, Ordering::SeqCst);
        let limit = limit_of(prev);
        if limit != OPEN || probe {
            let in_flight = self.in_flight(prev);
            let now = Moment::now();
            let mut inner = self.lock();
            inner.settle(epoch);
            if probe {
                // (Also when the gate opened meanwhile: the flag must not
                // outlive the probe.)
                inner.probing = false;
            }
            if limit != OPEN {
                self.on_reached(&mut inner, probe, limit, in_flight, policy, now);
            }
            self.dispatch(&mut inner, now);
            self.publish(&inner);
        }
    }

    /// Admits one attempt if the state allows it now (the caller checked
    /// that nobody waits ahead of it).
    fn admit_now(&self, inner: &mut Inner, now: Moment) -> Option<Permit<'_>> {
        let word = self.state.load(Ordering::Acquire);
        let limit = limit_of(word);
        if limit == DOWN {
            if inner.probing || now < inner.probe_at {
                return None;
            }
            inner.probing = true;
            self.state.fetch_add(1, Ordering::AcqRel);
            return Some(self.permit(inner, true));
        }
        if limit == OPEN || self.in_flight(word) < limit {
            self.state.fetch_add(1, Ordering::SeqCst);
            return Some(self.permit(inner, false));
        }
        None
    }

    /// Grants free slots (or a due probe) to the waiters at the head of
    /// the queue.
    fn dispatch(&self, inner: &mut Inner, now: Moment) {
        while let Some(head) = inner.waiters.front() {
            let word = self.state.load(Ordering::Acquire);
            let limit = limit_of(word);
            let state = if limit == DOWN {
                if inner.probing || now < inner.probe_at {
                    // The head's timer wakes it when the probe is due.
                    break;
                }
                inner.probing = true;
                GRANTED_PROBE
            } else if limit == OPEN || self.in_flight(word) < limit {
                GRANTED
            } else {
                break;
            };
            self.state.fetch_add(1, Ordering::AcqRel);
            head.state.store(state, Ordering::Release);
            head.notify.notify_one();
            inner.waiters.pop_front();
        }
    }

    /// Wakes every waiter to re-arm its timer for the next probe (the
    /// probe's time changed). Once per probe: cheap next to the probe.
    fn wake_all(inner: &Inner) {
        for w in &inner.waiters {
            w.notify.notify_one();
        }
    }

    /// Sets the limit, keeping the in-flight count.
    fn set_limit(&self, limit: u32) {
        let _ = self
            .state
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                Some(u64::from(limit) << 32 | (w & IN_FLIGHT))
            });
    }

    /// An attempt left: its slot is free, and its outcome moves the limit.
    #[inline(always)]
    fn leave(
        &self,
        probe: bool,
        holding: bool,
        stripe: u8,
        epoch: Option<u32>,
        outcome: Outcome,
        policy: &AdmissionPolicy,
    ) {
        let prev = if stripe != NOT_STRIPED {
            // Admitted by the open gate (which holds until the end).
            let Padded(count) = &self.open[usize::from(stripe)];
            count.fetch_sub(1, Ordering::SeqCst);
            self.state.load(Ordering::SeqCst)
        } else if holding {
            self.state.fetch_sub(1, Ordering::SeqCst)
        } else {
            self.state.load(Ordering::SeqCst)
        };
        if limit_of(prev) == OPEN && !outcome.is_failure() && !probe {
            return;
        }
        // What was in flight with this attempt still counted.
        let in_flight = self
            .in_flight(prev)
            .wrapping_add(u32::from(stripe != NOT_STRIPED));
        self.leave_limited(probe, holding, epoch, outcome, policy, in_flight);
    }

    /// [`Gate::leave`] past the open gate's success: the limit and the
    /// waiters. Out of line, like [`Gate::try_enter_limited`].
    #[inline(never)]
    fn leave_limited(
        &self,
        probe: bool,
        holding: bool,
        epoch: Option<u32>,
        outcome: Outcome,
        policy: &AdmissionPolicy,
        in_flight: u32,
    ) {
        let now = Moment::now();
        let mut inner = self.lock();
        if holding {
            inner.settle(epoch);
        }
        let limit = limit_of(self.state.load(Ordering::Acquire));
        // A probe past its connect phase ended its part then.
        let probe = probe && holding;
        if probe {
            // Whatever happened, the probe is over.
            inner.probing = false;
        }
        match outcome {
            Outcome::Abandoned => {
                if probe {
                    // Nobody learned anything: the next in line probes now.
                    inner.probe_at = now;
                    Self::wake_all(&inner);
                }
            }
            Outcome::Refused | Outcome::ConnectTimeout => {
                self.on_failure(&mut inner, outcome, probe, limit, in_flight, policy, now)
            }
            // Past its connect phase it was counted as reached then.
            Outcome::Reached if holding => {
                self.on_reached(&mut inner, probe, limit, in_flight, policy, now)
            }
            Outcome::Reached => {}
        }
        self.dispatch(&mut inner, now);
        self.publish(&inner);
    }

    #[allow(clippy::too_many_arguments)]
    fn on_failure(
        &self,
        inner: &mut Inner,
        outcome: Outcome,
        probe: bool,
        limit: u32,
        in_flight: u32,
        policy: &AdmissionPolicy,
        now: Moment,
    ) {
        if limit == DOWN {
            if probe {
                inner.probe_at = now + inner.probe_backoff;
                inner.probe_backoff = (inner.probe_backoff * 2).min(policy.probe_max_delay);
                Self::wake_all(inner);
                self.metrics.event(Event::ProbeFailed);
                tracing::debug!(
                    target: "retryctl",
                    model = self.model,
                    provider = self.provider,
                    next_probe_ms = (inner.probe_at - now).as_millis() as u64,
                    "probe failed: the provider is still down"
                );
            }
            return;
        }
        let floor = policy.min_limit.max(1);
        inner.overloaded = outcome != Outcome::Refused;
        // `in_flight` counts this attempt: the limit is a share of what
        // was in flight when the upstream stopped taking work.
        let shrunk = ((f64::from(in_flight) * policy.decrease) as u32).max(floor);
        if limit == OPEN {
            // What is in flight was admitted while the gate was open: not
            // counted (such an attempt never ends its connect phase early,
            // and an LLM generation would hold growth for minutes).
            inner.current = 0;
            inner.older = 0;
        }
        // At the floor and still failing: down. A refusal that brings the
        // limit to the floor goes down at once: at the floor the gate
        // admits the next attempt (the refused request itself, re-attempted)
        // without a probe's delay, and a closed port refuses it within a
        // round trip. A connect timeout keeps the floor: an overflowing
        // accept queue may take one connect at a time.
        if (limit != OPEN && limit <= floor) || (outcome == Outcome::Refused && shrunk <= floor) {
            self.set_limit(DOWN);
            inner.new_epoch(DOWN);
            inner.probing = false;
            inner.probe_at = now + policy.probe_delay;
            inner.probe_backoff = (policy.probe_delay * 2).min(policy.probe_max_delay);
            Self::wake_all(inner);
            self.metrics.transitions[Transition::Down as usize].increment(1);
            tracing::warn!(
                target: "retryctl",
                model = self.model,
                provider = self.provider,
                waiting = inner.waiters.len(),
                "provider down: requests wait for a probe to reach it"
            );
            return;
        }
        let new = if limit == OPEN {
            self.metrics.transitions[Transition::Limited as usize].increment(1);
            tracing::info!(
                target: "retryctl",
                model = self.model,
                provider = self.provider,
                limit = shrunk,
                "provider limited after a connection-level failure"
            );
            shrunk
        } else {
            limit.min(shrunk)
        };
        inner.threshold = new;
        inner.credit = 0;
        inner.new_epoch(new);
        if outcome == Outcome::ConnectTimeout {
            inner.ceiling = in_flight.max(1);
            inner.hold_until = now + HOLD;
        }
        self.set_limit(new);
    }

    fn on_reached(
        &self,
        inner: &mut Inner,
        probe: bool,
        limit: u32,
        in_flight: u32,
        policy: &AdmissionPolicy,
        now: Moment,
    ) {
        if limit == DOWN {
            if !probe {
                // Admitted before the provider went down: its connection
                // may be older than the outage (a keep-alive one, cut by
                // the restart after the request was sent, or still
                // answering while the upstream drains), so its answer says
                // nothing about whether the upstream takes connections now.
                // The probe finds out.
                return;
            }
            // The probe reached it: it is back.
            self.metrics.event(Event::ProbeSucceeded);
            self.metrics.transitions[Transition::Recovered as usize].increment(1);
            tracing::info!(
                target: "retryctl",
                model = self.model,
                provider = self.provider,
                waiting = inner.waiters.len(),
                "provider recovered: reopening with slow start"
            );
            if policy.slow_start {
                // After an outage, double until the gate opens; after
                // overload, only up to the last limit, then additively.
                if !inner.overloaded {
                    inner.threshold = OPEN;
                    inner.ceiling = OPEN;
                }
                inner.credit = 0;
                let limit = policy.min_limit.max(1);
                self.set_limit(limit);
                inner.new_epoch(limit);
            } else {
                self.open(inner);
            }
            return;
        }
        if limit == OPEN {
            return;
        }
        // Grow only while the limit is what holds attempts back.
        if in_flight >= limit || !inner.waiters.is_empty() {
            if inner.older > 0 {
                // Attempts admitted before the limit last changed are
                // still connecting: if the accept queue overflowed, their
                // connect timeouts are on the way. Successes come back in
                // a round trip, a connect timeout only after
                // `timeouts.connect`: growing on successes alone would
                // send bursts of connects into the full queue for that
                // long.
                return;
            }
            let held = now < inner.hold_until && limit.saturating_add(1) >= inner.ceiling;
            let (grown, step) = if limit < inner.threshold {
                // Slow start: +1 per success up to twice the epoch's
                // start, then a new epoch (its stragglers first).
                let grown = limit.saturating_add(1);
                (grown, grown >= inner.epoch_base.saturating_mul(2))
            } else if held {
                (limit, false)
            } else {
                inner.credit += 1;
                if inner.credit >= limit {
                    inner.credit = 0;
                    (limit.saturating_add(1), true)
                } else {
                    (limit, false)
                }
            };
            if grown != limit {
                let grown = grown.min(OPEN - 1);
                self.set_limit(grown);
                if step {
                    inner.new_epoch(grown);
                }
            }
            return;
        }
        // Nobody waits and the limit is twice what is in flight: it no
        // longer limits anything.
        let now_in_flight = self.in_flight(self.state.load(Ordering::SeqCst));
        if inner.waiters.is_empty() && u64::from(limit) >= 2 * u64::from(now_in_flight.max(1)) {
            self.open(inner);
        }
    }

    fn open(&self, inner: &mut Inner) {
        inner.new_epoch(OPEN);
        inner.older = 0;
        inner.threshold = OPEN;
        inner.credit = 0;
        inner.ceiling = OPEN;
        self.set_limit(OPEN);
        self.metrics.transitions[Transition::Opened as usize].increment(1);
    }

    /// Opens the gate at once (admission was switched off): every waiter
    /// is admitted.
    pub(crate) fn open_now(&self) {
        let mut inner = self.lock();
        if limit_of(self.state.load(Ordering::Acquire)) != OPEN {
            self.open(&mut inner);
        }
        self.dispatch(&mut inner, Moment::now());
        self.publish(&inner);
    }

    /// Updates the gauges from the state (slow path only: the open gate
    /// does not maintain them).
    fn publish(&self, inner: &Inner) {
        let word = self.state.load(Ordering::Acquire);
        let limit = limit_of(word);
        let m = &self.metrics;
        m.waiting.set(inner.waiters.len() as f64);
        m.down.set(if limit == DOWN { 1.0 } else { 0.0 });
        if limit == OPEN {
            m.limit.set(0.0);
            m.in_flight.set(0.0);
        } else {
            m.limit.set(f64::from(limit));
            m.in_flight.set(f64::from(self.in_flight(word)));
        }
    }

    /// The gate's state, for [`crate::Pool::stats`] and tests.
    pub(crate) fn snapshot(&self) -> GateSnapshot {
        let inner = self.lock();
        let word = self.state.load(Ordering::Acquire);
        let limit = limit_of(word);
        GateSnapshot {
            limit: (limit != OPEN && limit != DOWN).then_some(limit),
            down: limit == DOWN,
            in_flight: self.in_flight(word),
            waiting: inner.waiters.len(),
            probing: inner.probing,
        }
    }
}

/// One provider's admission gate, as [`crate::Pool::stats`] reports it (`ProviderStats::admission`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GateSnapshot {
    /// The in-flight limit; `None` while the gate is open or down.
    pub limit: Option<u32>,
    /// Whether the provider is down (only a probe goes through).
    pub down: bool,
    /// Attempts in flight.
    pub in_flight: u32,
    /// Requests waiting.
    pub waiting: usize,
    /// Whether a probe is in flight.
    pub probing: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Threads entering and leaving at once, through the open gate's
    /// stripes and the limited path as failures close and reopen it:
    /// every slot comes back, and no count is left behind.
    #[test]
    fn concurrent_attempts_leave_nothing_in_flight() {
        let gate = Gate::new(GateMetrics::new("t_", "m", "p"), "m", "p");
        // Probes at once: a gate that goes down comes back within the run
        // (no clock moves here; nothing waits).
        let policy = AdmissionPolicy {
            probe_delay: Duration::ZERO,
            probe_max_delay: Duration::ZERO,
            ..AdmissionPolicy::default()
        };
        let limited_seen = std::sync::atomic::AtomicBool::new(false);
        let admitted = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (gate, policy) = (&gate, &policy);
                let (limited_seen, admitted) = (&limited_seen, &admitted);
                s.spawn(move || {
                    for i in 0..20_000u64 {
                        let Some(permit) = gate.try_enter(Moment::now()) else {
                            limited_seen.store(true, Ordering::Relaxed);
                            continue;
                        };
                        admitted.fetch_add(1, Ordering::Relaxed);
                        if !gate.is_open() {
                            limited_seen.store(true, Ordering::Relaxed);
                        }
                        let outcome = if (i + t) % 101 == 0 {
                            Outcome::ConnectTimeout
                        } else {
                            Outcome::Reached
                        };
                        permit.finish(outcome, policy);
                    }
                });
            }
        });
        let snap = gate.snapshot();
        assert_eq!(snap.in_flight, 0, "{snap:?}");
        assert_eq!(snap.waiting, 0);
        assert!(!snap.probing);
        assert!(
            limited_seen.load(Ordering::Relaxed),
            "the gate never limited"
        );
        // Most attempts went through (a limit of 1 still admits one at a
        // time), through both paths.
        assert!(admitted.load(Ordering::Relaxed) > 8_000, "{admitted:?}");
        assert_eq!(gate.in_flight(gate.state.load(Ordering::SeqCst)), 0);
    }
}
