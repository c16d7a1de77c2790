//! Scripted providers that log every attempt they see: which call it
//! belonged to, which step it played, when it started, when it ended, and
//! whether it returned or was dropped (cut by a timer or a cancellation).
//!
//! The log is the ground truth the pool's own accounting is checked
//! against: it is written by the providers, never derived from a report.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use retryctl::Cause;
use retryctl::stats::GateSnapshot;
use tokio::time::Instant;

pub use crate::test_error::TestError;

/// What one attempt answers (after its step's delay).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Ok,
    /// `io::ErrorKind::ConnectionRefused`.
    Refused,
    /// `io::ErrorKind::HostUnreachable`: another connect failure.
    Connect,
    /// The connect did not complete in time (as a client's connect
    /// timeout is classified).
    ConnectTimeout,
    /// The client handed the request back unsent.
    NotSent,
    /// `io::ErrorKind::ConnectionReset`.
    Reset,
    Status502,
    /// A 503, with a Retry-After (milliseconds) or without.
    Status503(Option<u64>),
    /// A 429 with its Retry-After (milliseconds).
    Status429(u64),
    Status400,
    Status404,
    /// Error text with no keyword in it.
    Opaque,
    /// Never answers: only a timer ends it.
    Hang,
}

impl Kind {
    /// The cause the pool must report for this answer (README, "What is
    /// retried"); `None` for a success or a hang (which never answers).
    pub fn cause(self) -> Option<Cause> {
        Some(match self {
            Kind::Ok | Kind::Hang => return None,
            Kind::Refused => Cause::ConnectRefused,
            Kind::Connect => Cause::Connect,
            Kind::ConnectTimeout => Cause::ConnectTimeout,
            Kind::NotSent => Cause::NotSent,
            Kind::Reset => Cause::Reset,
            Kind::Status502 | Kind::Status503(_) => Cause::Unavailable,
            Kind::Status429(_) => Cause::RateLimited,
            Kind::Status400 => Cause::ClientError,
            Kind::Status404 => Cause::NextProvider,
            Kind::Opaque => Cause::Opaque,
        })
    }

    /// A connection-level failure: the upstream certainly never received
    /// the request (README, "Admission"; the gate's rules).
    pub fn unreached(self) -> bool {
        matches!(
            self.cause(),
            Some(Cause::ConnectRefused | Cause::Connect | Cause::ConnectTimeout | Cause::NotSent)
        )
    }
}

/// One scripted attempt: wait `delay`, then answer `kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub kind: Kind,
    pub delay_ms: u64,
}

/// One attempt as the provider saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub call: u32,
    pub provider: usize,
    pub step: Step,
    pub start: Instant,
    /// When the attempt's future returned or was dropped.
    pub end: Option<Instant>,
    /// Whether it returned its answer (false: dropped before it could).
    pub returned: bool,
    /// The order in which attempts started, ended and gates were
    /// observed, on one counter (the pool updates health in the same poll
    /// as an attempt ends, so the ends' order is the order of its
    /// updates).
    pub start_seq: usize,
    pub end_seq: usize,
}

/// The provider's admission gate as `Pool::stats()` showed it at an
/// attempt's start (the attempt just admitted) or at its answer (before
/// the pool heard it).
#[derive(Clone, Copy, Debug)]
pub struct GateSeen {
    pub provider: usize,
    pub seq: usize,
    pub at: Instant,
    pub gate: GateSnapshot,
    /// At the start of the attempt in this log slot (else: its answer).
    pub start_of: Option<usize>,
}

/// Reads a provider's gate (from `Pool::stats()`).
pub type Observer = Arc<dyn Fn(usize) -> GateSnapshot + Send + Sync>;

#[derive(Debug, Default)]
struct Inner {
    seen: Vec<Seen>,
    gates: Vec<GateSeen>,
    seq: usize,
}

impl Seen {
    /// How long the attempt lasted (it has ended).
    pub fn elapsed(&self) -> Duration {
        self.end.expect("ended") - self.start
    }
}

/// Every attempt every provider of one pool saw, in the order they
/// started.
#[derive(Clone, Debug, Default)]
pub struct Log(Arc<Mutex<Inner>>);

impl Log {
    pub fn snapshot(&self) -> Vec<Seen> {
        self.0.lock().unwrap().seen.clone()
    }

    /// Every gate observation, in order.
    pub fn gates(&self) -> Vec<GateSeen> {
        self.0.lock().unwrap().gates.clone()
    }

    fn start(&self, mut seen: Seen) -> usize {
        let mut log = self.0.lock().unwrap();
        log.seq += 1;
        seen.start_seq = log.seq;
        log.seen.push(seen);
        log.seen.len() - 1
    }

    fn end(&self, slot: usize, returned: bool) {
        let mut log = self.0.lock().unwrap();
        log.seq += 1;
        let end_seq = log.seq;
        let seen = &mut log.seen[slot];
        seen.end = Some(Instant::now());
        seen.returned = returned;
        seen.end_seq = end_seq;
    }

    fn gate(&self, provider: usize, gate: GateSnapshot, start_of: Option<usize>) {
        let mut log = self.0.lock().unwrap();
        log.seq += 1;
        let seq = log.seq;
        log.gates.push(GateSeen {
            provider,
            seq,
            at: Instant::now(),
            gate,
            start_of,
        });
    }
}

/// A provider that plays its steps in a loop.
#[derive(Debug)]
pub struct Provider {
    pub index: usize,
    steps: Vec<Step>,
    next: AtomicUsize,
    log: Log,
}

/// Records the end of an attempt when its future is dropped, whether it
/// returned first or not.
struct EndGuard {
    log: Log,
    slot: usize,
    returned: bool,
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.log.end(self.slot, self.returned);
    }
}

impl Provider {
    pub fn new(index: usize, steps: Vec<Step>, log: Log) -> Arc<Self> {
        assert!(!steps.is_empty());
        Arc::new(Provider {
            index,
            steps,
            next: AtomicUsize::new(0),
            log,
        })
    }

    /// Starts one attempt for call `call`: logged now, ended when the
    /// returned future completes or is dropped.
    pub fn attempt(
        &self,
        call: u32,
    ) -> impl Future<Output = Result<usize, TestError>> + Send + 'static + use<> {
        self.attempt_observed(call, None)
    }

    /// [`Provider::attempt`], also logging the provider's gate (read with
    /// `observe`) at the start, once the attempt is logged, and at the
    /// answer, once its end is logged.
    pub fn attempt_observed(
        &self,
        call: u32,
        observe: Option<Observer>,
    ) -> impl Future<Output = Result<usize, TestError>> + Send + 'static + use<> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let step = self.steps[i % self.steps.len()];
        let slot = self.log.start(Seen {
            call,
            provider: self.index,
            step,
            start: Instant::now(),
            end: None,
            returned: false,
            start_seq: 0,
            end_seq: 0,
        });
        if let Some(o) = &observe {
            self.log.gate(self.index, o(self.index), Some(slot));
        }
        let log = self.log.clone();
        let mut guard = EndGuard {
            log: self.log.clone(),
            slot,
            returned: false,
        };
        let index = self.index;
        async move {
            if step.delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(step.delay_ms)).await;
            }
            let answer = match step.kind {
                Kind::Ok => Ok(index),
                Kind::Refused => Err(TestError::Io(io::ErrorKind::ConnectionRefused.into())),
                Kind::Connect => Err(TestError::Io(io::ErrorKind::HostUnreachable.into())),
                Kind::ConnectTimeout => Err(TestError::Client(Cause::ConnectTimeout)),
                Kind::NotSent => Err(TestError::Client(Cause::NotSent)),
                Kind::Reset => Err(TestError::Io(io::ErrorKind::ConnectionReset.into())),
                Kind::Status502 => Err(TestError::Status(502, None)),
                Kind::Status503(ra) => Err(TestError::Status(503, ra.map(Duration::from_millis))),
                Kind::Status429(ra) => Err(TestError::Status(429, Some(Duration::from_millis(ra)))),
                Kind::Status400 => Err(TestError::Status(400, None)),
                Kind::Status404 => Err(TestError::Status(404, None)),
                Kind::Opaque => Err(TestError::Text("the upstream said something odd")),
                Kind::Hang => std::future::pending().await,
            };
            guard.returned = true;
            drop(guard);
            if let Some(o) = &observe {
                log.gate(index, o(index), None);
            }
            answer
        }
    }
}
