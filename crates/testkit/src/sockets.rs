//! Transport-level faults: refused connects, resets, connects that never
//! complete, and a listener that goes away and comes back on its port.

use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

use super::http::{Reply, RequestReader, reset, serve_one};
use super::{TaskGuard, accept_connections};

/// Sockets that hold the ports handed out by [`closed_port`].
static RESERVED_PORTS: Mutex<Vec<Socket>> = Mutex::new(Vec::new());

/// An address on 127.0.0.1 where nothing listens: connecting to it is refused
/// (`io::ErrorKind::ConnectionRefused`).
///
/// Binds a socket to `127.0.0.1:0` and never calls `listen`, so a SYN to it is
/// answered with RST. The bound socket (without `SO_REUSEADDR`) is parked for
/// the rest of the test process: merely binding and dropping would free the
/// port, and a server started concurrently by another test can then be given
/// the very same port (observed with `--test-threads=8`), turning "refused"
/// into a `200 OK`. The cost is one file descriptor per call.
pub fn closed_port() -> SocketAddr {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    socket.bind(&any.into()).expect("bind 127.0.0.1:0");
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    RESERVED_PORTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(socket);
    addr
}

/// When a [`ResetServer`] resets an accepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetMode {
    /// Reset as soon as the connection is accepted, before reading anything.
    OnAccept,
    /// Read the whole HTTP request first, then reset: "the request was
    /// written, then the connection was reset".
    AfterRequest,
}

/// A TCP server that accepts connections and resets them (`SO_LINGER(0)` then
/// close, so the kernel sends RST instead of FIN). Stops when dropped.
pub struct ResetServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    task: TaskGuard,
}

impl ResetServer {
    /// Starts a reset server in `mode`.
    pub async fn start(mode: ResetMode) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (acc, reqs) = (accepted.clone(), requests.clone());
        let task = TaskGuard::spawn(accept_connections(
            listener,
            Duration::ZERO,
            move |stream| {
                acc.fetch_add(1, Ordering::SeqCst);
                reset_after(mode, stream, reqs.clone())
            },
        ));
        ResetServer {
            addr,
            accepted,
            requests,
            task,
        }
    }

    /// The bound socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Number of TCP connections accepted (and reset) so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Number of complete HTTP requests read before a reset
    /// ([`ResetMode::AfterRequest`] only; always 0 for `OnAccept`).
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Stops the server and waits until its listener is closed.
    pub async fn shutdown(mut self) {
        self.task.stop().await;
    }
}

/// Resets `stream` at once or after reading its request (counted in
/// `requests`), as `mode` says.
async fn reset_after(mode: ResetMode, mut stream: TcpStream, requests: Arc<AtomicUsize>) {
    if mode == ResetMode::AfterRequest {
        let mut reader = RequestReader::default();
        if let Ok(Some(_)) = reader.next(&mut stream).await {
            requests.fetch_add(1, Ordering::SeqCst);
        }
    }
    reset(stream);
}

/// A listener whose TCP handshake never completes for new clients.
///
/// Created with socket2 and `listen(1)`; it never calls `accept`, and the
/// handle keeps a few client connections open so the accept queue is full.
/// Linux then drops every new SYN, so a fresh `connect` hangs (the client
/// retransmits its SYN after ~1 s, 3 s, ...) until the client's own connect
/// timeout fires. Dropping the handle closes the listener and the fillers.
pub struct StalledServer {
    addr: SocketAddr,
    // Held for their `Drop`: closing the listener, stopping the acceptor.
    #[allow(dead_code)]
    listener: Option<Socket>,
    fillers: Vec<TcpStream>,
    accepted: Arc<AtomicUsize>,
    #[allow(dead_code)]
    task: Option<TaskGuard>,
}

/// How long one pre-fill connect may take before the queue counts as full.
const FILL_PROBE: Duration = Duration::from_millis(100);
/// Upper bound on connect attempts while filling the accept queue.
const MAX_FILL_ATTEMPTS: usize = 16;

/// Accepts connections (one every `every`, if not zero), counts them in
/// `accepted`, and answers each one's single request with `reply`.
async fn serve_each(
    listener: TcpListener,
    every: Duration,
    reply: Reply,
    accepted: Arc<AtomicUsize>,
) {
    accept_connections(listener, every, move |stream| {
        accepted.fetch_add(1, Ordering::SeqCst);
        serve_one(stream, reply.clone())
    })
    .await
}

fn backlog_one_listener() -> Socket {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    socket.bind(&addr.into()).expect("bind 127.0.0.1:0");
    socket.listen(1).expect("listen(1)");
    socket
}

impl StalledServer {
    /// Starts a stalled listener and fills its accept queue (takes ~100 ms:
    /// the last probe connect has to time out). Panics if the queue never
    /// fills (i.e. connects keep completing).
    pub async fn start() -> Self {
        let listener = backlog_one_listener();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let mut fillers = Vec::new();
        let mut hung = 0;
        for _ in 0..MAX_FILL_ATTEMPTS {
            match tokio::time::timeout(FILL_PROBE, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => fillers.push(stream),
                Ok(Err(e)) => panic!("filler connect to {addr} failed: {e}"),
                // This connect hung (the timed-out socket is dropped here).
                // Linux queues backlog + 1 = 2 handshakes for listen(1), so
                // with fewer fillers the hang may just be a starved CPU: only
                // trust it then if it keeps happening.
                Err(_) => {
                    hung += 1;
                    if fillers.len() >= 2 || hung >= 3 {
                        break;
                    }
                }
            }
        }
        assert!(hung > 0, "accept queue of {addr} never filled");
        StalledServer {
            addr,
            listener: Some(listener),
            fillers,
            accepted: Arc::new(AtomicUsize::new(0)),
            task: None,
        }
    }

    /// A `listen(1)` server that accepts one connection every `every` and
    /// answers each accepted connection's single request with `reply`
    /// (`Connection: close`). The first accept happens `every` after start.
    /// Models a slow VM network stack: clients beyond the tiny accept queue
    /// have their SYN dropped and only get in after a SYN retransmit (~1 s on
    /// Linux) — or hit their connect timeout. Under heavy CPU load a client
    /// may instead complete a SYN-cookie handshake whose final ACK the full
    /// queue then drops: it believes it is connected but is never served.
    pub async fn slow_accept(every: Duration, reply: Reply) -> Self {
        let socket = backlog_one_listener();
        let addr = socket.local_addr().unwrap().as_socket().unwrap();
        socket.set_nonblocking(true).expect("set_nonblocking");
        let listener = TcpListener::from_std(StdTcpListener::from(socket)).expect("from_std");
        let accepted = Arc::new(AtomicUsize::new(0));
        let task = TaskGuard::spawn(serve_each(listener, every, reply, accepted.clone()));
        StalledServer {
            addr,
            listener: None,
            fillers: Vec::new(),
            accepted,
            task: Some(task),
        }
    }

    /// The bound socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Number of filler connections holding the accept queue full (0 for
    /// [`StalledServer::slow_accept`]).
    pub fn fillers(&self) -> usize {
        self.fillers.len()
    }

    /// Connections accepted so far ([`StalledServer::slow_accept`] only).
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// An HTTP server whose listener can be closed and reopened **on the same
/// port**: an upstream process that restarts, or a VM that drops off the
/// network and comes back. While closed, connecting is refused
/// (`io::ErrorKind::ConnectionRefused`), exactly as with [`closed_port`];
/// while open, every request on a fresh connection gets `reply`
/// (`Connection: close`). Starts open. Stops when dropped.
///
/// The port stays reserved while closed: the listener is replaced by a
/// socket bound to the same address that never listens (so a bind to port
/// 0 is not given the port meanwhile), and reopening calls `listen` on it.
/// Both use `SO_REUSEADDR`, so the server's own connections in `TIME_WAIT`
/// do not block the rebind.
pub struct ReopeningServer {
    addr: SocketAddr,
    reply: Reply,
    accepted: Arc<AtomicUsize>,
    /// The accept loop while open (it owns the listener).
    task: Option<TaskGuard>,
    /// The port while closed: bound, not listening.
    parked: Option<Socket>,
}

fn reusable_socket(addr: SocketAddr) -> Socket {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    socket
        .bind(&addr.into())
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    socket
}

impl ReopeningServer {
    /// Starts an open server on `127.0.0.1:<ephemeral>`.
    pub async fn start(reply: Reply) -> Self {
        let socket = reusable_socket("127.0.0.1:0".parse().unwrap());
        let addr = socket.local_addr().unwrap().as_socket().unwrap();
        let mut server = ReopeningServer {
            addr,
            reply,
            accepted: Arc::new(AtomicUsize::new(0)),
            task: None,
            parked: Some(socket),
        };
        server.reopen();
        server
    }

    /// Closes the listener (and the connections it accepted) and waits
    /// until it is closed: from then on a connect is refused. The port
    /// stays reserved. No-op when already closed.
    pub async fn close(&mut self) {
        if let Some(mut task) = self.task.take() {
            task.stop().await;
            self.parked = Some(reusable_socket(self.addr));
        }
    }

    /// Listens again on the same port. No-op when already open.
    pub fn reopen(&mut self) {
        let Some(socket) = self.parked.take() else {
            return;
        };
        socket.listen(128).expect("listen");
        socket.set_nonblocking(true).expect("set_nonblocking");
        let listener = TcpListener::from_std(StdTcpListener::from(socket)).expect("from_std");
        self.task = Some(TaskGuard::spawn(serve_each(
            listener,
            Duration::ZERO,
            self.reply.clone(),
            self.accepted.clone(),
        )));
    }

    /// Whether the listener is open.
    pub fn is_open(&self) -> bool {
        self.task.is_some()
    }

    /// The bound socket address (the same while closed and reopened).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far, across reopenings.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}
