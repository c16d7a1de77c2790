//! Hot reload: keep a [`LivePolicy`](crate::policy::LivePolicy) in step with a TOML file on disk.
//!
//! A [`PolicyWatcher`] loads the file once (a bad file at start is an
//! error: a gateway must not start on a policy nobody wrote), then re-reads
//! it on a background thread whenever it may have changed, and puts it in
//! force only after it parsed and validated. Requests never wait for any of
//! this: they load whatever snapshot is in the [`LivePolicy`](crate::policy::LivePolicy).
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
//! hash ([`ActivePolicy::version`](crate::policy::ActivePolicy::version)), so a
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
//! use retryctl::policy::LivePolicy;
//! use retryctl::reload::{PolicyWatcher, ReloadOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let live = LivePolicy::default();
//! let watcher = PolicyWatcher::start("/etc/retryctl/policy.toml", live.clone(), ReloadOptions::default())?;
//! // ... build the pool with `live`; keep `watcher` alive as long as the
//! // file should be followed. Dropping it stops watching.
//! # drop(watcher); Ok(()) }
//! ```

#[cfg(feature = "watch")]
mod events;
mod file;
#[cfg(feature = "watch")]
mod reloader;
#[cfg(all(test, feature = "watch"))]
mod tests;
#[cfg(feature = "watch")]
mod watcher;

pub use self::file::{LoadError, MAX_POLICY_FILE_BYTES, read_policy_file};
#[cfg(feature = "watch")]
pub use self::watcher::{PolicyWatcher, ReloadCounts, ReloadOptions, ReloadStatus, StartError};

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
/// [`version`](crate::policy::ActivePolicy::version) in 16 hex digits; the series
/// of the policy it replaced is set to 0.
pub const POLICY_INFO: &str = crate::telemetry::POLICY_INFO;
