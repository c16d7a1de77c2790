//! The HTTP/1.1 accept loop the gateway and the `/metrics` endpoint share.
//!
//! `axum::serve` gives hyper no timer, so hyper's header-read timeout never
//! applies under it: a client that trickles its request head (slow loris)
//! or opens a connection and says nothing holds a socket and a task for as
//! long as it likes. [`serve_connections`] serves each connection with
//! hyper's `http1::Builder` and a `TokioTimer` instead, so a request head
//! must arrive within `header_read_timeout`: on a new connection and
//! between the requests of a keep-alive connection alike (hyper arms the
//! same timer whenever it waits for a head), which makes it the idle
//! keep-alive timeout too. Stopping is graceful: the listener closes, idle
//! connections close, and requests in flight get `drain`.
//!
//! Accepted sockets have `TCP_NODELAY` set (as nginx's `tcp_nodelay on`):
//! a streamed response is many small writes, and with Nagle's algorithm
//! each one after the first would wait for the client's (delayed) ACK.

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use axum::response::Response;
use hyper::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

/// How one server treats its connections.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Connections {
    /// What logs call the server (`gateway`, `metrics`).
    pub(crate) server: &'static str,
    /// The longest a client may take to send a request head, and the
    /// longest a keep-alive connection may stay idle between requests.
    pub(crate) header_read_timeout: Duration,
    /// How long requests in flight may take to finish once `shutdown`
    /// completes; what is left then is dropped.
    pub(crate) drain: Duration,
}

/// Serves `service` on `listener` until `shutdown` completes, then stops
/// accepting and lets the requests in flight finish for up to
/// `connections.drain`.
///
/// Dropping the returned future (e.g. aborting its task) stops accepting
/// at once and starts the same graceful close on every connection, with
/// no time limit: idle ones close, requests in flight finish.
pub(crate) async fn serve_connections<S, F>(
    listener: TcpListener,
    service: S,
    connections: Connections,
    shutdown: F,
) where
    S: Service<Request<Incoming>, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    F: Future<Output = ()>,
{
    let server = connections.server;
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(connections.header_read_timeout)
        // A response's head and body are copied into one buffer and
        // written with `write`, not queued as separate buffers for
        // `writev`: for the few hundred bytes of a completion's head and
        // body (or of one stream event) the copy is cheaper than the
        // queue (~400 instructions per proxied request); a large body
        // costs one memcpy, bounded by hyper's buffer size.
        .writev(false);
    let graceful = GracefulShutdown::new();
    let mut shutdown = pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // E.g. out of file descriptors: wait for some to be
                    // closed rather than spin.
                    tracing::error!(target: "retryctl::listener", server, error = %e, "accept failed");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        () = &mut shutdown => break,
                    }
                }
            },
            () = &mut shutdown => break,
        };
        // Best effort: a socket that refuses it still works, only slower.
        let _ = stream.set_nodelay(true);
        let connection =
            graceful.watch(http.serve_connection(TokioIo::new(stream), service.clone()));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                // Header timeouts, resets, malformed requests: the
                // client's doing, and no address is named.
                tracing::debug!(target: "retryctl::listener", server, error = %e, "connection ended");
            }
        });
    }
    drop(listener);
    tracing::info!(target: "retryctl::listener", server, "shutting down: draining in-flight requests");
    let drain = connections.drain;
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            target: "retryctl::listener",
            server,
            timeout_ms = drain.as_millis() as u64,
            "shutdown timeout passed: dropping the requests still in flight"
        );
    }
}

/// Errors of one connection being accepted (the client left first), not
/// of the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}
