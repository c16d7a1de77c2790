//! What a call returns: the value with exact accounting, or a typed error
//! with the same accounting and the last upstream error.

use std::fmt;
use std::time::Duration;

use crate::classify::{Classify, Verdict};

/// One failed attempt, as the pool saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct FailedAttempt {
    /// The provider's name (as configured; interned, so copying it is
    /// free).
    pub provider: &'static str,
    /// The round it belonged to (1-based).
    pub round: u32,
    /// How the failure was classified.
    pub verdict: Verdict,
    /// How long the attempt took.
    pub elapsed: Duration,
    /// Whether the attempt was its provider's admission probe (the one
    /// attempt let through while the provider was down).
    pub probe: bool,
}

/// Exact accounting of one call: counted as it happened, never derived.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    /// Attempts actually started (upstream calls).
    pub attempts: u32,
    /// Rounds actually started.
    pub rounds: u32,
    /// Attempts of a provider this call had already tried: the retries
    /// it cost (later rounds, and re-attempts admitted by a provider's
    /// gate after a connection-level failure).
    pub retries: u32,
    /// Total time spent waiting: between rounds and at admission gates.
    pub waited: Duration,
    /// The part of `waited` spent at admission gates.
    pub queued: Duration,
    /// From the call's start to its end.
    pub elapsed: Duration,
    /// Every failed attempt, in order. Out of line: a success carries an
    /// empty `Vec` (no allocation), and the `Report` moved through every
    /// await of the call stays small.
    pub failures: Vec<FailedAttempt>,
}

impl Report {
    /// Every failed attempt, in order.
    pub fn failures(&self) -> &[FailedAttempt] {
        &self.failures
    }
}

/// A successful call.
#[derive(Debug)]
pub struct Served<T> {
    /// What the operation returned.
    pub value: T,
    /// The provider that served it (as configured; interned, so copying
    /// it is free).
    pub provider: &'static str,
    /// Whether a provider other than the first one tried served it.
    pub fell_back: bool,
    /// Attempts, rounds, failures and time.
    pub report: Report,
}

impl<T> Served<T> {
    /// Attempts made, the successful one included.
    pub fn attempts(&self) -> u32 {
        self.report.attempts
    }

    /// Rounds used, the successful one included.
    pub fn rounds(&self) -> u32 {
        self.report.rounds
    }
}

/// Why a call gave up.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailReason {
    /// No such model is configured.
    UnknownModel {
        /// The requested name (truncated to 128 bytes).
        model: String,
    },
    /// A provider said the request itself is bad; it was returned at once.
    Permanent,
    /// No provider's last error allows a retry (e.g. each answered "model
    /// not found", or a completion timed out after being accepted).
    NotRetryable,
    /// Retryable errors remained after `max_rounds` rounds.
    RoundsExhausted,
    /// The retry budget refused the retry.
    BudgetExhausted,
    /// The deadline passed, or the next wait would have ended past it.
    DeadlineExceeded {
        /// The wait that did not fit, when a wait was the reason.
        wait: Option<Duration>,
    },
    /// The retry could not finish before the deadline: its wait plus the
    /// provider's recent median attempt latency pass it
    /// (`adaptive.deadline_aware`).
    RetryCannotFinish {
        /// The wait before the retry.
        wait: Duration,
        /// The provider's recent median attempt latency.
        p50: Duration,
    },
    /// A provider asked for a Retry-After longer than `max_retry_after`.
    RetryAfterTooLong {
        /// What it asked for.
        retry_after: Duration,
    },
    /// The request waited `admission.max_wait` (or until its deadline) at
    /// the gate of a provider that was not accepting work.
    AdmissionTimeout {
        /// How long it waited at gates in total.
        waited: Duration,
    },
    /// A provider's gate already had `admission.max_waiting` requests
    /// waiting: this one was turned away at once.
    AdmissionQueueFull,
}

impl FailReason {
    /// A stable snake_case name, used as a metric label value.
    pub fn as_str(&self) -> &'static str {
        match self {
            FailReason::UnknownModel { .. } => "unknown_model",
            FailReason::Permanent => "permanent",
            FailReason::NotRetryable => "not_retryable",
            FailReason::RoundsExhausted => "rounds_exhausted",
            FailReason::BudgetExhausted => "budget_exhausted",
            FailReason::DeadlineExceeded { .. } => "deadline_exceeded",
            FailReason::RetryAfterTooLong { .. } => "retry_after_too_long",
            FailReason::RetryCannotFinish { .. } => "retry_cannot_finish",
            FailReason::AdmissionTimeout { .. } => "admission_timeout",
            FailReason::AdmissionQueueFull => "admission_queue_full",
        }
    }
}

impl fmt::Display for FailReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailReason::UnknownModel { model } => write!(f, "unknown model {model:?}"),
            FailReason::Permanent => f.write_str("the request was rejected (not retried)"),
            FailReason::NotRetryable => f.write_str("no provider's error was retryable"),
            FailReason::RoundsExhausted => f.write_str("every retry round failed"),
            FailReason::BudgetExhausted => f.write_str("retry budget exhausted"),
            FailReason::DeadlineExceeded { wait: Some(w) } => write!(
                f,
                "deadline exceeded: the next retry would wait {} past it",
                humantime::format_duration(*w)
            ),
            FailReason::DeadlineExceeded { wait: None } => f.write_str("deadline exceeded"),
            FailReason::RetryCannotFinish { wait, p50 } => write!(
                f,
                "deadline: a retry after {} would not finish (recent median attempt {})",
                humantime::format_duration(*wait),
                humantime::format_duration(*p50)
            ),
            FailReason::RetryAfterTooLong { retry_after } => write!(
                f,
                "provider asked to retry after {}, beyond max_retry_after",
                humantime::format_duration(*retry_after)
            ),
            FailReason::AdmissionTimeout { waited } => write!(
                f,
                "the provider did not accept work: waited {} for it",
                humantime::format_duration(Duration::from_millis(waited.as_millis() as u64))
            ),
            FailReason::AdmissionQueueFull => {
                f.write_str("the provider is not accepting work and its wait queue is full")
            }
        }
    }
}

/// The last failure of an attempt: the operation's own error, or the
/// pool's attempt timer.
#[derive(Debug)]
pub enum AttemptError<E> {
    /// The operation returned this error.
    Upstream(E),
    /// The operation did not return within its time limit.
    TimedOut(Duration),
}

impl<E: fmt::Display> fmt::Display for AttemptError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttemptError::Upstream(e) => e.fmt(f),
            AttemptError::TimedOut(d) => {
                write!(f, "no response within {}", humantime::format_duration(*d))
            }
        }
    }
}

/// A failed call: why, the last upstream error, and the accounting.
#[derive(Debug)]
pub struct PoolError<E> {
    /// Why the pool gave up.
    pub reason: FailReason,
    /// The last attempt's error (none when no attempt was made).
    pub last: Option<AttemptError<E>>,
    /// Attempts, rounds, failures and time.
    pub report: Report,
}

impl<E> PoolError<E> {
    /// The last upstream error, if the operation returned one.
    pub fn upstream(&self) -> Option<&E> {
        match &self.last {
            Some(AttemptError::Upstream(e)) => Some(e),
            _ => None,
        }
    }

    /// Whether the client's request was at fault (map to a 4xx).
    pub fn is_client_error(&self) -> bool {
        matches!(
            self.reason,
            FailReason::Permanent | FailReason::UnknownModel { .. }
        )
    }
}

/// `all providers failed after N attempts in R rounds: REASON; last error:
/// ERROR`, where the last error is followed by every error below it
/// ([`Classify::error_source`] and its `source()` chain, `": "`-joined):
/// the root cause (refused, reset, timed out) stays in the log line.
impl<E: Classify + fmt::Display> fmt::Display for PoolError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let FailReason::UnknownModel { .. } = self.reason {
            return self.reason.fmt(f);
        }
        write!(
            f,
            "all providers failed after {} attempt{} in {} round{}: {}",
            self.report.attempts,
            if self.report.attempts == 1 { "" } else { "s" },
            self.report.rounds,
            if self.report.rounds == 1 { "" } else { "s" },
            self.reason
        )?;
        if let Some(last) = &self.last {
            write!(f, "; last error: {last}")?;
        }
        if let Some(AttemptError::Upstream(e)) = &self.last {
            let mut below = e.error_source();
            while let Some(cause) = below {
                write!(f, ": {cause}")?;
                below = cause.source();
            }
        }
        Ok(())
    }
}

/// The message already quotes the last error's chain, so `source()` is
/// `None`: a chain-printing reporter does not repeat it.
impl<E: Classify + fmt::Debug + fmt::Display> std::error::Error for PoolError<E> {}
