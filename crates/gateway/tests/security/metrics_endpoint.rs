//! What one client can hold on the `/metrics` listener: the gateway's
//! accept loop serves it, so a client that trickles its request head, goes
//! silent, or keeps a connection idle between scrapes is closed after the
//! header-read timeout, while scrapes go on being answered.
//!
//! Each test serves its own recorder ([`retryctl_gateway::metrics_endpoint::serve_handle`]) with a
//! 1 s timeout (10 s by default), so no global recorder is installed.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use retryctl::telemetry::Recorder;
use retryctl_gateway::metrics_endpoint::{ListenerOptions, MetricsServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::exposure::{slow_loris, time_to_cut};

const TIMEOUT: Duration = Duration::from_secs(1);

/// A `/metrics` server with a 1 s header-read timeout over a recorder that
/// holds one counter.
fn metrics_server() -> MetricsServer {
    let recorder = Recorder::new();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        metrics::counter!("listener_test_scrapes_total").increment(7);
    });
    let options = ListenerOptions::default().header_read_timeout(TIMEOUT);
    retryctl_gateway::metrics_endpoint::serve_handle(
        "127.0.0.1:0".parse().unwrap(),
        handle,
        options,
    )
    .expect("serve /metrics")
}

/// One scrape on a new connection: the status and body, within 2 s.
async fn scrape(addr: SocketAddr) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let (status, body, _) = get(&mut stream, "close").await?;
    Some((status, body))
}

/// Sends `GET /metrics` with `Connection: {connection}` and reads the
/// answer (its body by Content-Length), within 2 s. Also returns whether
/// the connection was still open after the answer was read.
async fn get(stream: &mut TcpStream, connection: &str) -> Option<(u16, String, bool)> {
    let head =
        format!("GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: {connection}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.ok()?;
    let read = async {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_string();
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                if got.len() >= end + 4 + length {
                    let status = head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
                    let body = String::from_utf8_lossy(&got[end + 4..end + 4 + length]);
                    return Some((status, body.to_string(), true));
                }
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .ok()
        .flatten()
}

/// Waits until the server ends `stream` (EOF or reset), up to `limit`;
/// how long that took.
async fn time_to_close(mut stream: TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let closed = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, closed)
        .await
        .ok()
        .map(|()| started.elapsed())
}

/// 200 slow-loris connections (a request line and half a header, then
/// nothing) plus one sending its header a byte every 250 ms: scrapes are
/// answered throughout, and every one of them is closed within the
/// timeout (1 s, with slack for a loaded machine).
#[tokio::test]
async fn metrics_listener_closes_slow_loris_connections_and_keeps_answering_scrapes() {
    const CONNECTIONS: usize = 200;
    let server = metrics_server();
    let addr = server.local_addr();
    let started = Instant::now();
    let mut held = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nX-Slow: aaa")
            .await
            .expect("write");
        held.push(stream);
    }
    let (trickling, trickle) =
        slow_loris(addr, b"GET /metrics HTTP/1.1\r\nHost: metrics\r\n").await;
    let trickled =
        tokio::spawn(async move { time_to_cut(trickling, &trickle, Duration::from_secs(4)).await });
    let opened = started.elapsed();

    // During the attack, a scrape is answered at once.
    let (status, body) = scrape(addr).await.expect("a scrape during the attack");
    assert_eq!(status, 200);
    assert!(
        body.contains("listener_test_scrapes_total 7"),
        "scrape during the attack: {body}"
    );

    let closes = futures_util::future::join_all(
        held.into_iter()
            .map(|s| time_to_close(s, Duration::from_secs(4))),
    )
    .await;
    let still_open = closes.iter().filter(|c| c.is_none()).count();
    assert_eq!(
        still_open, 0,
        "{still_open} of {CONNECTIONS} slow-loris connections still open 4 s after \
         the last was opened (header read timeout {TIMEOUT:?})"
    );
    // Every connection was closed by the timeout: the last one opened at
    // `opened`, none later than the timeout plus slack after that.
    let last = started.elapsed();
    assert!(
        last < opened + TIMEOUT + Duration::from_millis(1500),
        "closing took until {last:?} (all opened by {opened:?})"
    );
    let cut = trickled.await.unwrap();
    assert!(
        cut.is_some_and(|t| t < TIMEOUT + Duration::from_millis(1500)),
        "a client sending its header a byte every 250 ms was not cut off: {cut:?}"
    );

    // And after it, scrapes are still answered.
    let (status, _) = scrape(addr).await.expect("a scrape after the attack");
    assert_eq!(status, 200);
}

/// A keep-alive connection left idle after a scrape is closed after the
/// timeout, as is one that never sends a byte; one that scrapes within
/// the timeout is kept.
#[tokio::test]
async fn metrics_listener_closes_idle_keep_alive_connections() {
    let server = metrics_server();
    let addr = server.local_addr();

    let mut kept = TcpStream::connect(addr).await.unwrap();
    let (status, _, _) = get(&mut kept, "keep-alive").await.expect("first scrape");
    assert_eq!(status, 200);
    tokio::time::sleep(TIMEOUT / 2).await;
    // Within the timeout the connection is reused.
    let (status, body, _) = get(&mut kept, "keep-alive").await.expect("second scrape");
    assert_eq!(status, 200);
    assert!(body.contains("listener_test_scrapes_total 7"), "{body}");
    let idle = time_to_close(kept, Duration::from_secs(4)).await;
    assert!(
        idle.is_some_and(|t| t >= TIMEOUT / 2 && t < TIMEOUT + Duration::from_millis(1500)),
        "an idle keep-alive connection was not closed after the timeout ({TIMEOUT:?}): {idle:?}"
    );

    let silent = TcpStream::connect(addr).await.unwrap();
    let closed = time_to_close(silent, Duration::from_secs(4)).await;
    assert!(
        closed.is_some_and(|t| t < TIMEOUT + Duration::from_millis(1500)),
        "a silent connection was not closed: {closed:?}"
    );
}
