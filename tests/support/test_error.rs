//! The error a scripted provider returns, classified like the real thing:
//! an io error by its kind, a status by the policy's status lists, a text
//! by its keywords. Shared by the test crates whose providers are scripts
//! (`tests/pool`, `tests/invariants`), included with `#[path]`.

use std::fmt;
use std::io;
use std::time::Duration;

use retryctl::{Cause, Classification, Classify, Rules, Verdict};

/// A scripted attempt's failure.
#[derive(Debug)]
pub enum TestError {
    Io(io::Error),
    /// A status, with its Retry-After.
    Status(u16, Option<Duration>),
    Text(&'static str),
    /// A failure the client itself classifies (connect timeout, not sent).
    #[allow(dead_code, reason = "tests/pool's scripts make none")]
    Client(Cause),
}

impl fmt::Display for TestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TestError::Io(e) => write!(f, "io: {e}"),
            TestError::Status(s, _) => write!(f, "status {s}"),
            TestError::Text(t) => f.write_str(t),
            TestError::Client(c) => f.write_str(c.as_str()),
        }
    }
}

impl Classify for TestError {
    fn classify(&self, rules: &Rules) -> Verdict {
        match self {
            TestError::Io(e) => e.classify(rules),
            TestError::Status(code, retry_after) => rules.status(*code, *retry_after, ""),
            TestError::Text(t) => rules.text(t),
            TestError::Client(c) => Verdict::new(Classification::Transient, *c),
        }
    }
}
