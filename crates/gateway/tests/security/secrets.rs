//! Keys, addresses and credentials never leave the gateway.
//!
//! Every test drives one way a request can fail, then looks for the
//! secrets in three places: every answer the client got (status, every
//! header, the body), the rendered metrics, and the log lines.
//!
//! Which addresses count:
//!
//! * an **upstream's** address (`127.0.0.1:<port>` here, and any address
//!   an upstream echoes, `10.9.8.7`): never in an answer, a metric or a log
//!   line the gateway writes;
//! * the **client's** address (`127.0.0.3`): the same; the gateway has no
//!   reason to repeat it, and logs with client IPs are personal data;
//! * the **gateway's own** listen address: not a secret (the client
//!   connected to it) and logged once at startup by `retryctl serve`; the
//!   tests serve with `Gateway::serve`, which does not log it, so
//!   `127.0.0.1` must not appear at all.
//!
//! "Log lines the gateway writes" are what the binary prints by default
//! (`info` and above, every crate) plus everything retryctl itself logs at
//! every level. Third-party `debug`/`trace` output (reqwest's "starting new
//! connection", hyper-util's "connecting to 127.0.0.1:port") names
//! upstream addresses by design and is only seen with `RUST_LOG=debug`;
//! the API key must not appear even there.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::sse::{SseReply, SseServer};
use crate::support::{HttpServer, Reply, closed_port};
use crate::{
    Answer, CLIENT_IP, KEY, KEY_ENV, Logs, PLAIN_KEY, PLAIN_KEY_ENV, TestGateway, capture_logs,
    fast_policy, start,
};

const MODEL: &str = "m";

/// An upstream's error text that repeats everything it should not: the
/// key (as sent, and in a URL), credentials in a URL, the client's and
/// its own addresses.
fn echo(backend: SocketAddr) -> String {
    format!(
        "upstream http://{backend}/v1 (10.9.8.7) rejected Authorization: Bearer {KEY} \
         for client {CLIENT_IP}, key={KEY}, retry via \
         http://admin:hunter2@10.9.8.7:8443/v1?api_key={KEY}"
    )
}

fn echo_json(backend: SocketAddr) -> String {
    serde_json::json!({"error": {"message": echo(backend), "type": "server_error"}}).to_string()
}

/// A gateway whose one model `m` is served by one provider at `base`
/// (`/v1` appended) with the key, `provider` extra lines, `top` extra
/// top-level lines.
async fn gateway(base: &str, provider: &str, top: &str) -> TestGateway {
    let config = format!(
        "{top}\n[providers.upstream]\nbase_url = \"{base}/v1\"\napi_key_env = \"{KEY_ENV}\"\n\
         connect_timeout = \"200ms\"\n{provider}\n\
         [[models]]\nname = \"{MODEL}\"\nproviders = [\"upstream\"]\n"
    );
    start(&config, fast_policy()).await
}

fn chat(stream: bool) -> String {
    serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": stream,
    })
    .to_string()
}

/// Asserts that nothing secret shows in what the client got, the metrics
/// or the logs; `upstreams` are the upstream addresses involved.
fn assert_nothing_leaks(
    what: &str,
    logs: &Logs,
    gw: &TestGateway,
    answers: &[Answer],
    upstreams: &[SocketAddr],
) {
    let answers = answers
        .iter()
        .map(|a| a.text.as_str())
        .collect::<Vec<_>>()
        .join("\n----\n");
    let metrics = gw.metrics.render();
    let ours = logs.ours.text();
    let all = logs.all.text();
    // Something was logged (the capture works).
    assert!(
        ours.contains("retryctl"),
        "{what}: no log line captured:\n{all}"
    );
    for needle in [KEY, "SECRET123456", "hunter2"] {
        for (place, text) in [
            ("the client's answers", &answers),
            ("the metrics", &metrics),
            ("the logs (every crate, every level)", &all),
        ] {
            assert!(
                !text.contains(needle),
                "{what}: {needle:?} in {place}:\n{text}"
            );
        }
    }
    let mut addresses = vec![
        CLIENT_IP.to_string(),
        "10.9.8.7".to_owned(),
        "127.0.0.1".to_owned(),
    ];
    for a in upstreams {
        addresses.push(a.to_string());
        addresses.push(format!(":{}", a.port()));
    }
    for needle in &addresses {
        for (place, text) in [
            ("the client's answers", &answers),
            ("the metrics", &metrics),
            ("the gateway's logs", &ours),
        ] {
            assert!(
                !text.contains(needle.as_str()),
                "{what}: {needle:?} in {place}:\n{text}"
            );
        }
    }
}

#[tokio::test]
async fn a_refused_upstream() {
    let logs = capture_logs();
    let refused = closed_port();
    let gw = gateway(&format!("http://{refused}"), "", "").await;
    let a = gw.answer_to("/v1/chat/completions", chat(false)).await;
    assert_eq!(a.status, 502, "{}", a.text);
    assert!(a.body.contains("connect_refused"), "{}", a.text);
    // The pool's warning carries the (redacted) reqwest error chain.
    assert!(logs.ours.text().contains("all providers failed"));
    assert_nothing_leaks("refused", &logs, &gw, &[a], &[refused]);
}

#[tokio::test]
async fn an_upstream_500_that_echoes_the_key_and_addresses() {
    let logs = capture_logs();
    let backend = closed_port();
    let upstream = HttpServer::always(
        Reply::status(500)
            .header("Content-Type", "application/json")
            .header("X-Upstream-Debug", echo(backend))
            .body(echo_json(backend)),
    )
    .await;
    let gw = gateway(&upstream.url(), "", "").await;
    let a = gw.answer_to("/v1/chat/completions", chat(false)).await;
    assert_eq!(a.status, 502, "{}", a.text);
    assert_eq!(upstream.hits(), 2, "retried once");
    // The key did go upstream, as a bearer token.
    let sent = upstream.requests()[0]
        .header("authorization")
        .map(str::to_owned);
    assert_eq!(sent.as_deref(), Some(&*format!("Bearer {KEY}")));
    assert_nothing_leaks("500 echo", &logs, &gw, &[a], &[upstream.addr(), backend]);
}

#[tokio::test]
async fn a_401_that_echoes_the_key_is_passed_through_redacted() {
    let logs = capture_logs();
    let backend = closed_port();
    let upstream = HttpServer::always(
        Reply::status(401)
            .header("Content-Type", "application/json")
            .body(echo_json(backend)),
    )
    .await;
    let gw = gateway(&upstream.url(), "", "").await;
    let a = gw.answer_to("/v1/chat/completions", chat(false)).await;
    assert_eq!(a.status, 401, "passed through: {}", a.text);
    assert!(a.body.contains("[redacted]"), "{}", a.text);
    serde_json::from_str::<serde_json::Value>(&a.body).expect("still JSON");
    assert_eq!(upstream.hits(), 1, "a client error is not retried");
    assert_nothing_leaks("401 echo", &logs, &gw, &[a], &[upstream.addr(), backend]);
}

#[tokio::test]
async fn an_error_event_that_echoes_the_key() {
    let logs = capture_logs();
    let backend = closed_port();
    let event = serde_json::json!({"error": {"message": echo(backend), "code": 401}}).to_string();
    let upstream = SseServer::start(vec![SseReply::new().event(&event).into()]).await;
    let gw = gateway(&upstream.url(), "", "").await;
    let a = gw.answer_to("/v1/chat/completions", chat(true)).await;
    assert_eq!(a.status, 401, "{}", a.text);
    assert_nothing_leaks("error event", &logs, &gw, &[a], &[upstream.addr(), backend]);
}

#[tokio::test]
async fn a_reset_while_reading_the_body() {
    let logs = capture_logs();
    let cut = SseReply::new()
        .raw("{\"partial\":")
        .delay(Duration::from_millis(10))
        .reset();
    let upstream = SseServer::start(vec![cut.into()]).await;
    let gw = gateway(&upstream.url(), "", "").await;
    let a = gw.answer_to("/v1/chat/completions", chat(false)).await;
    assert_eq!(a.status, 502, "{}", a.text);
    assert_nothing_leaks("reset", &logs, &gw, &[a], &[upstream.addr()]);
}

#[tokio::test]
async fn timeouts_per_attempt_and_per_request() {
    let logs = capture_logs();
    let slow = HttpServer::always(Reply::json("{}").delay(Duration::from_secs(3))).await;
    // The provider's own attempt_timeout: the attempt is cut, not retried.
    let gw = gateway(&slow.url(), "attempt_timeout = \"200ms\"", "").await;
    let attempt = gw.answer_to("/v1/chat/completions", chat(false)).await;
    assert_eq!(attempt.status, 504, "{}", attempt.text);
    // The request's deadline.
    let gw2 = gateway(&slow.url(), "", "request_timeout = \"300ms\"").await;
    let deadline = gw2.answer_to("/v1/chat/completions", chat(false)).await;
    assert_eq!(deadline.status, 504, "{}", deadline.text);
    assert!(
        deadline.body.contains("deadline_exceeded"),
        "{}",
        deadline.text
    );
    assert_nothing_leaks("attempt timeout", &logs, &gw, &[attempt], &[slow.addr()]);
    assert_nothing_leaks("request timeout", &logs, &gw2, &[deadline], &[slow.addr()]);
}

#[tokio::test]
async fn a_model_named_like_a_key_or_an_address() {
    let logs = capture_logs();
    let upstream = HttpServer::always(Reply::json("{}")).await;
    let gw = gateway(&upstream.url(), "", "").await;
    let mut answers = Vec::new();
    for model in [
        KEY.to_owned(),
        format!("Bearer {KEY}"),
        format!("http://admin:hunter2@{}/v1", upstream.addr()),
        CLIENT_IP.to_string(),
    ] {
        let body = serde_json::json!({"model": model, "messages": []}).to_string();
        let a = gw.answer_to("/v1/chat/completions", body).await;
        assert_eq!(a.status, 404, "{}", a.text);
        answers.push(a);
    }
    // A body that is not JSON, with the key in it.
    let a = gw
        .answer_to("/v1/chat/completions", format!("{{\"model\": \"{KEY}\", "))
        .await;
    assert_eq!(a.status, 400, "{}", a.text);
    answers.push(a);
    assert_eq!(upstream.hits(), 0);
    assert_nothing_leaks("unknown model", &logs, &gw, &answers, &[upstream.addr()]);
}

/// The same failures seen by an operator with `RUST_LOG=debug`: the key
/// never shows; upstream addresses do, in third-party connection logs
/// only (documented above, not a leak of the gateway's).
#[tokio::test]
async fn third_party_debug_logs_name_upstreams_but_never_the_key() {
    let logs = capture_logs();
    let refused = closed_port();
    let gw = gateway(&format!("http://{refused}"), "", "").await;
    let a = gw.answer_to("/v1/chat/completions", chat(false)).await;
    assert_eq!(a.status, 502);
    let all = logs.all.text();
    assert!(!all.contains(KEY), "{all}");
    let naming_upstreams: Vec<&str> = all.lines().filter(|l| l.contains("127.0.0.1")).collect();
    assert!(
        !naming_upstreams.is_empty(),
        "reqwest and hyper-util log connections at debug"
    );
    for line in naming_upstreams {
        // `LEVEL target: message`
        let mut words = line.split_whitespace();
        let (level, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        assert!(
            matches!(level, "DEBUG" | "TRACE") && !target.starts_with("retryctl"),
            "an upstream address outside third-party debug output: {line}"
        );
    }
}

/// An upstream error body is kept up to 4 KiB (`BODY_SNIPPET_LIMIT`) and
/// redacted after that cut: a key that straddles the cut is no longer the
/// whole known secret. Whatever part of it remains must not show.
#[tokio::test]
async fn a_key_cut_by_the_error_body_limit() {
    const LIMIT: usize = retryctl::upstream::BODY_SNIPPET_LIMIT;
    let logs = capture_logs();
    // One reply per cut: 1 to all-but-one characters of the key fall
    // before the limit.
    let cuts: Vec<usize> = (1..PLAIN_KEY.len()).collect();
    let replies = cuts
        .iter()
        .map(|&cut| {
            let body = format!("{}{PLAIN_KEY} was refused", "x".repeat(LIMIT - cut));
            Reply::status(401).body(body)
        })
        .collect();
    let upstream = HttpServer::start(replies).await;
    let config = format!(
        "[providers.upstream]\nbase_url = \"{}/v1\"\napi_key_env = \"{PLAIN_KEY_ENV}\"\n\
         [[models]]\nname = \"{MODEL}\"\nproviders = [\"upstream\"]\n",
        upstream.url()
    );
    let gw = start(&config, fast_policy()).await;
    let mut answers = Vec::new();
    for cut in cuts {
        let a = gw.answer_to("/v1/chat/completions", chat(false)).await;
        assert_eq!(a.status, 401, "{}", a.text);
        // Up to 5 characters ("k3y-0") say nothing; more is a piece of
        // the key.
        let piece = &PLAIN_KEY[..cut];
        assert!(
            cut < 6 || !a.body.contains(piece),
            "{cut} characters of the key shown: {:?}",
            &a.body[a.body.len().saturating_sub(60)..]
        );
        answers.push(a);
    }
    assert_nothing_leaks("cut key", &logs, &gw, &answers, &[upstream.addr()]);
}
