//! The HTTP/1.1 accept loop the gateway and the `/metrics` endpoint share.
//!
//! `axum::serve` bounds nothing: a client that trickles its request head
//! (slow loris) or opens a connection and says nothing holds a socket and
//! a task for as long as it likes. [`serve_connections`] serves each
//! connection with hyper's `http1::Builder` and watches it: a connection
//! on which no request begins or ends for a whole `header_read_timeout`,
//! while none is in flight, is closed. That bounds the wait for a request
//! head on a new connection and between the requests of a keep-alive
//! connection alike, which makes it the idle keep-alive timeout too.
//! Stopping is graceful: the listener closes, idle connections close, and
//! requests in flight get `drain` (each connection's watchdog tells it to
//! close gracefully, see [`Drainable`]).
//!
//! **Why a watchdog and not hyper's own `header_read_timeout`**: hyper
//! arms that timer anew for every request head (a boxed `Sleep`, registered
//! in the timer wheel while the connection waits, removed and freed when
//! the head arrives): about 1,750 of the ~44,400 instructions of a proxied
//! request (`.ci/callgrind-serve`). The watchdog is one task and one timer
//! per connection, woken once per timeout, and a request costs it two
//! counter increments. What it gives up is precision: an idle connection
//! closes after between one and two timeouts (a silent new one after
//! one), where hyper's timer fired after exactly one.
//!
//! Accepted sockets have `TCP_NODELAY` set (as nginx's `tcp_nodelay on`):
//! a streamed response is many small writes, and with Nagle's algorithm
//! each one after the first would wait for the client's (delayed) ACK.

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::response::Response;
use futures_util::task::AtomicWaker;
use hyper::Request;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How one server treats its connections.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Connections {
    /// What logs call the server (`gateway`, `metrics`).
    pub(crate) server: &'static str,
    /// How long a connection may go without a request beginning or
    /// ending, none in flight: the longest a client may take to send a
    /// request head, and to send the next one on a keep-alive connection
    /// (closed after one to two of these; see the module docs).
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
    http
        // A response's head and body are copied into one buffer and
        // written with `write`, not queued as separate buffers for
        // `writev`: for the few hundred bytes of a completion's head and
        // body (or of one stream event) the copy is cheaper than the
        // queue (~400 instructions per proxied request); a large body
        // costs one memcpy, bounded by hyper's buffer size.
        .writev(false);
    // Told to every connection's watchdog when the server stops (sent, or
    // dropped with this future); closed once every watchdog has ended,
    // i.e. every connection.
    let (stopping, _) = watch::channel(());
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
        let activity = Arc::new(Activity::default());
        let watched = Watched {
            service: service.clone(),
            activity: activity.clone(),
        };
        let connection = Drainable {
            connection: http.serve_connection(TokioIo::new(stream), watched),
            activity: activity.clone(),
            draining: false,
        };
        let task = tokio::spawn(async move {
            if let Err(e) = connection.await {
                // Resets, malformed requests: the client's doing, and no
                // address is named.
                tracing::debug!(target: "retryctl::listener", server, error = %e, "connection ended");
            }
        });
        tokio::spawn(watch(
            activity,
            task,
            connections.header_read_timeout,
            stopping.subscribe(),
            server,
        ));
    }
    drop(listener);
    tracing::info!(target: "retryctl::listener", server, "shutting down: draining in-flight requests");
    let drain = connections.drain;
    // No connection left: nobody to tell, nothing to wait for.
    let _ = stopping.send(());
    if tokio::time::timeout(drain, stopping.closed())
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

/// What a connection's watchdog sees of it: how many requests began
/// (their head arrived and the service was called) and how many ended
/// (their response written, or dropped); and how the watchdog tells the
/// connection that the server stops.
#[derive(Debug, Default)]
struct Activity {
    begun: AtomicU64,
    ended: AtomicU64,
    /// Set when the server stops: the connection closes gracefully.
    draining: AtomicBool,
    /// The connection's task, woken when `draining` is set.
    task: AtomicWaker,
}

impl Activity {
    fn now(&self) -> (u64, u64) {
        (
            self.begun.load(Ordering::Relaxed),
            self.ended.load(Ordering::Relaxed),
        )
    }
}

/// Closes the connection served by `task` (aborting the task drops it)
/// once a whole `every` has passed with no request in flight and none
/// begun or ended; when `stopping` changes or closes (the server stops),
/// tells the connection to close gracefully. Returns when the connection
/// has ended, and only then drops `stopping` (the server's drain waits
/// for every receiver to go).
async fn watch(
    activity: Arc<Activity>,
    mut task: JoinHandle<()>,
    every: Duration,
    mut stopping: watch::Receiver<()>,
    server: &str,
) {
    let mut seen = activity.now();
    let mut told = false;
    let mut tick = pin!(tokio::time::sleep(every));
    loop {
        tokio::select! {
            _ = &mut task => return,
            _ = stopping.changed(), if !told => {
                told = true;
                activity.draining.store(true, Ordering::Release);
                activity.task.wake();
                continue;
            }
            () = &mut tick => {}
        }
        tick.as_mut().reset(tokio::time::Instant::now() + every);
        let now = activity.now();
        let idle = now.0 == now.1;
        if idle && now == seen {
            task.abort();
            tracing::debug!(
                target: "retryctl::listener",
                server,
                timeout_ms = every.as_millis() as u64,
                "connection closed: no request head within the header-read timeout"
            );
            return;
        }
        seen = now;
    }
}

pin_project_lite::pin_project! {
    /// A connection that closes gracefully once its watchdog says the
    /// server stops: hyper's `graceful_shutdown`, so a request in flight
    /// is answered (with `Connection: close`) and an idle connection
    /// closes at once.
    ///
    /// hyper-util's `GracefulShutdown` does the same by polling a `watch`
    /// receiver's `changed()` at every poll of the connection (~560
    /// instructions per proxied request); the watchdog, woken once per
    /// timeout anyway, watches the server instead, and a poll of the
    /// connection only registers its waker and reads a flag.
    struct Drainable<C> {
        #[pin]
        connection: C,
        activity: Arc<Activity>,
        draining: bool,
    }
}

impl<C: GracefulConnection> Future for Drainable<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let mut this = self.project();
        if !*this.draining {
            // Registered before the flag is read: a watchdog that sets it
            // after the read wakes this task.
            this.activity.task.register(cx.waker());
            if this.activity.draining.load(Ordering::Acquire) {
                *this.draining = true;
                this.connection.as_mut().graceful_shutdown();
            }
        }
        this.connection.poll(cx)
    }
}

/// A connection's service, counting its requests for [`watch`].
#[derive(Clone, Debug)]
struct Watched<S> {
    service: S,
    activity: Arc<Activity>,
}

impl<S> Service<Request<Incoming>> for Watched<S>
where
    S: Service<Request<Incoming>, Response = Response>,
{
    type Response = http::Response<WatchedBody>;
    type Error = S::Error;
    type Future = WatchedFuture<S::Future>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.activity.begun.fetch_add(1, Ordering::Relaxed);
        WatchedFuture {
            future: self.service.call(req),
            request: Some(InFlight(self.activity.clone())),
        }
    }
}

/// One request in flight: it ends when this is dropped.
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.ended.fetch_add(1, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// The service's future; its request stays in flight in the response
    /// body it returns.
    struct WatchedFuture<F> {
        #[pin]
        future: F,
        request: Option<InFlight>,
    }
}

impl<F, E> Future for WatchedFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<http::Response<WatchedBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.future.poll(cx))?;
        let request = this.request.take();
        Poll::Ready(Ok(response.map(|body| WatchedBody {
            body,
            _request: request,
        })))
    }
}

/// A response body whose request is in flight until hyper drops it (the
/// body written, or the connection gone). A stream relayed for minutes
/// keeps its connection busy, not idle.
#[derive(Debug)]
struct WatchedBody {
    body: Body,
    _request: Option<InFlight>,
}

impl hyper::body::Body for WatchedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
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

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::{mpsc, oneshot};

    use super::*;

    const EVERY: Duration = Duration::from_secs(10);

    /// A connection (a task that runs until aborted) under a watchdog
    /// whose first timeout has started.
    struct Connection {
        /// Whether the connection's task has ended (been aborted).
        abort: tokio::task::AbortHandle,
        watchdog: JoinHandle<()>,
        /// The server: it stops when this sends or is dropped.
        server: watch::Sender<()>,
    }

    async fn connection(activity: &Arc<Activity>) -> Connection {
        let task = tokio::spawn(std::future::pending());
        let abort = task.abort_handle();
        let (server, stopping) = watch::channel(());
        let watchdog = tokio::spawn(watch(activity.clone(), task, EVERY, stopping, "test"));
        settle().await;
        Connection {
            abort,
            watchdog,
            server,
        }
    }

    /// Lets the spawned watchdog and task run after the clock moved.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    /// A connection that never sends a head is closed one timeout after it
    /// was accepted, not before.
    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_closes_after_one_timeout() {
        let c = connection(&Arc::default()).await;
        tokio::time::advance(EVERY - Duration::from_millis(1)).await;
        settle().await;
        assert!(!c.abort.is_finished(), "closed before the timeout");
        tokio::time::advance(Duration::from_millis(2)).await;
        settle().await;
        assert!(c.abort.is_finished(), "still open after the timeout");
        assert!(c.watchdog.is_finished());
    }

    /// A request in flight (a long completion, a stream) keeps its
    /// connection however long it takes.
    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_keeps_the_connection() {
        let activity = Arc::new(Activity::default());
        activity.begun.fetch_add(1, Ordering::Relaxed);
        let c = connection(&activity).await;
        tokio::time::advance(EVERY * 10).await;
        settle().await;
        assert!(!c.abort.is_finished(), "closed with a request in flight");
        // The response ends: idle from then on, closed one to two
        // timeouts later.
        activity.ended.fetch_add(1, Ordering::Relaxed);
        tokio::time::advance(EVERY).await;
        settle().await;
        tokio::time::advance(EVERY).await;
        settle().await;
        tokio::time::advance(EVERY).await;
        settle().await;
        assert!(c.abort.is_finished(), "an idle connection stayed open");
    }

    /// Requests every half timeout keep a keep-alive connection open; once
    /// they stop, it closes within two timeouts of the last one.
    #[tokio::test(start_paused = true)]
    async fn a_keep_alive_connection_closes_two_timeouts_after_its_last_request_at_most() {
        let activity = Arc::new(Activity::default());
        let c = connection(&activity).await;
        for _ in 0..20 {
            activity.begun.fetch_add(1, Ordering::Relaxed);
            activity.ended.fetch_add(1, Ordering::Relaxed);
            tokio::time::advance(EVERY / 2).await;
            settle().await;
            assert!(!c.abort.is_finished(), "closed while requests came");
        }
        let mut waited = EVERY / 2;
        while !c.abort.is_finished() {
            tokio::time::advance(Duration::from_millis(100)).await;
            settle().await;
            waited += Duration::from_millis(100);
            assert!(
                waited <= EVERY * 2,
                "open {waited:?} after the last request"
            );
        }
        assert!(waited > EVERY, "closed {waited:?} after the last request");
    }

    /// A connection that ends (by itself or aborted) ends its watchdog too (no task is
    /// left behind for a timeout).
    #[tokio::test(start_paused = true)]
    async fn the_watchdog_ends_with_its_connection() {
        let c = connection(&Arc::default()).await;
        c.abort.abort();
        settle().await;
        assert!(c.watchdog.is_finished());
    }

    /// Counts the wakes it gets.
    #[derive(Default)]
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The server stops: the watchdog sets the connection's flag and wakes
    /// its task (which then closes gracefully), and it holds the server's
    /// drain open until the connection has ended.
    #[tokio::test(start_paused = true)]
    async fn a_stopping_server_drains_each_connection_through_its_watchdog() {
        let activity = Arc::new(Activity::default());
        // A request in flight: the connection is not idle-closed meanwhile.
        activity.begun.fetch_add(1, Ordering::Relaxed);
        let wakes = Arc::new(Wakes::default());
        activity
            .task
            .register(&std::task::Waker::from(wakes.clone()));
        let Connection {
            abort,
            watchdog,
            server,
        } = connection(&activity).await;
        assert!(!activity.draining.load(Ordering::Relaxed));
        server.send(()).unwrap();
        settle().await;
        assert!(activity.draining.load(Ordering::Relaxed), "not told");
        assert_eq!(wakes.0.load(Ordering::Relaxed), 1, "the task not woken");
        let drained = tokio::spawn(async move { server.closed().await });
        tokio::time::advance(EVERY * 3).await;
        settle().await;
        assert!(!drained.is_finished(), "drained with a connection open");
        assert!(!abort.is_finished());
        // The connection ends (its response written, hyper closes it).
        abort.abort();
        settle().await;
        assert!(watchdog.is_finished());
        assert!(drained.is_finished(), "the drain did not see the end");
    }

    /// A server whose `shutdown` future is never polled again because
    /// the whole future was dropped tells its connections to drain too.
    #[tokio::test(start_paused = true)]
    async fn a_dropped_server_drains_its_connections() {
        let activity = Arc::new(Activity::default());
        let c = connection(&activity).await;
        drop(c.server);
        settle().await;
        assert!(activity.draining.load(Ordering::Relaxed));
    }

    /// A gateway-like server on a real socket: answers `GET /slow` when
    /// `go` is notified (notifying `entered` when it starts waiting),
    /// anything else at once.
    async fn serve_until(
        stop: oneshot::Receiver<()>,
        entered: Arc<tokio::sync::Notify>,
        go: Arc<tokio::sync::Notify>,
    ) -> (std::net::SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let (entered, go) = (entered.clone(), go.clone());
            async move {
                if req.uri().path() == "/slow" {
                    entered.notify_one();
                    go.notified().await;
                }
                Ok::<_, Infallible>(Response::new(Body::from("done")))
            }
        });
        let connections = Connections {
            server: "test",
            header_read_timeout: Duration::from_secs(60),
            drain: Duration::from_secs(30),
        };
        let server = tokio::spawn(serve_connections(listener, service, connections, async {
            let _ = stop.await;
        }));
        (addr, server)
    }

    /// Sends `GET path` on `client` and reads one response (its body is
    /// "done"): the response head, lowercased.
    async fn get(client: &mut tokio::net::TcpStream, path: &str) -> String {
        let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
        client.write_all(request.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"done") {
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the response");
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).to_lowercase()
    }

    /// Whether the server closes `client` within 5 s.
    async fn closed(client: &mut tokio::net::TcpStream) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    /// Stopping: an idle keep-alive connection is closed at once (not
    /// after its 60 s idle timeout), a request in flight is answered with
    /// `Connection: close` and its connection closed, and the server
    /// returns once both are gone.
    #[tokio::test]
    async fn stopping_answers_the_request_in_flight_and_closes_idle_connections() {
        let entered = Arc::new(tokio::sync::Notify::new());
        let go = Arc::new(tokio::sync::Notify::new());
        let (stop, stop_rx) = oneshot::channel();
        let (addr, server) = serve_until(stop_rx, entered.clone(), go.clone()).await;
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = get(&mut idle, "/").await;
        assert!(!head.contains("connection: close"), "{head}");
        let mut busy = tokio::net::TcpStream::connect(addr).await.unwrap();
        busy.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        entered.notified().await;
        stop.send(()).unwrap();
        assert!(closed(&mut idle).await, "the idle connection stayed open");
        assert!(!server.is_finished(), "returned with a request in flight");
        go.notify_one();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"done") {
            let n = busy.read(&mut buf).await.unwrap();
            assert!(n > 0, "the request in flight was not answered");
            got.extend_from_slice(&buf[..n]);
        }
        let head = String::from_utf8_lossy(&got).to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("connection: close"), "{head}");
        assert!(
            closed(&mut busy).await,
            "the answered connection stayed open"
        );
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server returned once its connections were gone")
            .unwrap();
    }

    /// On a real connection: a request is in flight from its head until
    /// its streamed body has been written, not only until the service
    /// returned the response.
    #[tokio::test]
    async fn a_request_is_in_flight_until_its_body_is_written() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (chunks, rx) = mpsc::channel::<Bytes>(4);
        let (called, was_called) = oneshot::channel::<()>();
        let state = Arc::new(std::sync::Mutex::new((Some(rx), Some(called))));
        let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
            let (rx, called) = {
                let mut s = state.lock().unwrap();
                (s.0.take().unwrap(), s.1.take().unwrap())
            };
            let _ = called.send(());
            let body = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
            });
            async move { Ok::<_, Infallible>(Response::new(Body::from_stream(body))) }
        });
        let activity = Arc::new(Activity::default());
        let watched = Watched {
            service,
            activity: activity.clone(),
        };
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), watched)
                .await;
        });
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert_eq!(activity.now(), (0, 0));
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        was_called.await.unwrap();
        assert_eq!(activity.now(), (1, 0), "begun with its head");
        chunks.send(Bytes::from_static(b"first")).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&got).contains("first") {
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed early");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(
            activity.now(),
            (1, 0),
            "in flight while its body is being written"
        );
        drop(chunks);
        while !got.ends_with(b"0\r\n\r\n") {
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed early");
            got.extend_from_slice(&buf[..n]);
        }
        let ended = async {
            while activity.now() != (1, 1) {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), ended)
            .await
            .expect("the request ended once its body was written");
        server.abort();
    }
}
