//! Plain-HTTP providers' connections: one keep-alive pool of HTTP/1.1
//! connections per provider, over hyper's connection API.
//!
//! An `http://` provider is one host that always speaks HTTP/1.1 (there
//! is no TLS, so no ALPN to pick HTTP/2). hyper-util's legacy client pools
//! for any number of hosts and versions: every request looks its host up
//! in a map keyed by scheme and authority (SipHash over the authority, a
//! byte at a time, a few times per request), checks its connection out
//! and back in through that map, converts the URI to origin form and
//! boxes its future. For one host that is ~7,800 instructions of a
//! proxied request's 54,300 (`.ci/callgrind-serve`). This pool is a stack
//! of idle connections: a request pops the most recently used one (a
//! warm socket, and the others age out), or connects; the connection goes
//! back when its response is done.
//!
//! What the legacy client did and this pool still does:
//!
//! * **Connects** through the same connector: `HttpConnector` with the
//!   connect timeout, `TCP_NODELAY`, TCP keep-alive and `TCP_USER_TIMEOUT`
//!   (`client::build`'s), errors classified as before
//!   ([`Rules::hyper_connect`](retryctl::Rules::hyper_connect)).
//! * **Idle connections expire** after the provider's `idle_timeout`
//!   (zero: a connection serves one request); one closed by the upstream
//!   (a restart, its own keep-alive timeout) is dropped when seen.
//! * **A request is retried once on a fresh connection when a pooled one
//!   turns out closed before the request was written** (the server closed
//!   it while it sat idle): the upstream never saw it, so the pool's
//!   accounting never sees it either, as with the legacy client's
//!   `retry_canceled_requests`.
//! * **A connection returns to the pool only when it can take the next
//!   request**: at once when the response's body was complete with its
//!   head, else by a task that waits until it is (a stream being relayed
//!   to the client keeps its connection until the stream ends). A request
//!   cancelled mid-flight (its deadline) closes its connection: HTTP/1.1
//!   cannot abandon one exchange and keep the connection.
//!
//! `https://` providers keep hyper-util's client: TLS, ALPN, HTTP/2.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use axum::body::Bytes;
use http::{Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use tokio::time::Instant;

use super::client::Connector;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request got no response head.
#[derive(Debug)]
pub(crate) enum SendError {
    /// No connection: refused, timed out, unreachable (the upstream never
    /// saw the request).
    Connect(BoxError),
    /// The connection failed before or while the response head came
    /// (reset, closed mid-message, a malformed response).
    Send(hyper::Error),
}

/// One idle connection and when it became idle.
struct Idle {
    sender: http1::SendRequest<Full<Bytes>>,
    since: Instant,
}

/// A provider's HTTP/1.1 connections (see the module docs).
pub(crate) struct KeepAlive {
    connector: Connector,
    /// Where to connect (the provider's base URI: scheme and authority).
    target: Uri,
    /// Idle connections, least recently used first.
    idle: Mutex<VecDeque<Idle>>,
    idle_timeout: Duration,
    /// Whether the task that closes expired idle connections runs (it
    /// starts with the first connection, in the runtime that made it).
    reaping: AtomicBool,
}

impl std::fmt::Debug for KeepAlive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeepAlive")
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

impl KeepAlive {
    pub(crate) fn new(connector: Connector, target: Uri, idle_timeout: Duration) -> Arc<KeepAlive> {
        Arc::new(KeepAlive {
            connector,
            target,
            idle: Mutex::new(VecDeque::new()),
            idle_timeout,
            reaping: AtomicBool::new(false),
        })
    }

    /// Sends `request` (origin-form URI, `Host` set) and waits for the
    /// response head.
    pub(crate) async fn send(
        self: &Arc<Self>,
        mut request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, SendError> {
        loop {
            let (mut sender, reused) = match self.checkout() {
                Some(sender) => (sender, true),
                // Boxed: the connect's future (the connector's, the
                // handshake's) is most of this one's size, and a request
                // on a kept-alive connection, nearly every one, would
                // otherwise carry it, and the pool and the server copy it
                // with every request's future.
                None => (Box::pin(self.connect()).await?, false),
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    self.release(sender);
                    return Ok(response);
                }
                Err(mut e) => match e.take_message() {
                    // Handed back unwritten by a pooled connection that
                    // had closed: once more, on a new connection (the
                    // stack holds no older connection that is any more
                    // likely to be open).
                    Some(unsent) if reused => {
                        self.drain();
                        request = unsent;
                    }
                    _ => return Err(SendError::Send(e.into_error())),
                },
            }
        }
    }

    /// The most recently used idle connection that is still open and not
    /// expired; expired ones (the oldest first) are dropped on the way.
    fn checkout(&self) -> Option<http1::SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        self.expire(&mut idle, Instant::now());
        while let Some(Idle { sender, .. }) = idle.pop_back() {
            if sender.is_ready() {
                return Some(sender);
            }
            // Closed since it was put back (or, never expected, busy):
            // dropping it lets its connection task end.
        }
        None
    }

    /// Drops the connections idle for `idle_timeout` or longer (the
    /// oldest are first).
    fn expire(&self, idle: &mut VecDeque<Idle>, now: Instant) {
        while idle
            .front()
            .is_some_and(|i| now.saturating_duration_since(i.since) >= self.idle_timeout)
        {
            idle.pop_front();
        }
    }

    /// Drops every idle connection (one was found closed: the upstream
    /// probably closed the others too, e.g. it restarted).
    fn drain(&self) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    async fn connect(self: &Arc<Self>) -> Result<http1::SendRequest<Full<Bytes>>, SendError> {
        use tower_service::Service as _;
        if !self.idle_timeout.is_zero() && !self.reaping.swap(true, Ordering::Relaxed) {
            tokio::spawn(reap(Arc::downgrade(self), self.idle_timeout));
        }
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(SendError::Connect)?;
        let io = connector
            .call(self.target.clone())
            .await
            .map_err(SendError::Connect)?;
        let (sender, connection) = http1::Builder::new()
            // As the listener writes responses: one buffer, one `write`.
            .writev(false)
            .handshake(io)
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                // The request that was on it (if any) has its own error.
                tracing::debug!(target: "retryctl::gateway", error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }

    /// Puts a connection whose response head arrived back in the pool:
    /// now if it can take a request, else once it can.
    fn release(self: &Arc<Self>, mut sender: http1::SendRequest<Full<Bytes>>) {
        if self.idle_timeout.is_zero() {
            return;
        }
        if sender.is_ready() {
            self.put(sender);
            return;
        }
        let pool: Weak<KeepAlive> = Arc::downgrade(self);
        tokio::spawn(async move {
            // Ready when the response's body has been read; an error when
            // the connection closed (or the body was dropped unread).
            if sender.ready().await.is_ok()
                && let Some(pool) = pool.upgrade()
            {
                pool.put(sender);
            }
        });
    }

    fn put(&self, sender: http1::SendRequest<Full<Bytes>>) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(Idle {
                sender,
                since: Instant::now(),
            });
    }

    /// Idle connections (for tests).
    #[cfg(test)]
    fn idle_len(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Closes `pool`'s expired idle connections every `every` while the pool
/// lives, so an idle provider does not hold its connections open past
/// `idle_timeout` until its next request.
async fn reap(pool: Weak<KeepAlive>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let mut idle = pool.idle.lock().unwrap_or_else(PoisonError::into_inner);
        pool.expire(&mut idle, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::BodyExt;
    use retryctl::{Cause, Classification, Classify, Rules};
    use retryctl_testkit::{HttpServer, Reply, closed_port};

    use super::*;
    use crate::attempt::AttemptFailure;

    fn pool(addr: std::net::SocketAddr, idle_timeout: Duration) -> Arc<KeepAlive> {
        pool_with(addr, idle_timeout, Duration::from_secs(2))
    }

    fn pool_with(
        addr: std::net::SocketAddr,
        idle_timeout: Duration,
        connect_timeout: Duration,
    ) -> Arc<KeepAlive> {
        let tls = crate::client::tls_config(false).unwrap();
        let timeouts = retryctl::policy::Timeouts::default();
        let connector = crate::client::connector(tls, &timeouts, connect_timeout);
        let target: Uri = format!("http://{addr}/v1").parse().unwrap();
        KeepAlive::new(connector, target, idle_timeout)
    }

    fn request(addr: std::net::SocketAddr) -> Request<Full<Bytes>> {
        Request::post("/v1/chat/completions")
            .header(http::header::HOST, addr.to_string())
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    }

    /// Sends one request and reads its body whole.
    async fn exchange(
        pool: &Arc<KeepAlive>,
        addr: std::net::SocketAddr,
    ) -> Result<String, SendError> {
        let response = pool.send(request(addr)).await?;
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Ok(String::from_utf8(body.to_vec()).unwrap())
    }

    fn classify(e: SendError) -> (Classification, Cause) {
        let failure = match e {
            SendError::Connect(e) => AttemptFailure::Connect(e),
            SendError::Send(e) => AttemptFailure::Send(e),
        };
        let v = failure.classify(&Rules::default());
        (v.class, v.cause)
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection() {
        let server = HttpServer::keep_alive(vec![Reply::json("{\"ok\":1}")]).await;
        let pool = pool(server.addr(), Duration::from_secs(60));
        for _ in 0..5 {
            assert_eq!(exchange(&pool, server.addr()).await.unwrap(), "{\"ok\":1}");
        }
        assert_eq!((server.hits(), server.connections()), (5, 1));
        assert_eq!(pool.idle_len(), 1);
        let seen = &server.requests()[4];
        assert_eq!(seen.path, "/v1/chat/completions");
        assert_eq!(
            seen.header("host"),
            Some(server.addr().to_string().as_str())
        );
    }

    #[tokio::test]
    async fn a_zero_idle_timeout_connects_for_every_request() {
        let server = HttpServer::keep_alive(vec![Reply::json("{}")]).await;
        let pool = pool(server.addr(), Duration::ZERO);
        for _ in 0..3 {
            exchange(&pool, server.addr()).await.unwrap();
        }
        assert_eq!((server.hits(), server.connections()), (3, 3));
        assert_eq!(pool.idle_len(), 0);
    }

    /// `Connection: close` on every response: the connection is never put
    /// back, and no request fails for it.
    #[tokio::test]
    async fn a_connection_the_server_closes_is_not_reused() {
        let server = HttpServer::always(Reply::json("{}")).await;
        let pool = pool(server.addr(), Duration::from_secs(60));
        for _ in 0..3 {
            exchange(&pool, server.addr()).await.unwrap();
        }
        assert_eq!((server.hits(), server.connections()), (3, 3));
    }

    /// An idle connection past `idle_timeout` is closed, not used.
    #[tokio::test]
    async fn an_expired_idle_connection_is_replaced() {
        let server = HttpServer::keep_alive(vec![Reply::json("{}")]).await;
        let pool = pool(server.addr(), Duration::from_secs(60));
        exchange(&pool, server.addr()).await.unwrap();
        {
            let mut idle = pool.idle.lock().unwrap();
            let entry = idle.front_mut().unwrap();
            // As if it had sat idle for 61 s.
            let Some(earlier) = entry.since.checked_sub(Duration::from_secs(61)) else {
                return; // a clock younger than a minute: nothing to test
            };
            entry.since = earlier;
        }
        exchange(&pool, server.addr()).await.unwrap();
        assert_eq!((server.hits(), server.connections()), (2, 2));
        assert_eq!(pool.idle_len(), 1);
    }

    /// With no request to find them, idle connections still close once
    /// they pass `idle_timeout` (paused time: the reaper's timer fires when
    /// the clock is advanced past it).
    #[tokio::test]
    async fn idle_connections_close_without_traffic() {
        let server = HttpServer::keep_alive(vec![Reply::json("{}")]).await;
        let pool = pool(server.addr(), Duration::from_secs(60));
        exchange(&pool, server.addr()).await.unwrap();
        assert_eq!(pool.idle_len(), 1);
        tokio::time::pause();
        tokio::time::advance(Duration::from_secs(59)).await;
        tokio::task::yield_now().await;
        assert_eq!(pool.idle_len(), 1, "not yet expired");
        tokio::time::advance(Duration::from_secs(61)).await;
        tokio::task::yield_now().await;
        assert_eq!(pool.idle_len(), 0);
    }

    /// The upstream reads the request and closes the connection without a
    /// response: the request was sent, so it is not re-sent by the pool;
    /// it fails as a reset (transient: the retry policy decides).
    #[tokio::test]
    async fn a_connection_closed_after_the_request_is_a_reset() {
        let server = HttpServer::keep_alive(vec![Reply::json("{}"), Reply::close()]).await;
        let pool = pool(server.addr(), Duration::from_secs(60));
        exchange(&pool, server.addr()).await.unwrap();
        let e = exchange(&pool, server.addr()).await.unwrap_err();
        assert!(matches!(e, SendError::Send(_)), "{e:?}");
        assert_eq!(classify(e), (Classification::Transient, Cause::Reset));
        assert_eq!((server.hits(), server.connections()), (2, 1));
    }

    /// A listener whose accept queue is full drops the SYN: the connect
    /// hangs until the connect timeout, a `connect_timeout` (and a
    /// timeout, for the client's 504).
    #[tokio::test]
    async fn a_full_accept_queue_is_a_connect_timeout() {
        let server = retryctl_testkit::StalledServer::start().await;
        let pool = pool_with(
            server.addr(),
            Duration::from_secs(60),
            Duration::from_millis(200),
        );
        let started = std::time::Instant::now();
        let e = tokio::time::timeout(Duration::from_secs(5), exchange(&pool, server.addr()))
            .await
            .expect("the connect timeout fires, not the test's")
            .unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(190));
        let SendError::Connect(inner) = e else {
            panic!("{e:?}")
        };
        let failure = AttemptFailure::Connect(inner);
        assert!(failure.is_timeout());
        let v = failure.classify(&Rules::default());
        assert_eq!(
            (v.class, v.cause),
            (Classification::Transient, Cause::ConnectTimeout)
        );
    }

    #[tokio::test]
    async fn a_refused_connect_is_connect_refused() {
        let addr = closed_port();
        let pool = pool(addr, Duration::from_secs(60));
        let e = exchange(&pool, addr).await.unwrap_err();
        assert!(matches!(e, SendError::Connect(_)), "{e:?}");
        assert_eq!(
            classify(e),
            (Classification::Transient, Cause::ConnectRefused)
        );
    }
}
