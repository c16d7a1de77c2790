//! Faulty upstreams on real loopback sockets.
//!
//! A [`FaultServer`] is a minimal HTTP/1.1 server that follows a
//! [`Schedule`]. Its listener always has a backlog of 1. In a *backlog*
//! window it accepts one connection every [`SLOW_ACCEPT`], so a burst of new
//! connections overflows the accept queue and the kernel drops their SYNs:
//! the client sees a connect that never completes. In a *reload* window it
//! either closes its listener (connections refused) or accepts and resets
//! them (`SO_LINGER` 0). In a *restart* window the port is closed. Outside
//! the windows it answers each request per the schedule's noise (502, 503
//! with or without Retry-After, 400, slow) and closes the connection, so
//! every request opens a new connection, as in the production incident.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::schedule::{FaultKind, Noise, Schedule};

/// The header carrying the demo's request id.
pub const REQUEST_HEADER: &str = "x-demo-request";
/// The header carrying the attempt number (1-based).
pub const ATTEMPT_HEADER: &str = "x-demo-attempt";
/// Accept interval in a backlog window.
pub const SLOW_ACCEPT: Duration = Duration::from_millis(40);

/// What a fault server did, counted.
#[derive(Debug, Default)]
pub struct ServerCounters {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections reset on purpose.
    pub reset: AtomicU64,
    /// Requests answered (any status).
    pub answered: AtomicU64,
}

/// A running faulty upstream. Dropping it stops it.
#[derive(Debug)]
pub struct FaultServer {
    addr: SocketAddr,
    counters: Arc<ServerCounters>,
    task: JoinHandle<()>,
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1)?;
    TcpListener::from_std(socket.into())
}

fn reset(stream: TcpStream) {
    // SO_LINGER 0: close sends RST instead of FIN.
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

impl FaultServer {
    /// Starts a server on 127.0.0.1 (an ephemeral port) whose schedule
    /// starts at `epoch`.
    pub async fn start(schedule: Arc<Schedule>, epoch: Instant) -> io::Result<FaultServer> {
        let first = listen(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let addr = first.local_addr()?;
        let counters = Arc::new(ServerCounters::default());
        let task = tokio::spawn(run(first, addr, schedule, epoch, counters.clone()));
        Ok(FaultServer {
            addr,
            counters,
            task,
        })
    }

    /// The address it serves on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What it did so far.
    pub fn counters(&self) -> &ServerCounters {
        &self.counters
    }
}

async fn run(
    first: TcpListener,
    addr: SocketAddr,
    schedule: Arc<Schedule>,
    epoch: Instant,
    counters: Arc<ServerCounters>,
) {
    let mut listener = Some(first);
    loop {
        let now = Instant::now();
        let t = now.saturating_duration_since(epoch);
        let window = if now < epoch {
            None
        } else {
            schedule.window_at(t).copied()
        };
        let closed = window.is_some_and(|w| {
            w.kind == FaultKind::Restart || (w.kind == FaultKind::Reload && !w.reset)
        });
        if closed {
            // Closing the listener refuses new connections (and resets the
            // ones waiting in its queue).
            listener = None;
            let end = window.map_or(t, |w| w.end);
            tokio::time::sleep_until(epoch + end).await;
            continue;
        }
        let l = match &listener {
            Some(l) => l,
            None => match listen(addr) {
                Ok(l) => listener.insert(l),
                Err(_) => {
                    // The port is briefly unavailable: try again shortly.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            },
        };
        let edge = if now < epoch {
            Some(Duration::ZERO)
        } else {
            schedule.next_edge(t)
        };
        let accepted = match edge {
            Some(edge) => tokio::select! {
                r = l.accept() => r,
                _ = tokio::time::sleep_until(epoch + edge) => continue,
            },
            None => l.accept().await,
        };
        let Ok((stream, _)) = accepted else { continue };
        counters.accepted.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let window = (now >= epoch)
            .then(|| schedule.window_at(now - epoch).copied())
            .flatten();
        match window {
            Some(w) if w.kind == FaultKind::Reload && w.reset => {
                counters.reset.fetch_add(1, Ordering::Relaxed);
                reset(stream);
            }
            Some(w) if w.kind == FaultKind::Backlog => {
                tokio::spawn(answer(stream, schedule.clone(), counters.clone()));
                // The slow accept loop: the queue (one connection) overflows.
                tokio::time::sleep(SLOW_ACCEPT).await;
            }
            _ => {
                tokio::spawn(answer(stream, schedule.clone(), counters.clone()));
            }
        }
    }
}

/// Reads one request head (and its small body) and answers per the noise.
async fn answer(mut stream: TcpStream, schedule: Arc<Schedule>, counters: Arc<ServerCounters>) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 16 * 1024 {
            return;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let header = |name: &str| -> Option<u64> {
        head.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
    };
    let length = header("content-length").unwrap_or(0) as usize;
    while buf.len() < head_end + length.min(1 << 20) {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let request = header(REQUEST_HEADER).unwrap_or(0);
    let attempt = header(ATTEMPT_HEADER).unwrap_or(1) as u32;
    let (status, extra, body) = match schedule.noise(request, attempt) {
        Noise::None => (200, "", r#"{"choices":[{"message":{"content":"ok"}}]}"#),
        Noise::Slow(d) => {
            tokio::time::sleep(d).await;
            (200, "", r#"{"choices":[{"message":{"content":"slow"}}]}"#)
        }
        Noise::Status(502, _) => (502, "", r#"{"error":"bad gateway"}"#),
        Noise::Status(code, Some(_)) => (code, "retry-after: 1\r\n", r#"{"error":"overloaded"}"#),
        Noise::Status(code, None) => (code, "", r#"{"error":"unavailable"}"#),
        Noise::ClientError => (400, "", r#"{"error":{"message":"messages: invalid"}}"#),
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        502 => "Bad Gateway",
        _ => "Service Unavailable",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}connection: close\r\n\r\n{body}",
        body.len()
    );
    if stream.write_all(response.as_bytes()).await.is_ok() {
        counters.answered.fetch_add(1, Ordering::Relaxed);
    }
    let _ = stream.shutdown().await;
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
