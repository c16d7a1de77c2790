//! A scripted HTTP/1.1 server, hand-rolled on `tokio::net::TcpStream` so that
//! every reply can be delayed, reset or cut off exactly where a test wants.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{TaskGuard, accept_connections};

/// Largest request head (request line + headers) the server will buffer.
const MAX_HEAD: usize = 64 * 1024;

/// What the server does with a request once it has read it (and waited out
/// the reply's delay).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyAction {
    /// Send the status line, headers and body.
    Respond,
    /// Reset the connection (`SO_LINGER(0)` then close => RST) without
    /// responding: "the request was written, then the connection was reset".
    Reset,
    /// Close the connection gracefully (FIN) without sending any byte of a
    /// response.
    Close,
}

/// One scripted answer of an [`HttpServer`].
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status code sent on the status line.
    pub status: u16,
    /// Extra headers, sent in order after the status line.
    pub headers: Vec<(String, String)>,
    /// Response body; `Content-Length` is always set from it.
    pub body: String,
    /// Real `tokio::time::sleep` before the action (respond, reset or close).
    pub delay: Duration,
    /// What to do with the request.
    pub action: ReplyAction,
}

impl Reply {
    /// `200 OK` with `body` as `text/plain`.
    pub fn ok(body: impl Into<String>) -> Self {
        Reply::status(200).body(body)
    }

    /// `200 OK` with `body` sent as `application/json`.
    pub fn json(body: impl Into<String>) -> Self {
        Reply::ok(body).header("Content-Type", "application/json")
    }

    /// A response with status `code` and an empty body.
    pub fn status(code: u16) -> Self {
        Reply {
            status: code,
            headers: Vec::new(),
            body: String::new(),
            delay: Duration::ZERO,
            action: ReplyAction::Respond,
        }
    }

    /// Read the request, then reset the connection instead of responding.
    pub fn reset() -> Self {
        Reply {
            action: ReplyAction::Reset,
            ..Reply::status(0)
        }
    }

    /// Read the request, then close the connection (FIN) without responding.
    pub fn close() -> Self {
        Reply {
            action: ReplyAction::Close,
            ..Reply::status(0)
        }
    }

    /// Adds a response header (e.g. `("Retry-After", "2")`).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Replaces the body.
    pub fn body(mut self, body: impl Into<String>) -> Self {
        self.body = body.into();
        self
    }

    /// Waits `d` (real time) after reading the request before acting.
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
}

/// A request as the server received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// Request method, e.g. `POST`.
    pub method: String,
    /// Request target, e.g. `/v1/chat`.
    pub path: String,
    /// Headers in arrival order, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Decoded body (`Content-Length` or chunked).
    pub body: Vec<u8>,
}

impl RecordedRequest {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Incremental HTTP/1.1 request parser over one connection; keeps bytes that
/// arrived past the end of one request for the next.
#[derive(Default)]
pub struct RequestReader {
    buf: Vec<u8>,
}

impl RequestReader {
    /// Reads one full request (head and body). `Ok(None)` on a clean EOF
    /// before any byte of a new request.
    pub async fn next(
        &mut self,
        stream: &mut TcpStream,
    ) -> std::io::Result<Option<RecordedRequest>> {
        let head_end = loop {
            if let Some(pos) = find(&self.buf, b"\r\n\r\n") {
                break pos + 4;
            }
            if self.buf.len() > MAX_HEAD {
                return Err(invalid("request head too large"));
            }
            if !self.fill(stream).await? {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(std::io::ErrorKind::UnexpectedEof.into())
                };
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        self.buf.drain(..head_end);

        let mut lines = head.split("\r\n");
        let mut request_line = lines.next().unwrap_or_default().split(' ');
        let method = request_line.next().unwrap_or_default().to_string();
        let path = request_line.next().unwrap_or_default().to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let mut req = RecordedRequest {
            method,
            path,
            headers,
            body: Vec::new(),
        };

        let chunked = req
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        if chunked {
            req.body = self.read_chunked(stream).await?;
        } else if let Some(len) = req.header("content-length") {
            let len: usize = len.parse().map_err(|_| invalid("bad content-length"))?;
            self.fill_to(stream, len).await?;
            req.body = self.buf.drain(..len).collect();
        }
        Ok(Some(req))
    }

    async fn read_chunked(&mut self, stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line_end = self.line(stream).await?;
            let size_line = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            self.buf.drain(..line_end + 2);
            let size_hex = size_line.split(';').next().unwrap_or_default().trim();
            let size =
                usize::from_str_radix(size_hex, 16).map_err(|_| invalid("bad chunk size"))?;
            if size == 0 {
                // Trailers until an empty line.
                loop {
                    let end = self.line(stream).await?;
                    self.buf.drain(..end + 2);
                    if end == 0 {
                        return Ok(body);
                    }
                }
            }
            self.fill_to(stream, size + 2).await?;
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
        }
    }

    /// Position of the next `\r\n` in the buffer, reading more as needed.
    async fn line(&mut self, stream: &mut TcpStream) -> std::io::Result<usize> {
        loop {
            if let Some(pos) = find(&self.buf, b"\r\n") {
                return Ok(pos);
            }
            if !self.fill(stream).await? {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    async fn fill_to(&mut self, stream: &mut TcpStream, n: usize) -> std::io::Result<()> {
        while self.buf.len() < n {
            if !self.fill(stream).await? {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }

    /// Reads once; `false` on EOF.
    async fn fill(&mut self, stream: &mut TcpStream) -> std::io::Result<bool> {
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn invalid(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string())
}

/// Resets `stream`: `SO_LINGER(0)` then drop makes the kernel send RST.
pub fn reset(stream: TcpStream) {
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Half-closes our side (FIN), then waits (bounded) for the peer to close so
/// that no unread data turns our close into an RST.
pub(crate) async fn close_gracefully(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        529 => "Site Overloaded",
        _ => "Status",
    }
}

/// Renders a full HTTP/1.1 response for `reply`.
pub(crate) fn render(reply: &Reply, connection_close: bool) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {} {}\r\n", reply.status, reason(reply.status));
    let has = |name: &str| {
        reply
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case(name))
    };
    if !has("content-type") {
        out.push_str("Content-Type: text/plain; charset=utf-8\r\n");
    }
    for (k, v) in &reply.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\n", reply.body.len()));
    if connection_close {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(reply.body.as_bytes());
    bytes
}

/// A server's script and what it received: the n-th request gets entry
/// n, and every request past the end gets the last entry.
pub(crate) struct Script<T> {
    entries: Vec<T>,
    hits: AtomicUsize,
    requests: Mutex<Vec<RecordedRequest>>,
}

impl<T: Clone> Script<T> {
    /// Panics if `entries` is empty.
    pub(crate) fn new(entries: Vec<T>) -> Self {
        assert!(!entries.is_empty(), "a server's script must not be empty");
        Script {
            entries,
            hits: AtomicUsize::new(0),
            requests: Mutex::new(Vec::new()),
        }
    }

    /// Records `req` and picks its entry.
    pub(crate) fn take(&self, req: RecordedRequest) -> T {
        self.requests.lock().unwrap().push(req);
        let n = self.hits.fetch_add(1, Ordering::SeqCst);
        self.entries[n.min(self.entries.len() - 1)].clone()
    }

    /// Requests received so far.
    pub(crate) fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Every request received, in order.
    pub(crate) fn requests(&self) -> Vec<RecordedRequest> {
        self.requests.lock().unwrap().clone()
    }
}

/// Shared state of an [`HttpServer`].
struct State {
    script: Script<Reply>,
    connections: AtomicUsize,
    connection_close: bool,
}

/// A real HTTP/1.1 server on `127.0.0.1:<ephemeral>` that answers requests
/// from a script.
///
/// The script is a list of [`Reply`] consumed in order, one per request
/// received (across all connections); once exhausted, the **last entry is
/// repeated** for every further request.
///
/// By default every response carries `Connection: close` and the server closes
/// the connection after it. That way each request uses a fresh connection and a
/// client never reuses a pooled connection that the server is closing at the
/// same moment (a race that turns into spurious, flaky errors), and a
/// reset/close in the script only ever hits the one request it was meant for.
/// [`HttpServer::keep_alive`] serves several requests per connection instead.
///
/// Dropping the handle stops the server and closes all its connections.
pub struct HttpServer {
    addr: SocketAddr,
    state: Arc<State>,
    task: TaskGuard,
}

impl HttpServer {
    /// Starts a server that sends `Connection: close` on every response.
    /// Panics if `script` is empty.
    pub async fn start(script: Vec<Reply>) -> Self {
        Self::start_with(script, true).await
    }

    /// Starts a server that keeps connections open between requests (no
    /// `Connection: close`); a `Reset`/`Close` reply still ends its connection.
    pub async fn keep_alive(script: Vec<Reply>) -> Self {
        Self::start_with(script, false).await
    }

    /// A server that answers every request with `reply`.
    pub async fn always(reply: Reply) -> Self {
        Self::start(vec![reply]).await
    }

    async fn start_with(script: Vec<Reply>, connection_close: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let state = Arc::new(State {
            script: Script::new(script),
            connections: AtomicUsize::new(0),
            connection_close,
        });
        let shared = state.clone();
        let task = TaskGuard::spawn(accept_connections(
            listener,
            Duration::ZERO,
            move |stream| {
                shared.connections.fetch_add(1, Ordering::SeqCst);
                serve(stream, shared.clone())
            },
        ));
        HttpServer { addr, state, task }
    }

    /// The bound socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `url()` joined with `path` (which should start with `/`).
    pub fn url_for(&self, path: &str) -> String {
        format!("{}{}", self.url(), path)
    }

    /// Number of complete requests received so far (including those answered
    /// with a reset or close).
    pub fn hits(&self) -> usize {
        self.state.script.hits()
    }

    /// Number of TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.script.requests()
    }

    /// Stops the server and waits until its listener and connections are closed.
    pub async fn shutdown(mut self) {
        self.task.stop().await;
    }
}

async fn serve(mut stream: TcpStream, state: Arc<State>) {
    let _ = stream.set_nodelay(true);
    let mut reader = RequestReader::default();
    loop {
        let req = match reader.next(&mut stream).await {
            Ok(Some(req)) => req,
            Ok(None) | Err(_) => return,
        };
        let reply = state.script.take(req);
        match answer(stream, &reply, !state.connection_close).await {
            Answered::Open(open) => stream = open,
            Answered::Responded | Answered::Ended => return,
        }
    }
}

/// What became of a connection once [`answer`] acted on a reply.
pub(crate) enum Answered {
    /// Responded, and the connection stays open for the next request.
    Open(TcpStream),
    /// Responded, then closed the connection.
    Responded,
    /// Reset or closed without a response, or the response could not be
    /// written.
    Ended,
}

/// Acts on `reply` for a request already read from `stream`: waits out
/// its delay, then resets, closes, or writes the response (with
/// `Connection: close` and a graceful close unless `keep_alive`).
pub(crate) async fn answer(mut stream: TcpStream, reply: &Reply, keep_alive: bool) -> Answered {
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    match reply.action {
        ReplyAction::Reset => reset(stream),
        ReplyAction::Close => close_gracefully(stream).await,
        ReplyAction::Respond => {
            if stream.write_all(&render(reply, !keep_alive)).await.is_err() {
                return Answered::Ended;
            }
            if keep_alive {
                return Answered::Open(stream);
            }
            close_gracefully(stream).await;
            return Answered::Responded;
        }
    }
    Answered::Ended
}

/// Serves a single request on `stream` with `reply` and `Connection: close`;
/// used by servers that hand out one canned answer per connection.
pub(crate) async fn serve_one(mut stream: TcpStream, reply: Reply) {
    let mut reader = RequestReader::default();
    if matches!(reader.next(&mut stream).await, Ok(Some(_))) {
        answer(stream, &reply, false).await;
    }
}
