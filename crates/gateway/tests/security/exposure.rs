//! Where the gateway listens, and what one client can hold.
//!
//! The gateway and `/metrics` bind loopback unless configured otherwise.
//! A client cannot make the gateway buffer more than `body_limit` (413) or
//! more than `max_headers` headers (431), and a client that sends its body
//! slowly is cut off by the request's time limit (408) before the pool is
//! ever called. A client that sends its *headers* slowly, or opens a
//! connection and says nothing, is cut off by the listener's header-read
//! timeout (`request_timeout`, at most 30 s). The gateway speaks HTTP/1.1 only:
//! cleartext HTTP/2 (h2c) is refused.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use retryctl_gateway::{DEFAULT_LISTEN, GatewayConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{HttpServer, Reply};
use crate::{fast_policy, start};

const MODEL: &str = "m";

fn config(upstream: &str, top: &str) -> String {
    format!(
        "{top}\n[providers.a]\nbase_url = \"{upstream}/v1\"\n\
         [[models]]\nname = \"{MODEL}\"\nproviders = [\"a\"]\n"
    )
}

/// Sends `head` on a new connection and reads until the status line of
/// the answer (or the end of the connection) arrives, within `limit`.
async fn status_of(addr: SocketAddr, head: &[u8], limit: Duration) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(head).await.expect("write");
    read_status(&mut stream, limit).await
}

async fn read_status(stream: &mut TcpStream, limit: Duration) -> Option<u16> {
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            if got.windows(2).any(|w| w == b"\r\n") {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(limit, read).await;
    let text = String::from_utf8_lossy(&got);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

#[test]
fn everything_binds_loopback_by_default() {
    assert!(DEFAULT_LISTEN.ip().is_loopback());
    assert!(
        retryctl_gateway::metrics_endpoint::DEFAULT_ADDR
            .ip()
            .is_loopback()
    );
    // A configuration that names neither address gets both defaults.
    let minimal = GatewayConfig::from_toml(&config("http://10.0.0.5:8000", "")).unwrap();
    assert_eq!(minimal.listen, DEFAULT_LISTEN);
    assert_eq!(
        minimal.metrics_listen,
        Some(retryctl_gateway::metrics_endpoint::DEFAULT_ADDR)
    );
    // And so does the shipped example.
    let shipped = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .join("config/gateway.toml");
    let shipped = GatewayConfig::load(&shipped).unwrap();
    assert!(shipped.listen.ip().is_loopback(), "{}", shipped.listen);
    assert!(shipped.metrics_listen.is_some_and(|a| a.ip().is_loopback()));
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_before_it_is_sent() {
    let upstream = HttpServer::always(Reply::json("{}")).await;
    let gw = start(
        &config(&upstream.url(), "body_limit = \"1KiB\""),
        fast_policy(),
    )
    .await;
    // Declared: refused from the headers alone, the body never sent.
    let head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n\
                 Content-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n";
    let started = Instant::now();
    let status = status_of(gw.addr, head, Duration::from_secs(5)).await;
    assert_eq!(status, Some(413));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // Undeclared (chunked): refused once the limit is crossed.
    let chunks = (0..100).map(|_| Ok::<_, std::io::Error>("x".repeat(100)));
    let a = gw
        .answer_to(
            "/v1/chat/completions",
            reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)),
        )
        .await;
    assert_eq!(a.status, 413, "{}", a.text);
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn too_many_headers_are_431() {
    let upstream = HttpServer::always(Reply::json("{}")).await;
    // The configured limit, checked by the handler.
    let gw = start(&config(&upstream.url(), "max_headers = 10"), fast_policy()).await;
    let mut request = gw.client.post(gw.url("/v1/chat/completions"));
    for i in 0..20 {
        request = request.header(format!("x-pad-{i}"), "v");
    }
    let r = request.body("{}").send().await.unwrap();
    assert_eq!(r.status(), 431);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_headers");
    // The default (100): hyper's own limit refuses more before the
    // handler runs.
    let gw = start(&config(&upstream.url(), ""), fast_policy()).await;
    let mut head = String::from("POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n");
    for i in 0..150 {
        head.push_str(&format!("X-Pad-{i}: v\r\n"));
    }
    head.push_str("Content-Length: 2\r\n\r\n{}");
    let status = status_of(gw.addr, head.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status, Some(431));
    assert_eq!(upstream.hits(), 0);
}

/// The gateway speaks HTTP/1.1 only. A client that opens with the HTTP/2
/// preface (cleartext HTTP/2, h2c) is refused before any request is read:
/// hyper's 100-header limit and the header-read timeout tested here are
/// HTTP/1 protections, and a second protocol would need its own.
#[tokio::test]
async fn a_cleartext_http2_client_is_refused() {
    let upstream = HttpServer::always(Reply::json("{}")).await;
    let gw = start(&config(&upstream.url(), "max_headers = 10"), fast_policy()).await;
    // A client that speaks HTTP/2 without asking (prior knowledge) gets no
    // answer, whatever its request holds.
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let mut request = client.post(gw.url("/v1/chat/completions"));
    for i in 0..150 {
        request = request.header(format!("x-pad-{i}"), "v");
    }
    let sent = request
        .body(format!("{{\"model\":\"{MODEL}\"}}"))
        .send()
        .await;
    assert!(
        sent.is_err(),
        "answered over h2c: {:?}",
        sent.map(|r| (r.version(), r.status()))
    );
    // On the wire: the preface and an empty SETTINGS frame get no HTTP/2
    // frame back (a server speaking HTTP/2 sends its SETTINGS first), and
    // the connection is closed.
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut got)).await;
    assert!(
        read.is_ok(),
        "the connection was still open after 5 s (received {got:?})"
    );
    assert!(
        got.is_empty() || got.starts_with(b"HTTP/1.1 "),
        "the preface was answered with something other than HTTP/1.1: {:?}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(upstream.hits(), 0);
}

/// Sends a request head announcing 1,000 body bytes, then one byte a
/// second; returns the status the gateway answered with and when.
async fn trickle_body(addr: SocketAddr) -> (Option<u16>, Duration) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut read, mut write) = stream.into_split();
    let started = Instant::now();
    write
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n\
              Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{",
        )
        .await
        .unwrap();
    let writer = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if write.write_all(b" ").await.is_err() {
                return;
            }
        }
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let read_status = async {
        while !got.windows(2).any(|w| w == b"\r\n") {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), read_status).await;
    writer.abort();
    let text = String::from_utf8_lossy(&got);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|s| s.parse().ok());
    (status, started.elapsed())
}

#[tokio::test]
async fn a_client_trickling_its_body_is_cut_off_by_the_time_limit() {
    let upstream = HttpServer::always(Reply::json("{}")).await;
    // `request_timeout` covers reading the body.
    let gw = start(
        &config(&upstream.url(), "request_timeout = \"1s\""),
        fast_policy(),
    )
    .await;
    let (status, took) = trickle_body(gw.addr).await;
    assert_eq!(status, Some(408));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // Without `request_timeout`, the policy's `timeouts.request` does
    // (10 minutes by default): bounded, though not short.
    let mut policy = fast_policy();
    policy.timeouts.request = Duration::from_secs(1);
    let gw = start(&config(&upstream.url(), ""), policy).await;
    let (status, took) = trickle_body(gw.addr).await;
    assert_eq!(status, Some(408));
    assert!(took < Duration::from_secs(5), "{took:?}");
    // The pool was never called: no upstream attempt, no budget deposit.
    assert_eq!(upstream.hits(), 0);
}

/// Reads from `stream` while writing one byte of `trickle` every 250 ms;
/// returns how long until the gateway ended the connection (or answered),
/// if it did within `limit`.
pub(crate) async fn time_to_cut(
    mut stream: TcpStream,
    trickle: &[u8],
    limit: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let mut next = trickle.iter();
    let mut buf = [0u8; 256];
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    while started.elapsed() < limit {
        tokio::select! {
            read = stream.read(&mut buf) => {
                // Closed, reset, or answered (e.g. 408): cut off.
                let _ = read;
                return Some(started.elapsed());
            }
            _ = tick.tick() => {
                if let Some(b) = next.next() {
                    if stream.write_all(&[*b]).await.is_err() {
                        return Some(started.elapsed());
                    }
                }
            }
        }
    }
    None
}

/// A slow-loris client's connection to `addr`, with `head` (a request
/// line and its first headers) sent, and the bytes of a header that never
/// ends, for [`time_to_cut`] to trickle.
pub(crate) async fn slow_loris(addr: SocketAddr, head: &[u8]) -> (TcpStream, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(head).await.expect("write");
    let trickle = "X-Slow: "
        .bytes()
        .chain(std::iter::repeat_n(b'a', 100))
        .collect();
    (stream, trickle)
}

/// A slow-loris client: the request line, then its headers one byte at a
/// time, forever. Each such connection would hold a task and a socket,
/// and enough of them would exhaust the gateway's file descriptors. The
/// gateway's listener closes a connection on which no request head
/// completes within `header_read_timeout` = the request's time limit (at
/// most 30 s). (Under `axum::serve` nothing did, and this connection and
/// the next test's were held until the client left.)
#[tokio::test]
async fn a_client_trickling_its_headers_is_cut_off() {
    let upstream = HttpServer::always(Reply::json("{}")).await;
    let gw = start(
        &config(&upstream.url(), "request_timeout = \"1s\""),
        fast_policy(),
    )
    .await;
    let (stream, trickle) = slow_loris(
        gw.addr,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n",
    )
    .await;
    let cut = time_to_cut(stream, &trickle, Duration::from_secs(8)).await;
    assert!(
        cut.is_some_and(|t| t < Duration::from_secs(5)),
        "a client sending its headers one byte at a time was not cut off \
         within 8 s (request_timeout = 1s): {cut:?}"
    );
}

/// A connection that never sends a byte is closed by the same timeout.
#[tokio::test]
async fn an_idle_connection_is_closed() {
    let upstream = HttpServer::always(Reply::json("{}")).await;
    let gw = start(
        &config(&upstream.url(), "request_timeout = \"1s\""),
        fast_policy(),
    )
    .await;
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let cut = time_to_cut(stream, b"", Duration::from_secs(8)).await;
    assert!(
        cut.is_some_and(|t| t < Duration::from_secs(5)),
        "a silent connection was still open after 8 s: {cut:?}"
    );
}
