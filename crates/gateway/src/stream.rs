//! Server-sent events: the first event decides, the rest is relayed.
//!
//! A streaming completion can fail in two places, and they are not alike:
//!
//! * **Before the first event.** Many servers answer `200 OK` at once and
//!   report a failure (an overloaded engine, a lost worker) as the first
//!   event: `data: {"error": {...}}`. Nothing has reached the client yet,
//!   so the attempt reads that first event before it returns to the pool,
//!   and an error event is classified (its status, else its text) and
//!   retried like any other upstream error. Comment lines (`: keep-alive`)
//!   sent before it do not count as the first event: they carry nothing a
//!   client needs, so committing to the stream on them would forfeit a
//!   retry for nothing.
//! * **After it.** Once the first event is relayed, the client has tokens
//!   it may already have shown to a user. A retry would generate a
//!   different completion and the client would receive two answers spliced
//!   together, so the gateway never retries past the first byte. A failure
//!   mid-stream (reset, timeout, the request's deadline) ends the client's
//!   stream cleanly: when the relayed bytes end on an event boundary, one
//!   last `data: {"error": ...}` event says why (clients that stop at
//!   `[DONE]` would otherwise take a truncated answer for a complete one);
//!   then the body ends normally, without a transport error. A partial
//!   event is left unterminated: SSE parsers drop an incomplete event at
//!   the end of the stream, while closing it would deliver corrupt JSON.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use http::StatusCode;
use http::header::{CONTENT_TYPE, HeaderMap};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::attempt::{AttemptFailure, Upstreamed, next_chunk};
use super::redact::Redactor;

/// The most bytes read while waiting for the first event (comments
/// before it included).
pub(crate) const FIRST_EVENT_LIMIT: usize = 1 << 20;

/// Whether the upstream answered with an event stream (a server that
/// ignores `"stream": true` answers with JSON, which is relayed whole).
pub(crate) fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"))
        })
}

/// One dispatched event: its type and its data lines joined by `\n`.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Event {
    pub(crate) kind: String,
    pub(crate) data: String,
}

/// Splits a growing buffer into events, incrementally.
#[derive(Debug, Default)]
pub(crate) struct EventScanner {
    /// Start of the first line not yet processed.
    pos: usize,
    /// The event being accumulated.
    current: Event,
    /// Whether it has a `data` or `event` field (comments, `id` and
    /// `retry` alone do not make an event worth committing to).
    has_fields: bool,
}

impl EventScanner {
    /// The first complete event with fields in `buf`, scanning on from
    /// where the last call stopped; `None` when more bytes are needed.
    pub(crate) fn next_event(&mut self, buf: &[u8]) -> Option<Event> {
        loop {
            let rest = buf.get(self.pos..)?;
            let i = rest.iter().position(|&b| b == b'\n' || b == b'\r')?;
            let mut next = self.pos + i + 1;
            if rest[i] == b'\r' {
                // `\r\n` is one line end; a `\r` at the end of the buffer
                // may be the first half of one.
                match rest.get(i + 1) {
                    None => return None,
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                }
            }
            let line = &rest[..i];
            self.pos = next;
            if line.is_empty() {
                if std::mem::take(&mut self.has_fields) {
                    let mut event = std::mem::take(&mut self.current);
                    if event.data.ends_with('\n') {
                        event.data.pop();
                    }
                    return Some(event);
                }
                self.current = Event::default();
                continue;
            }
            self.field(line);
        }
    }

    fn field(&mut self, line: &[u8]) {
        if line.first() == Some(&b':') {
            return;
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(c) => {
                let value = &line[c + 1..];
                (&line[..c], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        let value = String::from_utf8_lossy(value);
        match name {
            b"data" => {
                self.current.data.push_str(&value);
                self.current.data.push('\n');
                self.has_fields = true;
            }
            b"event" => {
                self.current.kind = value.into_owned();
                self.has_fields = true;
            }
            _ => {}
        }
    }
}

impl Event {
    /// If this event reports an error: the status it carries, if any.
    /// An error is an `event: error`, or data that is a JSON object with a
    /// non-null `error` member.
    pub(crate) fn error(&self) -> Option<Option<StatusCode>> {
        let json: Option<serde_json::Value> = serde_json::from_str(self.data.trim()).ok();
        let error = json
            .as_ref()
            .and_then(|v| v.get("error"))
            .filter(|e| !e.is_null());
        if self.kind != "error" && error.is_none() {
            return None;
        }
        // OpenAI-style servers put an HTTP-like code in `error.code`;
        // others in `error.status` or at the top level.
        let candidates = [
            error.and_then(|e| e.get("code")),
            error.and_then(|e| e.get("status")),
            json.as_ref().and_then(|v| v.get("status")),
            json.as_ref().and_then(|v| v.get("code")),
        ];
        let status = candidates.into_iter().flatten().find_map(|v| {
            let n = v
                .as_u64()
                .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))?;
            let n = u16::try_from(n).ok().filter(|n| (400..=599).contains(n))?;
            StatusCode::from_u16(n).ok()
        });
        Some(status)
    }
}

/// Reads the stream up to its first event. An error event, an early end
/// or an oversized head is an attempt failure (retryable: nothing reached
/// the client); otherwise the bytes read and the rest of the stream.
pub(crate) async fn first_event(
    response: http::Response<Incoming>,
    redactor: &Redactor,
) -> Result<Upstreamed, AttemptFailure> {
    let (mut parts, mut body) = response.into_parts();
    let status = parts.status;
    let content_type = parts.headers.remove(CONTENT_TYPE);
    let mut buf: Vec<u8> = Vec::new();
    let mut scanner = EventScanner::default();
    loop {
        let Some(chunk) = next_chunk(&mut body)
            .await
            .map_err(AttemptFailure::body_error)?
        else {
            return Err(AttemptFailure::StreamEnded);
        };
        buf.extend_from_slice(&chunk);
        if let Some(event) = scanner.next_event(&buf) {
            if let Some(status) = event.error() {
                return Err(AttemptFailure::error_event(status, &event.data, redactor));
            }
            return Ok(Upstreamed::Stream {
                status,
                content_type,
                head: Bytes::from(buf),
                rest: body,
            });
        }
        if buf.len() > FIRST_EVENT_LIMIT {
            return Err(AttemptFailure::TooLarge {
                limit: FIRST_EVENT_LIMIT,
            });
        }
    }
}

/// Whether `tail` (the last bytes relayed) ends on an event boundary: a
/// line end right after another line end.
fn at_boundary(tail: &[u8]) -> bool {
    let t = if let Some(t) = tail.strip_suffix(b"\r\n") {
        t
    } else if let Some(t) = tail.strip_suffix(b"\n") {
        t
    } else if let Some(t) = tail.strip_suffix(b"\r") {
        t
    } else {
        return false;
    };
    t.is_empty() || t.ends_with(b"\n") || t.ends_with(b"\r")
}

/// Where a relayed stream stands.
enum Relay {
    Head(Bytes),
    Body,
    Done,
}

/// What the relay reports when the stream ends early.
pub(crate) struct StreamContext {
    pub(crate) model: String,
    pub(crate) provider: &'static str,
    pub(crate) redactor: std::sync::Arc<Redactor>,
}

/// The state of one relayed stream.
struct RelayState {
    relay: Relay,
    rest: Incoming,
    /// The last (up to 4) bytes relayed.
    tail: Vec<u8>,
    sent: u64,
    deadline: Instant,
    context: StreamContext,
}

type RelayItem = Option<(Result<Bytes, Infallible>, RelayState)>;

impl RelayState {
    fn pass(mut self, chunk: Bytes) -> RelayItem {
        self.sent += chunk.len() as u64;
        self.tail
            .extend_from_slice(&chunk[chunk.len().saturating_sub(4)..]);
        let excess = self.tail.len().saturating_sub(4);
        self.tail.drain(..excess);
        Some((Ok(chunk), self))
    }

    /// Ends the stream after a failure: one error event when the client
    /// is on an event boundary, then a clean end.
    fn fail(mut self, code: &'static str, cause: &str) -> RelayItem {
        self.relay = Relay::Done;
        let cause = self.context.redactor.redact(cause);
        tracing::warn!(
            target: "retryctl::gateway",
            model = %self.context.model,
            provider = self.context.provider,
            bytes = self.sent,
            code,
            error = %cause,
            "stream ended early; not retried after the first byte"
        );
        if !at_boundary(&self.tail) {
            return None;
        }
        let event = serde_json::json!({"error": {
            "message": format!(
                "the upstream stream failed after it started and cannot be retried: {cause}"
            ),
            "type": "upstream_error",
            "code": code,
        }});
        Some((Ok(Bytes::from(format!("data: {event}\n\n"))), self))
    }
}

/// The client's body: the head, then the rest of the upstream stream
/// until it ends, fails or `deadline` passes; never a transport error.
pub(crate) fn relay(
    head: Bytes,
    rest: Incoming,
    deadline: Instant,
    context: StreamContext,
) -> Body {
    let state = RelayState {
        relay: Relay::Head(head),
        rest,
        tail: Vec::with_capacity(8),
        sent: 0,
        deadline,
        context,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        match std::mem::replace(&mut s.relay, Relay::Body) {
            Relay::Done => None,
            Relay::Head(head) => s.pass(head),
            Relay::Body => match tokio::time::timeout_at(s.deadline, next_chunk(&mut s.rest)).await
            {
                Ok(Ok(Some(chunk))) => s.pass(chunk),
                Ok(Ok(None)) => None,
                Ok(Err(e)) => {
                    let cause = AttemptFailure::body_error(e).to_string();
                    s.fail("stream_interrupted", &cause)
                }
                Err(_) => s.fail("request_timeout", "the request's time limit passed"),
            },
        }
    });
    Body::from_stream(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(input: &[&[u8]]) -> Vec<Event> {
        let mut scanner = EventScanner::default();
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for part in input {
            buf.extend_from_slice(part);
            while let Some(e) = scanner.next_event(&buf) {
                out.push(e);
            }
        }
        out
    }

    #[test]
    fn events_split_on_blank_lines_with_any_line_end() {
        let got = events(&[
            b"data: a\n\ndata: b\r\ndata: c\r",
            b"\n\r\nevent: x\rdata:d\r\r\n",
        ]);
        assert_eq!(
            got,
            vec![
                Event {
                    kind: String::new(),
                    data: "a".into()
                },
                Event {
                    kind: String::new(),
                    data: "b\nc".into()
                },
                Event {
                    kind: "x".into(),
                    data: "d".into()
                },
            ]
        );
        // split anywhere, even between \r and \n
        let got = events(&[b"da", b"ta: {\"x\"", b":1}\r", b"\n", b"\r", b"\n"]);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].data, "{\"x\":1}");
        // incomplete event: nothing yet
        assert!(events(&[b"data: partial\n"]).is_empty());
    }

    #[test]
    fn comments_and_ids_alone_are_not_events() {
        let got = events(&[b": keep-alive\n\nid: 7\nretry: 100\n\ndata: real\n\n"]);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].data, "real");
    }

    #[test]
    fn error_events() {
        let ev = |kind: &str, data: &str| Event {
            kind: kind.into(),
            data: data.into(),
        };
        let code = |e: Event| e.error().map(|s| s.map(|s| s.as_u16()));
        assert_eq!(code(ev("", r#"{"choices":[]}"#)), None);
        assert_eq!(code(ev("", "[DONE]")), None);
        assert_eq!(code(ev("", r#"{"error":null}"#)), None);
        assert_eq!(
            code(ev("", r#"{"error":{"message":"x","code":503}}"#)),
            Some(Some(503))
        );
        assert_eq!(code(ev("", r#"{"error":{"code":"429"}}"#)), Some(Some(429)));
        assert_eq!(
            code(ev("", r#"{"error":"boom","status":500}"#)),
            Some(Some(500))
        );
        assert_eq!(
            code(ev("", r#"{"error":{"code":"rate_limit_exceeded"}}"#)),
            Some(None)
        );
        assert_eq!(code(ev("", r#"{"error":{"code":20001}}"#)), Some(None));
        assert_eq!(code(ev("error", "overloaded")), Some(None));
    }

    #[test]
    fn boundaries() {
        assert!(at_boundary(b"x\n\n"));
        assert!(at_boundary(b"x\r\n\r\n"));
        assert!(at_boundary(b"\r\r"));
        assert!(at_boundary(b"\n"));
        assert!(!at_boundary(b"data: x\n"));
        assert!(!at_boundary(b"data: x"));
        assert!(!at_boundary(b""));
    }
}
