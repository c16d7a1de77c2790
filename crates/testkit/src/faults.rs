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

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::http::{self, Answered, Reply, RequestReader, reset};
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

/// Reads one request and answers per the noise, then closes the
/// connection.
async fn answer(mut stream: TcpStream, schedule: Arc<Schedule>, counters: Arc<ServerCounters>) {
    let mut reader = RequestReader::default();
    let Ok(Some(req)) = reader.next(&mut stream).await else {
        return;
    };
    let header = |name: &str| req.header(name).and_then(|v| v.parse::<u64>().ok());
    let request = header(REQUEST_HEADER).unwrap_or(0);
    let attempt = header(ATTEMPT_HEADER).unwrap_or(1) as u32;
    let reply = match schedule.noise(request, attempt) {
        Noise::None => Reply::json(r#"{"choices":[{"message":{"content":"ok"}}]}"#),
        Noise::Slow(d) => Reply::json(r#"{"choices":[{"message":{"content":"slow"}}]}"#).delay(d),
        Noise::Status(502, _) => error(502, r#"{"error":"bad gateway"}"#),
        Noise::Status(code, Some(_)) => {
            error(code, r#"{"error":"overloaded"}"#).header("retry-after", "1")
        }
        Noise::Status(code, None) => error(code, r#"{"error":"unavailable"}"#),
        Noise::ClientError => error(400, r#"{"error":{"message":"messages: invalid"}}"#),
    };
    if let Answered::Responded = http::answer(stream, &reply, false).await {
        counters.answered.fetch_add(1, Ordering::Relaxed);
    }
}

/// A JSON error answer.
fn error(status: u16, body: &str) -> Reply {
    Reply::status(status)
        .header("content-type", "application/json")
        .body(body)
}
