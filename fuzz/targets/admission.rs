//! Fuzz target `admission`: the pool's per-provider admission gates under
//! a random sequence of events.
//!
//! Input: a byte string read as events on a `Pool` of one or two scripted
//! providers, under paused tokio time (a current-thread runtime per
//! input): start a call (with a deadline), answer a pending attempt with
//! any outcome (success, connect refused, connect timeout, not sent,
//! another connect failure, 500, 502, 429, reset, or a stall that only a
//! timer ends), cancel a call, let time pass, or store a new admission
//! policy (`LivePolicy::store`). Shared by `fuzz/fuzz_targets/admission.rs`
//! and the corpus replay in `tests/fuzz_corpus`.
//!
//! After every event (once the runtime has run every task that can run)
//! and at every attempt's start and answer, `Pool::stats()` is held to the
//! gate's rules (docs/decisions.md, "The admission gate's rules"):
//! * the attempts a gate counts in flight are attempts running now, and
//!   include every attempt of a gated call still in its connect phase
//!   (`timeouts.connect` + 5 ms);
//! * a limited gate admits only below its limit, a down one only its probe:
//!   from one observation to the next, the count in flight grows past
//!   neither the limit nor the count before (a shrink, which only an
//!   attempt's answer causes, can leave more in flight than the limit,
//!   never admit more);
//! * the requests waiting are requests blocked at a gate: at most the
//!   calls alive and not in an attempt, and exactly those with one round
//!   (no timed wait between rounds);
//! * no call outlives its deadline, no call waits at gates longer than its
//!   `admission.max_wait`, an `admission_timeout` waited `max_wait` or
//!   ended at the deadline, and a call's time is its attempts plus its
//!   waits;
//! * once every call has ended, nothing waits and nothing is in flight;
//! * nothing panics.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use retryctl::policy::{AdmissionPolicy, BudgetPolicy, LivePolicy, Policy, Timeouts};
use retryctl::{Cause, Classification, Classify, FailReason, Pool, Report, Rules, Verdict};
use tokio::sync::oneshot;
use tokio::task::AbortHandle;
use tokio::time::Instant;

const MODEL: &str = "m";
/// `timeouts.connect` of every policy here.
const CONNECT: Duration = Duration::from_millis(100);
/// The pool's margin after the connect timeout (`CONNECT_MARGIN`).
const CONNECT_MARGIN: Duration = Duration::from_millis(5);
/// `timeouts.attempt` of every policy here.
const ATTEMPT: Duration = Duration::from_millis(1500);
/// Events read from one input at most.
const MAX_EVENTS: usize = 256;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// How a pending attempt is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Ok,
    Refused,
    ConnectTimeout,
    NotSent,
    Connect,
    Status500,
    Status502,
    Status429,
    Reset,
    /// Never answers: only the attempt's timer (or the deadline, or a
    /// cancellation) ends it.
    Stall,
}

const ANSWERS: [Answer; 10] = [
    Answer::Ok,
    Answer::Refused,
    Answer::ConnectTimeout,
    Answer::NotSent,
    Answer::Connect,
    Answer::Status500,
    Answer::Status502,
    Answer::Status429,
    Answer::Reset,
    Answer::Stall,
];

/// A scripted failure, classified as the real client's would be.
#[derive(Debug)]
enum Failure {
    Io(io::Error),
    Cause(Cause),
    Status(u16),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

impl Classify for Failure {
    fn classify(&self, rules: &Rules) -> Verdict {
        match self {
            Failure::Io(e) => e.classify(rules),
            Failure::Cause(c) => Verdict::new(Classification::Transient, *c),
            Failure::Status(429) => rules.status(429, Some(ms(50)), ""),
            Failure::Status(code) => rules.status(*code, None, ""),
        }
    }
}

/// One running attempt, as the provider sees it.
#[derive(Debug)]
struct Running {
    id: u64,
    call: usize,
    provider: usize,
    start: Instant,
    /// Its call runs with the gate on.
    gated: bool,
    /// Not answered yet (`None` once answered, or stalled).
    answer: Option<oneshot::Sender<Answer>>,
}

/// One call, as the test drives it.
#[derive(Debug)]
struct CallState {
    start: Instant,
    deadline: Instant,
    /// Its policy snapshot's gate.
    gated: bool,
    max_wait: Duration,
    /// In an attempt now.
    attempting: bool,
    /// The time its attempts took.
    attempt_time: Duration,
    done: bool,
    abort: Option<AbortHandle>,
}

/// One gate as last observed.
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    in_flight: u32,
}

#[derive(Debug, Default)]
struct World {
    running: Vec<Running>,
    calls: Vec<CallState>,
    gates: Vec<Seen>,
    next_attempt: u64,
}

type Shared = Arc<Mutex<World>>;

/// A scripted provider: each attempt waits for its answer.
#[derive(Debug)]
struct Provider {
    index: usize,
}

type P = Arc<Provider>;

/// Reads bytes, yielding 0 past the end.
struct Bytes<'a> {
    data: &'a [u8],
    at: usize,
}

impl Bytes<'_> {
    fn next(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    fn done(&self) -> bool {
        self.at >= self.data.len()
    }
}

fn admission_policy(b: &mut Bytes<'_>) -> AdmissionPolicy {
    let (x, y, z) = (b.next(), b.next(), b.next());
    let probe_delay = ms([1, 10, 100, 250][usize::from(y >> 4) % 4]);
    AdmissionPolicy {
        // Mostly on; off now and then, to switch the gates off live.
        enabled: x & 7 != 0,
        max_wait: ms([0, 50, 200, 1000, 3000, 10_000][usize::from(x >> 3) % 6]),
        max_waiting: [1, 2, 4, 1024][usize::from(x >> 6)],
        decrease: [0.1, 0.5, 0.75, 0.9][usize::from(y & 3)],
        min_limit: 1 + u32::from((y >> 2) & 3),
        probe_delay,
        probe_max_delay: probe_delay * u32::from(1 + (z & 7)),
        slow_start: z & 8 == 0,
    }
}

fn policy(admission: AdmissionPolicy, max_rounds: u32) -> Policy {
    Policy {
        max_rounds,
        delay: ms(20).into(),
        jitter: 0.0,
        timeouts: Timeouts {
            connect: CONNECT,
            attempt: ATTEMPT,
            ..Timeouts::default()
        },
        budget: BudgetPolicy {
            enabled: false,
            ..BudgetPolicy::default()
        },
        admission,
        ..Policy::default()
    }
}

impl Provider {
    /// Starts an attempt of call `call`: registered as running, answered
    /// when the driver says so.
    fn attempt(
        &self,
        call: usize,
        world: &Shared,
        pool: &Arc<Pool<P>>,
    ) -> impl Future<Output = Result<usize, Failure>> + Send + 'static + use<> {
        let (tx, rx) = oneshot::channel();
        let now = Instant::now();
        let id = {
            let mut w = world.lock().unwrap();
            let id = w.next_attempt;
            w.next_attempt += 1;
            let gated = w.calls[call].gated;
            w.calls[call].attempting = true;
            w.running.push(Running {
                id,
                call,
                provider: self.index,
                start: now,
                gated,
                answer: Some(tx),
            });
            id
        };
        // Admitted just now (nothing ran since the gate let it in).
        observe(world, pool, Some(self.index));
        let guard = Ended {
            world: world.clone(),
            id,
        };
        let (world, pool, index) = (world.clone(), pool.clone(), self.index);
        async move {
            let answer = match rx.await {
                Ok(a) if a != Answer::Stall => a,
                _ => std::future::pending().await,
            };
            // Answered: observed before the pool hears of it (only an
            // answer can shrink a limit).
            drop(guard);
            observe(&world, &pool, Some(index));
            match answer {
                Answer::Ok => Ok(index),
                Answer::Refused => Err(Failure::Io(io::ErrorKind::ConnectionRefused.into())),
                Answer::ConnectTimeout => Err(Failure::Cause(Cause::ConnectTimeout)),
                Answer::NotSent => Err(Failure::Cause(Cause::NotSent)),
                Answer::Connect => Err(Failure::Io(io::ErrorKind::HostUnreachable.into())),
                Answer::Status500 => Err(Failure::Status(500)),
                Answer::Status502 => Err(Failure::Status(502)),
                Answer::Status429 => Err(Failure::Status(429)),
                Answer::Reset => Err(Failure::Io(io::ErrorKind::ConnectionReset.into())),
                Answer::Stall => unreachable!(),
            }
        }
    }
}

/// Takes an attempt off the running list when it answers or is dropped.
struct Ended {
    world: Shared,
    id: u64,
}

impl Drop for Ended {
    fn drop(&mut self) {
        let mut w = self.world.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = w.running.iter().position(|r| r.id == self.id) {
            let r = w.running.remove(i);
            let call = &mut w.calls[r.call];
            call.attempting = false;
            call.attempt_time += Instant::now() - r.start;
        }
    }
}

/// Holds the gates of `only` (or all) to their rules; see the module docs.
fn observe(world: &Shared, pool: &Pool<P>, only: Option<usize>) {
    let stats = pool.stats();
    let now = Instant::now();
    let mut w = world.lock().unwrap_or_else(|e| e.into_inner());
    for (i, s) in stats.iter().enumerate() {
        if only.is_some_and(|o| o != i) {
            continue;
        }
        let g = s.admission;
        let running = w.running.iter().filter(|r| r.provider == i && r.gated);
        let connecting = running
            .clone()
            .filter(|r| now - r.start < CONNECT + CONNECT_MARGIN)
            .count() as u32;
        let running = running.count() as u32;
        assert!(
            g.in_flight >= connecting,
            "gate {i}: {g:?} counts fewer than the {connecting} gated attempts connecting"
        );
        if only.is_none() {
            // Every task that can run has run: a slot granted to a waiter
            // is an attempt started.
            assert!(
                g.in_flight <= running,
                "gate {i}: {g:?} counts more than the {running} gated attempts running"
            );
        }
        let before = w.gates[i];
        if let Some(limit) = g.limit {
            assert!(
                g.in_flight <= before.in_flight.max(limit),
                "gate {i}: {g:?} admitted past its limit (in flight before: {})",
                before.in_flight
            );
        }
        if g.down {
            assert!(
                g.in_flight <= before.in_flight + u32::from(g.probing),
                "gate {i}: {g:?} admitted more than its probe while down (in flight before: {})",
                before.in_flight
            );
        }
        w.gates[i] = Seen {
            in_flight: g.in_flight,
        };
    }
}

/// Lets every task that can run, run (time does not move).
async fn settle() {
    for _ in 0..24 {
        tokio::task::yield_now().await;
    }
}

/// After every event: the waiters against the calls blocked.
fn check_waiting(world: &Shared, pool: &Pool<P>, max_rounds: u32) {
    observe(world, pool, None);
    let waiting: usize = pool.stats().iter().map(|s| s.admission.waiting).sum();
    let w = world.lock().unwrap();
    let blocked = w
        .calls
        .iter()
        .filter(|c| !c.done && !c.attempting && c.gated)
        .count();
    if max_rounds == 1 {
        assert_eq!(
            waiting, blocked,
            "{waiting} waiting at gates, {blocked} calls blocked"
        );
    } else {
        assert!(
            waiting <= blocked,
            "{waiting} waiting at gates, {blocked} calls blocked"
        );
    }
}

/// A call's end, held to its bounds.
fn ended(world: &Shared, call: usize, report: &Report, reason: Option<&FailReason>) {
    let now = Instant::now();
    let mut w = world.lock().unwrap();
    let c = &mut w.calls[call];
    c.done = true;
    c.attempting = false;
    assert!(
        now <= c.deadline,
        "call {call} ended {:?} after its deadline",
        now - c.deadline
    );
    assert_eq!(report.elapsed, now - c.start, "call {call}: elapsed");
    assert!(
        report.queued <= c.max_wait && report.queued <= report.waited,
        "call {call} queued {:?} (waited {:?}), max_wait {:?}",
        report.queued,
        report.waited,
        c.max_wait
    );
    assert_eq!(
        c.attempt_time + report.waited,
        report.elapsed,
        "call {call}: attempts {:?} + waits {:?}",
        c.attempt_time,
        report.waited
    );
    if !c.gated {
        assert_eq!(report.queued, Duration::ZERO, "call {call} without a gate");
    }
    if let Some(FailReason::AdmissionTimeout { waited }) = reason {
        assert!(c.gated, "call {call}: admission_timeout without a gate");
        assert!(
            *waited <= report.queued && (*waited == c.max_wait || now == c.deadline),
            "call {call}: admission_timeout after {waited:?} (max_wait {:?}), {:?} before the deadline",
            c.max_wait,
            c.deadline - now
        );
    }
}

async fn drive(data: &[u8]) {
    let mut b = Bytes { data, at: 0 };
    let head = b.next();
    let providers = 1 + usize::from(head & 1);
    let max_rounds = if head & 6 == 0 { 2 } else { 1 };
    let live = LivePolicy::new(policy(admission_policy(&mut b), max_rounds)).expect("valid");
    let mut builder = Pool::builder().policy(live);
    for (index, name) in ["a", "b"].iter().take(providers).enumerate() {
        builder = builder.provider(MODEL, name, Arc::new(Provider { index }));
    }
    let pool = Arc::new(builder.build().expect("pool"));
    let world: Shared = Arc::new(Mutex::new(World {
        gates: vec![Seen::default(); providers],
        ..World::default()
    }));

    let mut events = 0;
    while !b.done() && events < MAX_EVENTS {
        events += 1;
        match b.next() % 8 {
            0 | 1 => {
                let timeout = ms([50, 100, 300, 1000, 3000, 10_000][usize::from(b.next()) % 6]);
                start_call(&pool, &world, timeout);
            }
            2 | 3 => {
                let (pick, what) = (b.next(), b.next());
                let mut w = world.lock().unwrap();
                let open: Vec<usize> = (0..w.running.len())
                    .filter(|&i| w.running[i].answer.is_some())
                    .collect();
                if !open.is_empty() {
                    let r = &mut w.running[open[usize::from(pick) % open.len()]];
                    let tx = r.answer.take().expect("not answered");
                    let _ = tx.send(ANSWERS[usize::from(what) % ANSWERS.len()]);
                }
            }
            4 => {
                let pick = b.next();
                let alive: Vec<AbortHandle> = world
                    .lock()
                    .unwrap()
                    .calls
                    .iter()
                    .filter(|c| !c.done)
                    .filter_map(|c| c.abort.clone())
                    .collect();
                if !alive.is_empty() {
                    alive[usize::from(pick) % alive.len()].abort();
                }
            }
            5 => {
                let d = [1, 5, 20, 50, 99, 105, 300, 2000][usize::from(b.next()) % 8];
                tokio::time::sleep(ms(d)).await;
            }
            6 => {
                let admission = admission_policy(&mut b);
                pool.policy()
                    .store(policy(admission, max_rounds))
                    .expect("valid");
            }
            _ => {}
        }
        settle().await;
        check_waiting(&world, &pool, max_rounds);
    }

    // Drain: answer everything with a success and let every deadline
    // pass; every call ends, and every gate is empty.
    for _ in 0..100 {
        {
            let mut w = world.lock().unwrap();
            for r in &mut w.running {
                if let Some(tx) = r.answer.take() {
                    let _ = tx.send(Answer::Ok);
                }
            }
            if w.calls.iter().all(|c| c.done) {
                break;
            }
        }
        tokio::time::sleep(ms(250)).await;
        settle().await;
        check_waiting(&world, &pool, max_rounds);
    }
    let w = world.lock().unwrap();
    assert!(w.calls.iter().all(|c| c.done), "a call outlived the drain");
    assert!(w.running.is_empty(), "an attempt outlived its call");
    drop(w);
    for s in pool.stats() {
        let g = s.admission;
        assert!(
            g.waiting == 0 && g.in_flight == 0 && !g.probing,
            "{}: {g:?} with every call ended",
            s.provider
        );
    }
}

fn start_call(pool: &Arc<Pool<P>>, world: &Shared, timeout: Duration) {
    let start = Instant::now();
    let active = pool.policy().load();
    let admission = &active.policy().admission;
    let call = {
        let mut w = world.lock().unwrap();
        w.calls.push(CallState {
            start,
            deadline: start + timeout,
            gated: admission.enabled,
            max_wait: admission.max_wait,
            attempting: false,
            attempt_time: Duration::ZERO,
            done: false,
            abort: None,
        });
        w.calls.len() - 1
    };
    let (p, w) = (pool.clone(), world.clone());
    let task = tokio::spawn(async move {
        let mut cancelled = Cancelled {
            world: w.clone(),
            call,
            armed: true,
        };
        let (pool, world) = (p.clone(), w.clone());
        let result = p
            .call_with(
                MODEL,
                retryctl::CallOptions::timeout(timeout),
                move |provider: &P| provider.attempt(call, &world, &pool),
            )
            .await;
        cancelled.armed = false;
        match result {
            Ok(served) => ended(&w, call, &served.report, None),
            Err(e) => ended(&w, call, &e.report, Some(&e.reason)),
        }
    });
    world.lock().unwrap().calls[call].abort = Some(task.abort_handle());
}

/// Marks a call cancelled (its task aborted) as ended.
struct Cancelled {
    world: Shared,
    call: usize,
    armed: bool,
}

impl Drop for Cancelled {
    fn drop(&mut self) {
        if self.armed {
            let mut w = self.world.lock().unwrap_or_else(|e| e.into_inner());
            let c = &mut w.calls[self.call];
            c.done = true;
            c.attempting = false;
        }
    }
}

/// One fuzz input.
pub fn run(data: &[u8]) {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime")
        .block_on(drive(data));
}
