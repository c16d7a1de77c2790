//! A scripted HTTP/1.1 server that can answer with server-sent event
//! streams: events sent one chunk at a time, pauses, a reset or a clean
//! end in the middle of the stream, and ordinary replies in the same
//! script.
//!
//! Each request is served on its own connection (`Connection: close`), so
//! a reset in the script hits exactly the request it was meant for.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use super::http::{RecordedRequest, Reply, RequestReader, Script, answer, close_gracefully, reset};
use super::{TaskGuard, accept_connections};

/// One step of a streamed reply.
#[derive(Debug, Clone)]
pub enum Step {
    /// Send these bytes as one chunk.
    Send(String),
    /// Real-time pause.
    Delay(Duration),
    /// Pause until the test calls `notify_one` on this handle (a stored
    /// permit counts: the test may notify before the server gets here).
    Wait(Arc<Notify>),
    /// Reset the connection (RST) mid-stream.
    Reset,
    /// End the stream cleanly (the terminating chunk, then FIN).
    End,
}

/// A `200 OK` `text/event-stream` reply, sent with chunked encoding.
#[derive(Debug, Clone)]
pub struct SseReply {
    /// The status.
    pub status: u16,
    /// The steps, in order; a script that does not end with
    /// [`Step::Reset`] or [`Step::End`] ends cleanly.
    pub steps: Vec<Step>,
}

impl Default for SseReply {
    fn default() -> Self {
        SseReply::new()
    }
}

impl SseReply {
    /// An empty stream.
    pub fn new() -> Self {
        SseReply {
            status: 200,
            steps: Vec::new(),
        }
    }

    /// Sends `data: <data>\n\n` as one chunk.
    pub fn event(self, data: &str) -> Self {
        self.raw(&format!("data: {data}\n\n"))
    }

    /// Sends raw bytes as one chunk.
    pub fn raw(mut self, bytes: &str) -> Self {
        self.steps.push(Step::Send(bytes.to_owned()));
        self
    }

    /// Pauses (real time).
    pub fn delay(mut self, d: Duration) -> Self {
        self.steps.push(Step::Delay(d));
        self
    }

    /// Pauses until `notify` is notified.
    pub fn wait(mut self, notify: Arc<Notify>) -> Self {
        self.steps.push(Step::Wait(notify));
        self
    }

    /// Resets the connection here.
    pub fn reset(mut self) -> Self {
        self.steps.push(Step::Reset);
        self
    }

    /// Every data payload of `events`, rendered as the stream sends them.
    pub fn render_events(events: &[&str]) -> String {
        events.iter().map(|e| format!("data: {e}\n\n")).collect()
    }
}

/// One entry of an [`SseServer`] script.
#[derive(Debug, Clone)]
pub enum Scripted {
    /// An ordinary reply (status, body, delay, reset, close).
    Plain(Reply),
    /// An event stream.
    Stream(SseReply),
}

impl From<Reply> for Scripted {
    fn from(r: Reply) -> Self {
        Scripted::Plain(r)
    }
}

impl From<SseReply> for Scripted {
    fn from(r: SseReply) -> Self {
        Scripted::Stream(r)
    }
}

/// A real server on `127.0.0.1:<ephemeral>` answering from a script of
/// [`Scripted`] entries, one per request; the last entry repeats.
pub struct SseServer {
    addr: SocketAddr,
    script: Arc<Script<Scripted>>,
    // Held for its `Drop`: stops the server.
    #[allow(dead_code)]
    task: TaskGuard,
}

impl SseServer {
    /// Starts the server. Panics if `script` is empty.
    pub async fn start(script: Vec<Scripted>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let script = Arc::new(Script::new(script));
        let shared = script.clone();
        let task = TaskGuard::spawn(accept_connections(
            listener,
            Duration::ZERO,
            move |stream| serve(stream, shared.clone()),
        ));
        SseServer { addr, script, task }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests received so far.
    pub fn hits(&self) -> usize {
        self.script.hits()
    }

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.script.requests()
    }
}

async fn serve(mut stream: TcpStream, script: Arc<Script<Scripted>>) {
    let _ = stream.set_nodelay(true);
    let mut reader = RequestReader::default();
    let Ok(Some(req)) = reader.next(&mut stream).await else {
        return;
    };
    match script.take(req) {
        Scripted::Plain(reply) => {
            answer(stream, &reply, false).await;
        }
        Scripted::Stream(sse) => {
            let head = format!(
                "HTTP/1.1 {} {}\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
                 Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
                sse.status,
                if sse.status == 200 { "OK" } else { "Status" }
            );
            if stream.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            for step in sse.steps {
                match step {
                    Step::Send(bytes) => {
                        let chunk = format!("{:x}\r\n{bytes}\r\n", bytes.len());
                        if stream.write_all(chunk.as_bytes()).await.is_err() {
                            return;
                        }
                        let _ = stream.flush().await;
                    }
                    Step::Delay(d) => tokio::time::sleep(d).await,
                    Step::Wait(notify) => notify.notified().await,
                    Step::Reset => return reset(stream),
                    Step::End => break,
                }
            }
            let _ = stream.write_all(b"0\r\n\r\n").await;
            close_gracefully(stream).await;
        }
    }
}
