//! Hot reload: keep a [`LivePolicy`] in step with a TOML file on disk.
//!
//! A [`PolicyWatcher`] loads the file once (a bad file at start is an
//! error: a gateway must not start on a policy nobody wrote), then re-reads
//! it on a background thread whenever it may have changed, and puts it in
//! force only after it parsed and validated. Requests never wait for any of
//! this: they load whatever snapshot is in the [`LivePolicy`].
//!
//! # Why the parent directory is watched, not the file
//!
//! A watch on the file itself follows its *inode*, and the usual ways of
//! replacing a configuration file all put a new inode in place:
//!
//! * editors (vim, most IDEs) and `sed -i` write a temporary file and
//!   rename it over the old one;
//! * Kubernetes mounts a ConfigMap as `policy.toml -> ..data/policy.toml`,
//!   `..data -> ..2026_01_01`, and updates it by writing a new timestamped
//!   directory and renaming a new `..data` symlink over the old one: the
//!   file's own path never sees an event at all.
//!
//! Watching the *directory* sees every one of these as an event on the
//! name `policy.toml` or `..data`; any such event means "maybe changed".
//! The file is then re-read, parsed, validated and compared by content
//! hash ([`ActivePolicy::version`](crate::ActivePolicy::version)), so a
//! spurious event costs one small read and is counted as `unchanged`.
//!
//! # Why debounce, settle, and a timer
//!
//! * One save is several events (truncate, write, close; create, rename).
//!   A debouncer (150 ms by default) turns a burst into one re-read.
//! * A file can still be read half-written (a slow in-place writer). A
//!   half file that fails to parse is simply rejected and the next event
//!   re-reads it; to avoid applying a half file that *happens* to parse
//!   (a truncated file is a valid, empty policy), a changed file is read a
//!   second time after a short settle delay (20 ms) and only applied when
//!   both reads agree.
//! * Some file systems (NFS, some FUSE and overlay mounts) deliver no
//!   events. A timer re-reads the file every 30 s whatever happens, so a
//!   change is never lost for longer than that.
//!
//! # What is kept when the file is bad
//!
//! The last good policy stays in force when the file is bad (syntax error,
//! unknown key, value out of range, wrong type, not text) and when it is
//! missing; the precise error (file, line, column, field) is logged with
//! `tracing::warn!`, counted, and kept in [`ReloadStatus::last_error`]
//! until a good file is read again.
//!
//! # Metrics
//!
//! Reported through the `metrics` facade, off the request path:
//! [`RELOADS_TOTAL`] (`result` = `applied` | `unchanged` | `rejected`),
//! [`LAST_RELOAD_SUCCESS_TIMESTAMP`], [`RELOAD_FAILING`] and
//! [`POLICY_INFO`] (`hash` = the active version in 16 hex digits). The
//! constants are the names under the default prefix; with
//! [`ReloadOptions::metrics_prefix`] they take another, like the pool's.
//!
//! ```no_run
//! use retryctl::LivePolicy;
//! use retryctl::reload::{PolicyWatcher, ReloadOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let live = LivePolicy::default();
//! let watcher = PolicyWatcher::start("/etc/retryctl/policy.toml", live.clone(), ReloadOptions::default())?;
//! // ... build the pool with `live`; keep `watcher` alive as long as the
//! // file should be followed. Dropping it stops watching.
//! # drop(watcher); Ok(()) }
//! ```

use std::ffi::OsStr;
use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use notify_debouncer_full::notify::event::{AccessKind, AccessMode};
use notify_debouncer_full::notify::{self, EventKind, RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};

use crate::live::LivePolicy;
use crate::policy::{Policy, PolicyError};

/// Counter of reload attempts, labelled `result` = `applied` (a new policy
/// is in force), `unchanged` (the file is good and says what is in force)
/// or `rejected` (the file is bad or missing; the last good policy stays).
pub const RELOADS_TOTAL: &str = "retryctl_policy_reloads_total";
/// Gauge: when the file was last read and found good (unix seconds).
pub const LAST_RELOAD_SUCCESS_TIMESTAMP: &str =
    "retryctl_policy_last_reload_success_timestamp_seconds";
/// Gauge: 1 while the file on disk is rejected, 0 once a good one is read.
pub const RELOAD_FAILING: &str = "retryctl_policy_reload_failing";
/// Gauge set to 1 for the policy in force, labelled `hash` with its
/// [`version`](crate::ActivePolicy::version) in 16 hex digits; the series
/// of the policy it replaced is set to 0.
pub const POLICY_INFO: &str = crate::telemetry::POLICY_INFO;

/// The largest policy file read. A policy is a few kilobytes; anything
/// past this is a wrong path (a log file, a device), not a policy.
pub const MAX_POLICY_FILE_BYTES: u64 = 1 << 20;

/// The name Kubernetes swaps to update a mounted ConfigMap.
const KUBERNETES_DATA: &str = "..data";

/// How many times a changed file is re-read while it is still changing
/// before the watcher gives up until the next event or timer.
const MAX_SETTLE_READS: u32 = 5;

/// Why a policy file could not be put in force.
#[derive(Debug)]
#[non_exhaustive]
pub enum LoadError {
    /// The file could not be read: missing, no permission, an I/O error.
    Read {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },
    /// The path names a directory, a device or a pipe.
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The file is larger than [`MAX_POLICY_FILE_BYTES`].
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The file was read but is not a valid policy (syntax, unknown key,
    /// wrong type, value out of range, not UTF-8 text).
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where.
        error: PolicyError,
    },
}

impl LoadError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            LoadError::Read { path, .. }
            | LoadError::NotAFile { path }
            | LoadError::TooLarge { path }
            | LoadError::Invalid { path, .. } => path,
        }
    }

    /// The policy error (field, value, allowed, line and column), when the
    /// file was read but refused.
    pub fn policy_error(&self) -> Option<&PolicyError> {
        match self {
            LoadError::Invalid { error, .. } => Some(error),
            _ => None,
        }
    }

    /// Whether the file does not exist (deleted, or not yet created).
    pub fn is_not_found(&self) -> bool {
        matches!(self, LoadError::Read { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

/// `path:line:column: message`, the form editors and terminals jump to.
impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path().display();
        match self {
            LoadError::Read { source, .. } => write!(f, "{path}: {source}"),
            LoadError::NotAFile { .. } => write!(f, "{path}: not a regular file"),
            LoadError::TooLarge { .. } => write!(
                f,
                "{path}: larger than {MAX_POLICY_FILE_BYTES} bytes, not a policy file"
            ),
            LoadError::Invalid { error, .. } => {
                if let Some((line, column)) = error.location {
                    write!(f, "{path}:{line}:{column}: ")?;
                } else {
                    write!(f, "{path}: ")?;
                }
                let message = PolicyError {
                    location: None,
                    ..error.clone()
                };
                write!(f, "{message}")
            }
        }
    }
}

impl std::error::Error for LoadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LoadError::Read { source, .. } => Some(source),
            LoadError::Invalid { error, .. } => Some(error),
            _ => None,
        }
    }
}

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

/// Reads and validates a policy file (at most [`MAX_POLICY_FILE_BYTES`]).
/// An empty file is the default policy.
pub fn read_policy_file(path: &Path) -> Result<Policy, LoadError> {
    parse(path, read_bytes(path)?)
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, LoadError> {
    let read_error = |source| LoadError::Read {
        path: path.to_owned(),
        source,
    };
    // Checked before opening: opening a FIFO would block.
    let meta = std::fs::metadata(path).map_err(read_error)?;
    if !meta.is_file() {
        return Err(LoadError::NotAFile {
            path: path.to_owned(),
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0).min(1 << 16));
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_POLICY_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_POLICY_FILE_BYTES {
        return Err(LoadError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

fn parse(path: &Path, bytes: Vec<u8>) -> Result<Policy, LoadError> {
    Policy::from_bytes(&bytes).map_err(|error| LoadError::Invalid {
        path: path.to_owned(),
        error,
    })
}

/// How a [`PolicyWatcher`] follows its file.
#[derive(Clone, Debug)]
pub struct ReloadOptions {
    debounce: Duration,
    poll_interval: Option<Duration>,
    events: bool,
    settle: Duration,
    metrics_prefix: Arc<str>,
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
    applied: AtomicU64,
    unchanged: AtomicU64,
    rejected: AtomicU64,
    last_error: ArcSwapOption<LoadError>,
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
enum Message {
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

/// Watches the file's directory; events that name the file (or `..data`)
/// become [`Message::Changed`].
fn watch(
    path: &Path,
    debounce: Duration,
    tx: mpsc::Sender<Message>,
) -> Result<Debouncer<RecommendedWatcher, RecommendedCache>, StartError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(OsStr::to_owned).unwrap_or_default();
    let handler = move |result: DebounceEventResult| {
        let message = match result {
            Ok(events) if events.iter().any(|e| touches(e, &name)) => Message::Changed,
            Ok(_) => return,
            Err(errors) => Message::WatchErrors(errors.iter().map(ToString::to_string).collect()),
        };
        let _ = tx.send(message);
    };
    let watch_error = |source| StartError::Watch {
        dir: dir.clone(),
        source,
    };
    let mut debouncer = new_debouncer(debounce, None, handler).map_err(watch_error)?;
    debouncer
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(watch_error)?;
    Ok(debouncer)
}

/// Whether an event may have changed the file named `name`: anything on
/// that name or on `..data` except the watcher's own reads (opens).
fn touches(event: &notify::Event, name: &OsStr) -> bool {
    if event.need_rescan() {
        return true;
    }
    if let EventKind::Access(kind) = event.kind {
        if kind != AccessKind::Close(AccessMode::Write) {
            return false;
        }
    }
    event
        .paths
        .iter()
        .filter_map(|p| p.file_name())
        .any(|n| n == name || n == KUBERNETES_DATA)
}

/// The reload metrics' names under one prefix.
#[derive(Debug)]
struct ReloadMetrics {
    prefix: Arc<str>,
    reloads_total: String,
    last_success: String,
    failing: String,
}

impl ReloadMetrics {
    fn new(prefix: &Arc<str>) -> Self {
        use crate::telemetry::prefixed;
        ReloadMetrics {
            prefix: prefix.clone(),
            reloads_total: prefixed(prefix, RELOADS_TOTAL),
            last_success: prefixed(prefix, LAST_RELOAD_SUCCESS_TIMESTAMP),
            failing: prefixed(prefix, RELOAD_FAILING),
        }
    }

    fn describe(&self) {
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
enum Outcome {
    Applied,
    Unchanged,
    Rejected,
    /// Still being written: neither applied nor counted.
    Unsettled,
}

/// The reload thread's state: reads the file and puts it in force.
struct Reloader {
    path: PathBuf,
    live: LivePolicy,
    status: Arc<ReloadStatus>,
    settle: Duration,
    /// The bytes of the last settled read: reading the same bytes again
    /// needs no settle delay.
    last_read: Option<Vec<u8>>,
    /// The version last reported in [`POLICY_INFO`].
    info_hash: Option<u64>,
    /// The metric names, under the configured prefix.
    names: ReloadMetrics,
}

impl Reloader {
    fn run(mut self, rx: &mpsc::Receiver<Message>, poll_interval: Option<Duration>) {
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
    fn reload(&mut self) -> Outcome {
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
    fn read_settled(&mut self) -> Result<Option<Policy>, LoadError> {
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
    fn put_in_force(&mut self, policy: Policy) -> Result<Outcome, LoadError> {
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

    fn reject(&mut self, error: LoadError) {
        self.status.rejected.fetch_add(1, Ordering::AcqRel);
        let names = &self.names;
        metrics::counter!(names.reloads_total.clone(), "result" => "rejected").increment(1);
        metrics::gauge!(names.failing.clone()).set(1.0);
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
        self.status.last_error.store(Some(Arc::new(error)));
    }
}

fn hex(version: u64) -> String {
    crate::telemetry::policy_hash(version)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use metrics::{
        Counter, CounterFn, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder,
        SharedString, Unit,
    };
    use notify_debouncer_full::notify::Event;
    use notify_debouncer_full::notify::event::{CreateKind, ModifyKind, RenameMode};

    use super::*;

    /// Keeps the last value of every series, keyed `name{label=value,...}`.
    #[derive(Clone, Default)]
    struct Values(Arc<Mutex<BTreeMap<String, f64>>>);

    struct Series(Values, String);

    impl Series {
        fn update(&self, f: impl FnOnce(&mut f64)) {
            if let Ok(mut values) = self.0.0.lock() {
                f(values.entry(self.1.clone()).or_insert(0.0));
            }
        }
    }

    impl CounterFn for Series {
        fn increment(&self, value: u64) {
            self.update(|v| *v += value as f64);
        }
        fn absolute(&self, value: u64) {
            self.update(|v| *v = v.max(value as f64));
        }
    }

    impl GaugeFn for Series {
        fn increment(&self, value: f64) {
            self.update(|v| *v += value);
        }
        fn decrement(&self, value: f64) {
            self.update(|v| *v -= value);
        }
        fn set(&self, value: f64) {
            self.update(|v| *v = value);
        }
    }

    impl Values {
        fn series(&self, key: &Key) -> Arc<Series> {
            let labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            let name = if labels.is_empty() {
                key.name().to_owned()
            } else {
                format!("{}{{{}}}", key.name(), labels.join(","))
            };
            Arc::new(Series(self.clone(), name))
        }

        fn get(&self, series: &str) -> Option<f64> {
            self.0.lock().ok()?.get(series).copied()
        }
    }

    impl Recorder for Values {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            Counter::from_arc(self.series(key))
        }
        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::from_arc(self.series(key))
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    fn reloader(path: &Path, live: &LivePolicy) -> Reloader {
        Reloader {
            path: path.to_owned(),
            live: live.clone(),
            status: Arc::new(ReloadStatus::default()),
            settle: Duration::ZERO,
            last_read: None,
            info_hash: None,
            names: ReloadMetrics::new(&crate::telemetry::DEFAULT_PREFIX.into()),
        }
    }

    #[test]
    fn metrics_follow_applied_unchanged_and_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        let live = LivePolicy::default();
        let default_hash = hex(live.load().version());
        let mut r = reloader(&path, &live);
        let values = Values::default();
        let applied = format!("{RELOADS_TOTAL}{{result=applied}}");
        let unchanged = format!("{RELOADS_TOTAL}{{result=unchanged}}");
        let rejected = format!("{RELOADS_TOTAL}{{result=rejected}}");
        metrics::with_local_recorder(&values, || {
            std::fs::write(&path, "").unwrap();
            assert_eq!(r.reload(), Outcome::Unchanged, "empty = the defaults");
            assert_eq!(values.get(&unchanged), Some(1.0));
            assert_eq!(values.get(RELOAD_FAILING), Some(0.0));
            assert!(values.get(LAST_RELOAD_SUCCESS_TIMESTAMP).unwrap() > 1.7e9);
            let info_default = format!("{POLICY_INFO}{{hash={default_hash}}}");
            assert_eq!(values.get(&info_default), Some(1.0));

            std::fs::write(&path, "[budget]\nratio = 2.0\n").unwrap();
            assert_eq!(r.reload(), Outcome::Rejected);
            assert_eq!(values.get(&rejected), Some(1.0));
            assert_eq!(values.get(RELOAD_FAILING), Some(1.0));
            let e = r.status.last_error().unwrap();
            assert_eq!(e.policy_error().unwrap().location, Some((2, 9)));
            assert_eq!(values.get(&info_default), Some(1.0), "still in force");

            std::fs::write(&path, "max_rounds = 3\n").unwrap();
            assert_eq!(r.reload(), Outcome::Applied);
            let new_hash = hex(live.load().version());
            assert_eq!(new_hash.len(), 16);
            assert_ne!(new_hash, default_hash);
            assert_eq!(values.get(&applied), Some(1.0));
            assert_eq!(values.get(RELOAD_FAILING), Some(0.0));
            assert_eq!(
                values.get(&info_default),
                Some(0.0),
                "the old series is zeroed"
            );
            assert_eq!(
                values.get(&format!("{POLICY_INFO}{{hash={new_hash}}}")),
                Some(1.0)
            );
            assert!(r.status.last_error().is_none());
            std::fs::remove_file(&path).unwrap();
            assert_eq!(r.reload(), Outcome::Rejected);
            assert!(r.status.last_error().unwrap().is_not_found());
            assert_eq!(values.get(RELOAD_FAILING), Some(1.0));
        });
        assert_eq!(
            r.status.counts(),
            ReloadCounts {
                applied: 1,
                unchanged: 1,
                rejected: 2
            }
        );
        assert_eq!(live.load().policy().max_rounds, 3);
    }

    #[test]
    fn directories_devices_and_huge_files_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            read_policy_file(dir.path()),
            Err(LoadError::NotAFile { .. })
        ));
        let big = dir.path().join("big.toml");
        let line = "# comment\n".repeat(110_000);
        std::fs::write(&big, line).unwrap();
        let e = read_policy_file(&big).unwrap_err();
        assert!(matches!(e, LoadError::TooLarge { .. }), "{e}");
        #[cfg(unix)]
        {
            let e = read_policy_file(Path::new("/dev/zero")).unwrap_err();
            assert!(matches!(e, LoadError::NotAFile { .. }), "{e}");
        }
    }

    #[test]
    fn only_events_on_the_file_or_data_link_count_and_reads_do_not() {
        let name = OsStr::new("policy.toml");
        let event = |kind, path: &str| Event::new(kind).add_path(PathBuf::from(path));
        let modify = EventKind::Modify(ModifyKind::Any);
        assert!(touches(&event(modify, "/etc/r/policy.toml"), name));
        assert!(touches(&event(modify, "/etc/r/..data"), name));
        assert!(!touches(&event(modify, "/etc/r/other.toml"), name));
        assert!(!touches(&event(modify, "/etc/r/..data_tmp"), name));
        let create = EventKind::Create(CreateKind::File);
        assert!(touches(&event(create, "/etc/r/policy.toml"), name));
        let rename = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        let swap = event(rename, "/etc/r/..data_tmp").add_path(PathBuf::from("/etc/r/..data"));
        assert!(touches(&swap, name));
        let open = EventKind::Access(AccessKind::Open(AccessMode::Any));
        assert!(
            !touches(&event(open, "/etc/r/policy.toml"), name),
            "our own read"
        );
        let closed = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert!(touches(&event(closed, "/etc/r/policy.toml"), name));
        let rescan = Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert!(touches(&rescan, name));
    }

    #[test]
    fn load_errors_read_like_compiler_errors() {
        let e = LoadError::Invalid {
            path: PathBuf::from("config/policy.toml"),
            error: Policy::from_toml("\n[budget]\nratio = 3.0\n").unwrap_err(),
        };
        assert_eq!(
            e.to_string(),
            "config/policy.toml:3:9: `budget.ratio` = 3.0 is invalid: a number within 0.0..=1.0"
        );
    }
}
