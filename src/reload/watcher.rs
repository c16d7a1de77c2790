//! The watcher's API: options, status, and the handle that owns the
//! event source and the reload thread.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use notify_debouncer_full::notify;
use notify_debouncer_full::notify::RecommendedWatcher;
use notify_debouncer_full::{Debouncer, RecommendedCache};

use super::events::watch;
use super::file::{LoadError, read_policy_file};
use super::reloader::{ReloadMetrics, Reloader};
use crate::live::LivePolicy;

/// Why a [`PolicyWatcher`] did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The file is missing or bad: nothing was put in force.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The directory could not be watched and the timer fallback is off.
    #[error("cannot watch {}: {source}", dir.display())]
    Watch {
        /// The directory.
        dir: PathBuf,
        /// What notify said.
        source: notify::Error,
    },
    /// The reload thread could not be started.
    #[error("cannot start the policy reload thread: {0}")]
    Spawn(#[source] io::Error),
}

/// How a [`PolicyWatcher`] follows its file.
#[derive(Clone, Debug)]
pub struct ReloadOptions {
    pub(super) debounce: Duration,
    pub(super) poll_interval: Option<Duration>,
    pub(super) events: bool,
    pub(super) settle: Duration,
    pub(super) metrics_prefix: Arc<str>,
}

impl Default for ReloadOptions {
    /// Events with a 150 ms debounce, a 20 ms settle re-read, and a re-read
    /// every 30 s whatever happens.
    fn default() -> Self {
        ReloadOptions {
            debounce: Duration::from_millis(150),
            poll_interval: Some(Duration::from_secs(30)),
            events: true,
            settle: Duration::from_millis(20),
            metrics_prefix: crate::telemetry::DEFAULT_PREFIX.into(),
        }
    }
}

impl ReloadOptions {
    /// How long the debouncer gathers a burst of file events into one
    /// re-read (at least 10 ms).
    pub fn debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce.max(Duration::from_millis(10));
        self
    }

    /// Re-read the file this often even without events (at least 10 ms);
    /// `None` turns the timer off.
    pub fn poll_interval(mut self, every: Option<Duration>) -> Self {
        self.poll_interval = every.map(|d| d.max(Duration::from_millis(10)));
        self
    }

    /// Whether to watch for file events (`false`: the timer only, e.g. on
    /// a file system without events).
    pub fn events(mut self, on: bool) -> Self {
        self.events = on;
        self
    }

    /// How long a changed file must stay the same between two reads before
    /// it is applied (zero: apply on the first read).
    pub fn settle(mut self, settle: Duration) -> Self {
        self.settle = settle;
        self
    }

    /// The metric name prefix (default `retryctl_`) of the reload metrics
    /// and the policy info gauge: the one the pool following the same
    /// policy was given ([`PoolBuilder::metrics_prefix`](crate::pool::PoolBuilder::metrics_prefix)).
    pub fn metrics_prefix(mut self, prefix: &str) -> Self {
        self.metrics_prefix = prefix.into();
        self
    }
}

/// Reload counts, since the watcher started (the initial load included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReloadCounts {
    /// Reads that put a new policy in force.
    pub applied: u64,
    /// Reads of a good file that said what was already in force.
    pub unchanged: u64,
    /// Reads of a bad or missing file (the last good policy stayed).
    pub rejected: u64,
}

/// What a [`PolicyWatcher`] has done; shared with its thread.
#[derive(Debug, Default)]
pub struct ReloadStatus {
    pub(super) applied: AtomicU64,
    pub(super) unchanged: AtomicU64,
    pub(super) rejected: AtomicU64,
    pub(super) last_error: ArcSwapOption<LoadError>,
}

impl ReloadStatus {
    /// How many reloads applied, found unchanged, or rejected the file.
    pub fn counts(&self) -> ReloadCounts {
        ReloadCounts {
            applied: self.applied.load(Ordering::Acquire),
            unchanged: self.unchanged.load(Ordering::Acquire),
            rejected: self.rejected.load(Ordering::Acquire),
        }
    }

    /// Why the file on disk is refused, while it is (`None` once a good
    /// file was read).
    pub fn last_error(&self) -> Option<Arc<LoadError>> {
        self.last_error.load_full()
    }
}

/// What the reload thread is told.
#[derive(Debug)]
pub(super) enum Message {
    /// The file may have changed.
    Changed,
    /// The watcher reported errors (e.g. its event queue overflowed).
    WatchErrors(Vec<String>),
    /// Stop and exit.
    Stop,
}

/// Follows a policy file and keeps a [`LivePolicy`] in step with it.
///
/// Dropping the watcher stops watching and joins its threads (it may block
/// for one debounce tick and one reload in progress).
pub struct PolicyWatcher {
    path: PathBuf,
    status: Arc<ReloadStatus>,
    watching_events: bool,
    tx: mpsc::Sender<Message>,
    debouncer: Option<Debouncer<RecommendedWatcher, RecommendedCache>>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for PolicyWatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyWatcher")
            .field("path", &self.path)
            .field("watching_events", &self.watching_events)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl PolicyWatcher {
    /// Loads `path` into `live` (an error if it is missing or bad), then
    /// follows it on a background thread: watching its directory for
    /// events (if enabled) and re-reading it on the timer (if enabled).
    ///
    /// When the directory cannot be watched (e.g. the inotify watch limit
    /// is reached) the watcher warns and relies on the timer; only when the
    /// timer is off as well is that an error.
    pub fn start(
        path: impl Into<PathBuf>,
        live: LivePolicy,
        options: ReloadOptions,
    ) -> Result<PolicyWatcher, StartError> {
        let path = path.into();
        let path = std::path::absolute(&path).unwrap_or(path);
        let names = ReloadMetrics::new(&options.metrics_prefix);
        names.describe();
        let status = Arc::new(ReloadStatus::default());
        let mut reloader = Reloader {
            path: path.clone(),
            live,
            status: status.clone(),
            settle: options.settle,
            last_read: None,
            info_hash: None,
            names,
        };
        // A bad file at start is the caller's error; nothing is counted. A
        // file still being written when the process starts is read as it
        // is then: it must parse and validate all the same.
        let policy = match reloader.read_settled()? {
            Some(policy) => policy,
            None => read_policy_file(&path)?,
        };
        reloader.put_in_force(policy)?;

        let (tx, rx) = mpsc::channel();
        let mut debouncer = None;
        if options.events {
            match watch(&path, options.debounce, tx.clone()) {
                Ok(d) => debouncer = Some(d),
                Err(e) if options.poll_interval.is_some() => tracing::warn!(
                    path = %path.display(),
                    error = %e,
                    "cannot watch the policy file's directory; re-reading it on the timer only"
                ),
                Err(e) => return Err(e),
            }
        }
        let poll_interval = options.poll_interval;
        let thread = std::thread::Builder::new()
            .name("retryctl-policy-reload".into())
            .spawn(move || reloader.run(&rx, poll_interval))
            .map_err(StartError::Spawn)?;
        Ok(PolicyWatcher {
            path,
            status,
            watching_events: debouncer.is_some(),
            tx,
            debouncer,
            thread: Some(thread),
        })
    }

    /// The file followed (made absolute).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether file events are watched (otherwise only the timer re-reads).
    pub fn is_watching_events(&self) -> bool {
        self.watching_events
    }

    /// How many reloads applied, found unchanged, or rejected the file.
    pub fn counts(&self) -> ReloadCounts {
        self.status.counts()
    }

    /// Why the file on disk is refused, while it is.
    pub fn last_error(&self) -> Option<Arc<LoadError>> {
        self.status.last_error()
    }

    /// The status, shared with the reload thread (which drops its handle
    /// when it exits).
    pub fn status(&self) -> Arc<ReloadStatus> {
        self.status.clone()
    }

    /// Asks for a re-read now (e.g. on SIGHUP), without waiting for it.
    pub fn reload_now(&self) {
        let _ = self.tx.send(Message::Changed);
    }
}

impl Drop for PolicyWatcher {
    fn drop(&mut self) {
        // Stop the event source first (joins the debouncer's thread), then
        // the reload thread.
        if let Some(debouncer) = self.debouncer.take() {
            debouncer.stop();
        }
        let _ = self.tx.send(Message::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
