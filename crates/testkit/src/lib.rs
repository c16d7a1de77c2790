//! Real loopback fault servers, shared by retryctl's tests, its demo and
//! its soak.
//!
//! - [`faults`]: a faulty upstream that follows a seeded [`schedule`]
//!   (backlog overflow, reloads, restarts, 5xx noise): the demo's and the
//!   soak's upstream;
//! - [`sockets`], [`http`], [`sse`]: single-purpose servers for tests
//!   (refused, reset, stalled accept, scripted replies, SSE streams);
//! - [`LogBuffer`]: log lines captured for a test to read.
//!
//! The servers share one accept loop, one request reader and one way of
//! acting on a [`Reply`] (delay, then respond, reset or close), the demo's
//! [`faults::FaultServer`] included.
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

/// Bytes written to it, kept for the test to read: the writer of a
/// `tracing_subscriber` `fmt` layer (`.with_writer(move || buffer.clone())`)
/// whose log lines a test asserts on. Clones share the bytes.
#[derive(Clone, Debug, Default)]
pub struct LogBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl LogBuffer {
    /// Everything written so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Accepts connections on `listener` until the task running it is aborted,
/// and serves each with `serve` as a task of its own, owned by this one
/// (so aborting it drops every connection too). With a non-zero `every`,
/// waits that long before each accept: a slow accept loop. An accept error
/// (e.g. EMFILE) backs off for 10 ms instead of spinning.
pub(crate) async fn accept_connections<F, Fut>(
    listener: tokio::net::TcpListener,
    every: std::time::Duration,
    mut serve: F,
) where
    F: FnMut(tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut conns = tokio::task::JoinSet::new();
    loop {
        if !every.is_zero() {
            tokio::time::sleep(every).await;
        }
        while conns.try_join_next().is_some() {}
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        conns.spawn(serve(stream));
    }
}

/// Aborts the wrapped task when dropped; the common core of every server handle.
#[derive(Debug)]
pub struct TaskGuard(tokio::task::JoinHandle<()>);

impl TaskGuard {
    /// Spawns `fut` on the current Tokio runtime.
    pub fn spawn<F>(fut: F) -> Self
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        TaskGuard(tokio::spawn(fut))
    }

    /// Aborts the task and waits until it has been dropped, so its listener
    /// and connections are closed when this returns.
    pub async fn stop(&mut self) {
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
