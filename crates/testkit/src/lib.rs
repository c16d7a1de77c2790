//! Real loopback fault servers, shared by retryctl's tests, its demo and
//! its soak.
//!
//! - [`faults`]: a faulty upstream that follows a seeded [`schedule`]
//!   (backlog overflow, reloads, restarts, 5xx noise): the demo's and the
//!   soak's upstream;
//! - [`sockets`], [`http`], [`sse`]: single-purpose servers for tests
//!   (refused, reset, stalled accept, scripted replies, SSE streams).
//!
//! Everything binds `127.0.0.1:0` and runs as Tokio tasks, so the constructors
//! must be called from inside a Tokio runtime (e.g. a `#[tokio::test]`). Each
//! server stops when its handle is dropped: the accept task is aborted, which
//! drops the listener and every per-connection task it owns.
#![forbid(unsafe_code)]

pub mod faults;
pub mod http;
pub mod schedule;
pub mod sockets;
pub mod sse;

pub use http::{HttpServer, RecordedRequest, Reply, ReplyAction};
pub use sockets::{ReopeningServer, ResetMode, ResetServer, StalledServer, closed_port};

use std::error::Error as StdError;
use std::io;

/// The kind of the first `std::io::Error` found while walking `err` and its
/// `source()` chain, or `None` if the chain holds no `io::Error`.
pub fn io_kind(err: &(dyn StdError + 'static)) -> Option<io::ErrorKind> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(ioe) = e.downcast_ref::<io::Error>() {
            return Some(ioe.kind());
        }
        cur = e.source();
    }
    None
}

/// Every link of `err`'s `source()` chain rendered as `Display`, joined with
/// `" -> "`; meant for assertion messages.
pub fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut parts = Vec::new();
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        parts.push(e.to_string());
        cur = e.source();
    }
    parts.join(" -> ")
}

/// Aborts the wrapped task when dropped; the common core of every server handle.
#[derive(Debug)]
pub(crate) struct TaskGuard(tokio::task::JoinHandle<()>);

impl TaskGuard {
    /// Spawns `fut` on the current Tokio runtime.
    pub(crate) fn spawn<F>(fut: F) -> Self
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        TaskGuard(tokio::spawn(fut))
    }

    /// Aborts the task and waits until it has been dropped, so its listener
    /// and connections are closed when this returns.
    pub(crate) async fn stop(&mut self) {
        self.0.abort();
        let _ = (&mut self.0).await;
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The first `hyper::Error` in `err`'s `source()` chain, if any; lets tests
/// assert e.g. `is_incomplete_message()` instead of matching message text.
pub fn hyper_error<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a hyper::Error> {
    let mut cur: Option<&'a (dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            return Some(h);
        }
        cur = e.source();
    }
    None
}
