//! Proves that each loopback fault server in `retryctl-testkit` produces the
//! client-side failure it claims, as seen by a plain `reqwest::Client`
//! (reqwest 0.13 / hyper 1 / hyper-util legacy client, Linux loopback).

use retryctl_testkit as support;

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use support::*;

/// A client that never reuses connections and gives up connecting after 200 ms.
fn client(total: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(200))
        .timeout(total)
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// Sends `GET url` and expects an error; returns it.
async fn get_err(client: &reqwest::Client, url: &str) -> reqwest::Error {
    match client.get(url).send().await {
        Ok(resp) => panic!("expected an error from {url}, got {}", resp.status()),
        Err(e) => e,
    }
}

/// All of reqwest's classification flags plus the source chain, for messages.
fn describe(e: &reqwest::Error) -> String {
    format!(
        "connect={} timeout={} request={} body={} status={:?} io={:?} chain=[{}]",
        e.is_connect(),
        e.is_timeout(),
        e.is_request(),
        e.is_body(),
        e.status(),
        io_kind(e),
        error_chain(e)
    )
}

#[tokio::test]
async fn closed_port_is_connection_refused() {
    let addr = closed_port();
    let e = get_err(&client(Duration::from_secs(1)), &format!("http://{addr}/")).await;
    let d = describe(&e);
    // Observed: "client error (Connect) -> tcp connect error -> Connection
    // refused (os error 111)".
    assert!(e.is_connect(), "{d}");
    assert!(!e.is_timeout(), "{d}");
    assert_eq!(io_kind(&e), Some(ErrorKind::ConnectionRefused), "{d}");
    // The port stays reserved: no server (tokio binds with SO_REUSEADDR) can
    // take it over while the test runs.
    let taken = tokio::net::TcpListener::bind(addr).await.unwrap_err();
    assert_eq!(taken.kind(), ErrorKind::AddrInUse);
}

#[tokio::test]
async fn reset_on_accept_is_connection_reset_not_connect() {
    let server = ResetServer::start(ResetMode::OnAccept).await;
    let e = get_err(&client(Duration::from_secs(1)), &server.url()).await;
    let d = describe(&e);
    // The TCP handshake completed, so reqwest does NOT call this a connect
    // error. Observed chain: "client error (Canceled) -> operation was canceled
    // -> connection error -> Connection reset by peer (os error 104)" (the RST
    // lands before hyper dispatched the request). If the request write wins the
    // race it reads "client error (SendRequest) -> connection error -> Connection
    // reset ..." instead; both carry io ConnectionReset, which is what we pin.
    assert!(!e.is_connect(), "{d}");
    assert!(!e.is_timeout(), "{d}");
    assert!(e.is_request(), "{d}");
    assert_eq!(io_kind(&e), Some(ErrorKind::ConnectionReset), "{d}");
    assert_eq!(server.accepted(), 1);
    assert_eq!(server.requests(), 0);
}

#[tokio::test]
async fn reset_after_request_is_connection_reset_after_send() {
    let server = ResetServer::start(ResetMode::AfterRequest).await;
    let e = get_err(&client(Duration::from_secs(1)), &server.url()).await;
    let d = describe(&e);
    // Observed: "client error (SendRequest) -> connection error -> Connection
    // reset by peer (os error 104)": the request was fully written (the server
    // read it), then the read of the response failed with ECONNRESET.
    assert!(!e.is_connect(), "{d}");
    assert!(!e.is_timeout(), "{d}");
    assert!(e.is_request(), "{d}");
    assert_eq!(io_kind(&e), Some(ErrorKind::ConnectionReset), "{d}");
    let h = hyper_error(&e).expect("a hyper::Error in the chain");
    assert!(!h.is_incomplete_message() && !h.is_canceled(), "{d}");
    assert_eq!(server.accepted(), 1);
    assert_eq!(
        server.requests(),
        1,
        "the server must have read the request"
    );
}

#[tokio::test]
async fn stalled_listener_never_completes_a_raw_connect() {
    let server = StalledServer::start().await;
    // Linux keeps backlog + 1 = 2 completed handshakes queued for listen(1).
    assert!(server.fillers() >= 1, "fillers = {}", server.fillers());
    let raw = tokio::time::timeout(
        Duration::from_millis(300),
        tokio::net::TcpStream::connect(server.addr()),
    )
    .await;
    assert!(raw.is_err(), "connect completed: {raw:?}");
}

#[tokio::test]
async fn stalled_listener_is_connect_timeout() {
    let server = StalledServer::start().await;
    let c = client(Duration::from_secs(1));
    let started = Instant::now();
    let e = get_err(&c, &server.url()).await;
    let took = started.elapsed();
    let d = describe(&e);
    // The flags are the stable contract. The chain comes in two observed
    // shapes, because hyper-util's HttpConnector and reqwest's connector
    // wrapper both arm a 200 ms connect timer and either may fire first:
    //   "client error (Connect) -> tcp connect error -> deadline has elapsed"
    //     (an io::Error of kind TimedOut wrapping tokio's Elapsed), or
    //   "client error (Connect) -> operation timed out"
    //     (reqwest's own TimedOut, no io::Error in the chain; ~1 run in 15).
    assert!(e.is_connect() && e.is_timeout(), "{d}");
    assert!(
        matches!(io_kind(&e), Some(ErrorKind::TimedOut) | None),
        "{d}"
    );
    // The 200 ms connect timeout fired, not the 1 s total timeout.
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_millis(900),
        "{took:?}"
    );
}

#[tokio::test]
async fn slow_accept_drops_clients_beyond_the_queue() {
    let server = StalledServer::slow_accept(Duration::from_millis(100), Reply::ok("hi")).await;
    // A roomier connect timeout than elsewhere so a loaded CI box still
    // completes the queued handshakes; the dropped SYNs would only be
    // retransmitted at ~1 s, well after it.
    let c = reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(400))
        .timeout(Duration::from_millis(900))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let (c, url) = (c.clone(), server.url());
            tokio::spawn(async move { c.get(url).send().await })
        })
        .collect();
    let (mut ok, mut connect_timeouts, mut half_open) = (0, 0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(resp) => {
                assert_eq!(resp.status(), 200);
                ok += 1;
            }
            Err(e) if e.is_connect() && e.is_timeout() => connect_timeouts += 1,
            // SYN-cookie handshake completed, final ACK dropped (see docs).
            Err(e) if e.is_timeout() => half_open += 1,
            Err(e) => panic!("unexpected error: {}", describe(&e)),
        }
    }
    // Observed on an idle machine, every run: 2 served (the listen(1) queue
    // holds 2 handshakes) and 3 connect timeouts (SYN dropped).
    assert!(
        ok >= 1 && connect_timeouts >= 1,
        "ok={ok} connect={connect_timeouts} half_open={half_open}"
    );
    assert_eq!(ok + connect_timeouts + half_open, 5);
    assert!(
        server.accepted() >= ok,
        "accepted={} ok={ok}",
        server.accepted()
    );
}

#[tokio::test]
async fn slow_reply_is_timeout_not_connect() {
    let server = HttpServer::always(Reply::ok("late").delay(Duration::from_millis(500))).await;
    let c = client(Duration::from_millis(150));
    let started = Instant::now();
    let e = get_err(&c, &server.url()).await;
    let took = started.elapsed();
    let d = describe(&e);
    // Observed: "error sending request ... -> operation timed out" (reqwest's
    // own TimedOut; no io::Error in the chain).
    assert!(e.is_timeout(), "{d}");
    assert!(!e.is_connect(), "{d}");
    assert_eq!(io_kind(&e), None, "{d}");
    assert!(
        took < Duration::from_millis(500),
        "timed out only after {took:?}"
    );
    assert_eq!(server.hits(), 1, "the request must have reached the server");
}

#[tokio::test]
async fn delayed_reply_arrives_after_the_delay() {
    let server = HttpServer::always(Reply::ok("late").delay(Duration::from_millis(120))).await;
    let c = client(Duration::from_secs(1));
    let started = Instant::now();
    let resp = c.get(server.url()).send().await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(120));
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "late");
}

#[tokio::test]
async fn status_503_carries_retry_after() {
    let server = HttpServer::always(Reply::status(503).header("Retry-After", "1")).await;
    let resp = client(Duration::from_secs(1))
        .get(server.url())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers().get("retry-after").unwrap(), "1");
    assert_eq!(resp.headers().get("connection").unwrap(), "close");
}

#[tokio::test]
async fn script_is_consumed_in_order() {
    let server = HttpServer::start(vec![Reply::status(502), Reply::ok("fine")]).await;
    let c = client(Duration::from_secs(1));
    let first = c.get(server.url()).send().await.unwrap();
    assert_eq!(first.status(), 502);
    let second = c.get(server.url()).send().await.unwrap();
    assert_eq!(second.status(), 200);
    assert_eq!(second.text().await.unwrap(), "fine");
    assert_eq!(server.hits(), 2);
    // Connection: close => one connection per request.
    assert_eq!(server.connections(), 2);
}

#[tokio::test]
async fn exhausted_script_repeats_the_last_entry() {
    let server = HttpServer::start(vec![Reply::status(429), Reply::status(500)]).await;
    let c = client(Duration::from_secs(1));
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(c.get(server.url()).send().await.unwrap().status().as_u16());
    }
    assert_eq!(seen, [429, 500, 500, 500]);
    assert_eq!(server.hits(), 4);
}

#[tokio::test]
async fn scripted_reset_then_ok() {
    let server = HttpServer::start(vec![Reply::reset(), Reply::ok("after")]).await;
    let c = client(Duration::from_secs(1));
    let e = get_err(&c, &server.url()).await;
    assert_eq!(
        io_kind(&e),
        Some(ErrorKind::ConnectionReset),
        "{}",
        describe(&e)
    );
    assert!(!e.is_connect(), "{}", describe(&e));
    let resp = c.get(server.url()).send().await.unwrap();
    assert_eq!(resp.text().await.unwrap(), "after");
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn close_without_response_is_incomplete_message() {
    let server = HttpServer::always(Reply::close()).await;
    let e = get_err(&client(Duration::from_secs(1)), &server.url()).await;
    let d = describe(&e);
    // Observed: "client error (SendRequest) -> connection closed before message
    // completed" — hyper's IncompleteMessage, a request error with NO
    // io::Error anywhere in the chain (a clean FIN is not an io error).
    assert!(e.is_request(), "{d}");
    assert!(!e.is_connect(), "{d}");
    assert!(!e.is_timeout(), "{d}");
    assert_eq!(io_kind(&e), None, "{d}");
    let h = hyper_error(&e).expect("a hyper::Error in the chain");
    assert!(h.is_incomplete_message(), "{d}");
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn keep_alive_reuses_one_connection_and_records_requests() {
    let server = HttpServer::keep_alive(vec![Reply::json(r#"{"ok":true}"#)]).await;
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    for i in 0..3 {
        let resp = c
            .post(server.url_for("/v1/chat"))
            .header("x-attempt", i.to_string())
            .body(format!("body-{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.headers().get("content-type").unwrap(),
            "application/json"
        );
        assert!(resp.headers().get("connection").is_none());
        assert_eq!(resp.text().await.unwrap(), r#"{"ok":true}"#);
    }
    assert_eq!(server.hits(), 3);
    assert_eq!(server.connections(), 1);
    let reqs = server.requests();
    assert_eq!(reqs.len(), 3);
    assert_eq!(reqs[2].method, "POST");
    assert_eq!(reqs[2].path, "/v1/chat");
    assert_eq!(reqs[2].header("X-Attempt"), Some("2"));
    assert_eq!(reqs[2].body, b"body-2");
}

#[tokio::test]
async fn shutdown_closes_the_listener() {
    let server = HttpServer::always(Reply::ok("x")).await;
    let addr = server.addr();
    tokio::net::TcpStream::connect(addr).await.unwrap();
    server.shutdown().await;
    let e = tokio::net::TcpStream::connect(addr).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused);
}

#[tokio::test]
async fn reopening_server_refuses_while_closed_then_serves_on_the_same_port() {
    let mut server = ReopeningServer::start(Reply::ok("up")).await;
    let (addr, url) = (server.addr(), server.url());
    let c = client(Duration::from_secs(1));
    let body = |r: reqwest::Response| async move { r.text().await.unwrap() };
    assert_eq!(body(c.get(&url).send().await.unwrap()).await, "up");

    server.close().await;
    assert!(!server.is_open());
    let e = get_err(&c, &url).await;
    let d = describe(&e);
    assert!(e.is_connect(), "{d}");
    assert_eq!(io_kind(&e), Some(ErrorKind::ConnectionRefused), "{d}");

    // Reopened on the very port the client knows, despite the first
    // connection's TIME_WAIT on it.
    server.reopen();
    assert_eq!(server.addr(), addr);
    assert_eq!(body(c.get(&url).send().await.unwrap()).await, "up");
    assert_eq!(server.accepted(), 2);
}

#[tokio::test]
async fn dropping_servers_closes_their_listeners() {
    let http = HttpServer::always(Reply::ok("x")).await;
    let reset = ResetServer::start(ResetMode::AfterRequest).await;
    let stalled = StalledServer::start().await;
    let addrs = [http.addr(), reset.addr(), stalled.addr()];
    drop((http, reset, stalled));
    for addr in addrs {
        // Abort is processed on the next scheduler tick; poll briefly.
        let deadline = Instant::now() + Duration::from_millis(500);
        loop {
            match tokio::net::TcpStream::connect(addr).await {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => break,
                other => {
                    assert!(Instant::now() < deadline, "{addr} still open: {other:?}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}
