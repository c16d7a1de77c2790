//! Scripted providers that log every attempt they see: which call it
//! belonged to, which step it played, when it started, when it ended, and
//! whether it returned or was dropped (cut by a timer or a cancellation).
//!
//! The log is the ground truth the pool's own accounting is checked
//! against: it is written by the providers, never derived from a report.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use retryctl::{Cause, Classify, Rules, Verdict};
use tokio::time::Instant;

/// What one attempt answers (after its step's delay).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Ok,
    /// `io::ErrorKind::ConnectionRefused`.
    Refused,
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
            Kind::Reset => Cause::Reset,
            Kind::Status502 | Kind::Status503(_) => Cause::Unavailable,
            Kind::Status429(_) => Cause::RateLimited,
            Kind::Status400 => Cause::ClientError,
            Kind::Status404 => Cause::NextProvider,
            Kind::Opaque => Cause::Opaque,
        })
    }
}

/// One scripted attempt: wait `delay`, then answer `kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub kind: Kind,
    pub delay_ms: u64,
}

/// The error a scripted provider returns, classified like the real thing.
#[derive(Debug)]
pub enum TestError {
    Io(io::Error),
    Status(u16, Option<Duration>),
    Text(&'static str),
}

impl fmt::Display for TestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TestError::Io(e) => write!(f, "io: {e}"),
            TestError::Status(s, _) => write!(f, "status {s}"),
            TestError::Text(t) => f.write_str(t),
        }
    }
}

impl Classify for TestError {
    fn classify(&self, rules: &Rules) -> Verdict {
        match self {
            TestError::Io(e) => e.classify(rules),
            TestError::Status(code, retry_after) => rules.status(*code, *retry_after, ""),
            TestError::Text(t) => rules.text(t),
        }
    }
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
    /// The order in which attempts ended (the pool updates health in the
    /// same poll as an attempt ends, so this is the order of its updates).
    pub end_seq: usize,
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
pub struct Log(Arc<Mutex<(Vec<Seen>, usize)>>);

impl Log {
    pub fn snapshot(&self) -> Vec<Seen> {
        self.0.lock().unwrap().0.clone()
    }

    fn start(&self, seen: Seen) -> usize {
        let mut log = self.0.lock().unwrap();
        log.0.push(seen);
        log.0.len() - 1
    }

    fn end(&self, slot: usize, returned: bool) {
        let mut log = self.0.lock().unwrap();
        log.1 += 1;
        let end_seq = log.1;
        let seen = &mut log.0[slot];
        seen.end = Some(Instant::now());
        seen.returned = returned;
        seen.end_seq = end_seq;
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
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let step = self.steps[i % self.steps.len()];
        let slot = self.log.start(Seen {
            call,
            provider: self.index,
            step,
            start: Instant::now(),
            end: None,
            returned: false,
            end_seq: 0,
        });
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
            answer
        }
    }
}
