//! The reload thread: re-reads the file on events and on the timer,
//! settles it, and puts a valid policy in force.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};

use super::file::{LoadError, parse, read_bytes};
use super::watcher::{Message, ReloadStatus};
use super::{LAST_RELOAD_SUCCESS_TIMESTAMP, POLICY_INFO, RELOAD_FAILING, RELOADS_TOTAL};
use crate::live::LivePolicy;
use crate::policy::Policy;

/// How many times a changed file is re-read while it is still changing
/// before the watcher gives up until the next event or timer.
const MAX_SETTLE_READS: u32 = 5;

/// The reload metrics' names under one prefix.
#[derive(Debug)]
pub(super) struct ReloadMetrics {
    pub(super) prefix: Arc<str>,
    pub(super) reloads_total: String,
    pub(super) last_success: String,
    pub(super) failing: String,
}

impl ReloadMetrics {
    pub(super) fn new(prefix: &Arc<str>) -> Self {
        use crate::telemetry::prefixed;
        ReloadMetrics {
            prefix: prefix.clone(),
            reloads_total: prefixed(prefix, RELOADS_TOTAL),
            last_success: prefixed(prefix, LAST_RELOAD_SUCCESS_TIMESTAMP),
            failing: prefixed(prefix, RELOAD_FAILING),
        }
    }

    pub(super) fn describe(&self) {
        metrics::describe_counter!(
            self.reloads_total.clone(),
            "Policy file reloads, by result: applied, unchanged, rejected."
        );
        metrics::describe_gauge!(
            self.last_success.clone(),
            metrics::Unit::Seconds,
            "When the policy file was last read and found valid (unix time)."
        );
        metrics::describe_gauge!(
            self.failing.clone(),
            "1 while the policy file on disk is rejected (the last good policy stays in force)."
        );
        metrics::describe_gauge!(
            crate::telemetry::prefixed(&self.prefix, POLICY_INFO),
            "1 for the policy in force, labelled with its content hash."
        );
    }
}

/// The outcome of one reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    Applied,
    Unchanged,
    Rejected,
    /// Still being written: neither applied nor counted.
    Unsettled,
}

/// The reload thread's state: reads the file and puts it in force.
pub(super) struct Reloader {
    pub(super) path: PathBuf,
    pub(super) live: LivePolicy,
    pub(super) status: Arc<ReloadStatus>,
    pub(super) settle: Duration,
    /// The bytes of the last settled read: reading the same bytes again
    /// needs no settle delay.
    pub(super) last_read: Option<Vec<u8>>,
    /// The version last reported in [`POLICY_INFO`].
    pub(super) info_hash: Option<u64>,
    /// The metric names, under the configured prefix.
    pub(super) names: ReloadMetrics,
}

impl Reloader {
    pub(super) fn run(mut self, rx: &mpsc::Receiver<Message>, poll_interval: Option<Duration>) {
        let mut next_poll = poll_interval.map(|every| Instant::now() + every);
        loop {
            let message = match next_poll {
                Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match message {
                Ok(Message::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Ok(Message::WatchErrors(errors)) => {
                    tracing::warn!(path = %self.path.display(), ?errors, "policy file watch errors; re-reading the file");
                }
                Ok(Message::Changed) | Err(RecvTimeoutError::Timeout) => {}
            }
            // Events that queued up while this thread was busy are covered
            // by the read that follows.
            loop {
                match rx.try_recv() {
                    Ok(Message::Stop) => return,
                    Ok(_) => continue,
                    Err(_) => break,
                }
            }
            self.reload();
            next_poll = poll_interval.map(|every| Instant::now() + every);
        }
    }

    /// Reads, parses, validates and compares the file; applies it if it
    /// changed. Never panics, never touches the request path.
    pub(super) fn reload(&mut self) -> Outcome {
        match self.read_settled().and_then(|policy| match policy {
            Some(policy) => self.put_in_force(policy),
            None => Ok(Outcome::Unsettled),
        }) {
            Ok(outcome) => outcome,
            Err(e) => {
                self.reject(e);
                Outcome::Rejected
            }
        }
    }

    /// Reads the file until two reads `settle` apart agree, then parses
    /// it; `None` when it was still changing after [`MAX_SETTLE_READS`]
    /// reads (the writer's last event, or the timer, brings another read).
    /// Bytes identical to the last settled read need no second look.
    pub(super) fn read_settled(&mut self) -> Result<Option<Policy>, LoadError> {
        let mut bytes = read_bytes(&self.path);
        let known = matches!((&bytes, &self.last_read), (Ok(b), Some(last)) if b == last);
        if !known && !self.settle.is_zero() {
            let mut settled = false;
            for _ in 0..MAX_SETTLE_READS {
                std::thread::sleep(self.settle);
                let again = read_bytes(&self.path);
                settled = match (&bytes, &again) {
                    (Ok(a), Ok(b)) => a == b,
                    (Err(a), Err(b)) => a.to_string() == b.to_string(),
                    _ => false,
                };
                bytes = again;
                if settled {
                    break;
                }
            }
            if !settled {
                tracing::debug!(path = %self.path.display(), "policy file still changing; waiting for the next event");
                return Ok(None);
            }
        }
        let bytes = bytes?;
        self.last_read = Some(bytes.clone());
        parse(&self.path, bytes).map(Some)
    }

    /// Stores a parsed policy: the live handle compares content hashes
    /// and swaps only a changed policy in.
    pub(super) fn put_in_force(&mut self, policy: Policy) -> Result<Outcome, LoadError> {
        let changed = self
            .live
            .store(policy)
            .map_err(|error| LoadError::Invalid {
                path: self.path.clone(),
                error,
            })?;
        let outcome = if changed {
            Outcome::Applied
        } else {
            Outcome::Unchanged
        };
        let version = self.live.load().version();
        let (counter, result) = match outcome {
            Outcome::Applied => (&self.status.applied, "applied"),
            _ => (&self.status.unchanged, "unchanged"),
        };
        counter.fetch_add(1, Ordering::AcqRel);
        let was_failing = self.status.last_error.swap(None).is_some();
        let names = &self.names;
        metrics::counter!(names.reloads_total.clone(), "result" => result).increment(1);
        metrics::gauge!(names.failing.clone()).set(0.0);
        metrics::gauge!(names.last_success.clone()).set(unix_now());
        if self.info_hash != Some(version) {
            crate::telemetry::policy_in_force(&names.prefix, self.info_hash, version);
            self.info_hash = Some(version);
        }
        if outcome == Outcome::Applied {
            tracing::info!(path = %self.path.display(), version = %hex(version), "policy applied");
        } else if was_failing {
            tracing::info!(path = %self.path.display(), version = %hex(version), "policy file valid again; policy unchanged");
        }
        Ok(outcome)
    }

    pub(super) fn reject(&mut self, error: LoadError) {
        // The same error again (the timer re-reading a bad file) is logged
        // once, not every poll.
        let repeated = self
            .status
            .last_error
            .load()
            .as_ref()
            .is_some_and(|last| last.to_string() == error.to_string());
        if !repeated {
            let policy_error = error.policy_error();
            tracing::warn!(
                path = %self.path.display(),
                line = policy_error.and_then(|e| e.location).map(|l| l.0),
                column = policy_error.and_then(|e| e.location).map(|l| l.1),
                field = policy_error.map(|e| e.field.as_str()),
                error = %error,
                "policy file rejected; the last good policy stays in force"
            );
        }
        // The error first, then the count: whoever sees the rejection
        // counted finds its error.
        self.status.last_error.store(Some(Arc::new(error)));
        self.status.rejected.fetch_add(1, Ordering::AcqRel);
        let names = &self.names;
        metrics::counter!(names.reloads_total.clone(), "result" => "rejected").increment(1);
        metrics::gauge!(names.failing.clone()).set(1.0);
    }
}

pub(super) fn hex(version: u64) -> String {
    crate::telemetry::policy_hash(version)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
