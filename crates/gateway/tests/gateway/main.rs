//! The reference gateway end to end: a real HTTP client (reqwest) against
//! the gateway on loopback, in front of real loopback fault servers.
//! Real time, short durations (the policy waits 20 ms between rounds).

use retryctl_testkit as support;

use std::sync::Arc;
use std::time::Duration;

use retryctl_gateway::{Gateway, GatewayConfig, GatewayError};
use serde_json::Value;
use support::sse::{Scripted, SseReply, SseServer};
use support::{HttpServer, Reply, closed_port};
use tokio::sync::Notify;

#[path = "../fixtures/mod.rs"]
mod fixtures;
#[path = "../fixtures/test_gateway.rs"]
mod test_gateway;
use fixtures::{COMPLETION, MODEL, POLICY, chat_body, config_text};
use test_gateway::TestGateway;

impl TestGateway {
    async fn chat(&self, body: &Value) -> reqwest::Response {
        self.post("/v1/chat/completions", body.to_string()).await
    }
}

fn env_none(_: &str) -> Option<String> {
    None
}

/// A client that opens a new connection for every request.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

async fn start_with(
    text: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<TestGateway, GatewayError> {
    start_with_policy(POLICY, text, env).await
}

/// A gateway whose configuration is `text` and whose policy file holds
/// `policy`.
async fn start_with_policy(
    policy: &str,
    text: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<TestGateway, GatewayError> {
    TestGateway::start(text, policy, env, client()).await
}

async fn start(urls: &[String]) -> TestGateway {
    start_with(&config_text(urls, "", "", ""), env_none)
        .await
        .unwrap()
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn json(r: reqwest::Response) -> Value {
    let text = r.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[tokio::test]
async fn non_streaming_success_forwards_the_body_byte_for_byte() {
    let upstream = HttpServer::always(Reply::json(COMPLETION)).await;
    let gw = start(&[upstream.url()]).await;
    // Odd spacing and key order must survive: the body is not re-serialised.
    let body = format!(r#"{{ "messages": [],  "model" : "{MODEL}", "n": 1.50 }}"#);
    let r = gw.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), Some("application/json"));
    assert_eq!(header(&r, "x-retryctl-attempts"), Some("1"));
    assert_eq!(header(&r, "x-retryctl-provider"), Some("p0"));
    assert_eq!(r.text().await.unwrap(), COMPLETION);
    let seen = &upstream.requests()[0];
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(seen.body, body.as_bytes());
    assert_eq!(seen.header("content-type"), Some("application/json"));
    assert_eq!(seen.header("authorization"), None);
    // What the upstream client adds: `Host` from the URI (set by
    // hyper-util's client, as it was under reqwest), the body's length,
    // the gateway's name.
    let host = upstream.url().trim_start_matches("http://").to_owned();
    assert_eq!(seen.header("host"), Some(host.as_str()));
    assert_eq!(seen.header("accept"), Some("application/json"));
    let length = body.len().to_string();
    assert_eq!(seen.header("content-length"), Some(length.as_str()));
    let agent = seen.header("user-agent").unwrap_or_default();
    assert!(agent.starts_with("retryctl/"), "{agent}");
    assert_eq!(seen.headers.iter().filter(|(k, _)| k == "host").count(), 1);
}

#[tokio::test]
async fn completions_and_embeddings_route_to_their_paths() {
    let upstream = HttpServer::always(Reply::json(r#"{"data":[]}"#)).await;
    let gw = start(&[upstream.url()]).await;
    let body = serde_json::json!({"model": MODEL, "input": "x", "stream": true}).to_string();
    assert_eq!(gw.post("/v1/embeddings", body.clone()).await.status(), 200);
    assert_eq!(gw.post("/v1/completions", body).await.status(), 200);
    let paths: Vec<_> = upstream
        .requests()
        .into_iter()
        .map(|r| (r.path.clone(), r.header("accept").map(str::to_owned)))
        .collect();
    assert_eq!(
        paths,
        vec![
            // embeddings never stream, whatever the body says
            (
                "/v1/embeddings".to_owned(),
                Some("application/json".to_owned())
            ),
            (
                "/v1/completions".to_owned(),
                Some("text/event-stream".to_owned())
            ),
        ]
    );
}

#[tokio::test]
async fn streaming_success_relays_every_event_in_order() {
    let events = [
        r#"{"choices":[{"delta":{"role":"assistant"}}]}"#,
        r#"{"choices":[{"delta":{"content":"Hel"}}]}"#,
        r#"{"choices":[{"delta":{"content":"lo"}}]}"#,
        r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#,
        "[DONE]",
    ];
    let mut sse = SseReply::new();
    for e in events {
        sse = sse.event(e).delay(Duration::from_millis(5));
    }
    let upstream = SseServer::start(vec![sse.into()]).await;
    let gw = start(&[upstream.url()]).await;
    let r = gw.chat(&chat_body(true)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), Some("text/event-stream"));
    assert_eq!(header(&r, "cache-control"), Some("no-cache"));
    assert_eq!(r.text().await.unwrap(), SseReply::render_events(&events));
    assert_eq!(upstream.hits(), 1);
    assert_eq!(
        upstream.requests()[0].header("accept"),
        Some("text/event-stream")
    );
}

#[tokio::test]
async fn a_5xx_before_the_first_byte_is_retried() {
    let upstream = HttpServer::start(vec![Reply::status(502), Reply::json(COMPLETION)]).await;
    let gw = start(&[upstream.url()]).await;
    let r = gw.chat(&chat_body(false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-retryctl-attempts"), Some("2"));
    assert_eq!(header(&r, "x-retryctl-rounds"), Some("2"));
    assert_eq!(header(&r, "x-retryctl-provider"), Some("p0"));
    assert_eq!(header(&r, "content-type"), Some("application/json"));
    assert_eq!(r.text().await.unwrap(), COMPLETION);
    assert_eq!(upstream.hits(), 2);
}

#[tokio::test]
async fn the_upstream_content_type_is_kept() {
    // Only the last takes the prebuilt headers of a JSON answer at the
    // first attempt; the others' are set one by one, as they come.
    let json_utf8 = Reply::ok("x").header("Content-Type", "application/json; charset=utf-8");
    let upstream = HttpServer::start(vec![json_utf8, Reply::ok("y"), Reply::json("z")]).await;
    let gw = start(&[upstream.url()]).await;
    for (content_type, body) in [
        ("application/json; charset=utf-8", "x"),
        ("text/plain; charset=utf-8", "y"),
        ("application/json", "z"),
    ] {
        let r = gw.chat(&chat_body(false)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "content-type"), Some(content_type));
        assert_eq!(header(&r, "x-retryctl-provider"), Some("p0"));
        assert_eq!(header(&r, "x-retryctl-attempts"), Some("1"));
        assert_eq!(header(&r, "x-retryctl-rounds"), Some("1"));
        assert_eq!(r.text().await.unwrap(), body);
    }
}

#[tokio::test]
async fn a_reset_while_reading_a_non_streaming_body_is_retried() {
    // 200 and the start of the body, then the connection dies: nothing
    // has reached the client, so the attempt is retried.
    let cut = SseReply::new()
        .raw("{\"partial\":")
        .delay(Duration::from_millis(20))
        .reset();
    let upstream = SseServer::start(vec![cut.into(), Reply::json(COMPLETION).into()]).await;
    let gw = start(&[upstream.url()]).await;
    let r = gw.chat(&chat_body(false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-retryctl-attempts"), Some("2"));
    assert_eq!(r.text().await.unwrap(), COMPLETION);
    assert_eq!(upstream.hits(), 2);
}

#[tokio::test]
async fn an_error_as_the_first_event_is_retried_and_the_good_stream_relayed() {
    let bad = SseReply::new()
        // a keep-alive comment does not commit the stream
        .raw(": keep-alive\n\n")
        .event(r#"{"error":{"message":"engine overloaded","type":"server_error","code":503}}"#);
    let good_events = [r#"{"choices":[{"delta":{"content":"ok"}}]}"#, "[DONE]"];
    let good = SseReply::new().event(good_events[0]).event(good_events[1]);
    let upstream = SseServer::start(vec![bad.into(), good.into()]).await;
    let gw = start(&[upstream.url()]).await;
    let r = gw.chat(&chat_body(true)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-retryctl-attempts"), Some("2"));
    let text = r.text().await.unwrap();
    assert_eq!(text, SseReply::render_events(&good_events));
    assert!(!text.contains("overloaded"));
    assert_eq!(upstream.hits(), 2);
}

#[tokio::test]
async fn a_client_error_in_the_first_event_is_returned_not_retried() {
    let bad = SseReply::new().event(
        r#"{"error":{"message":"This model's maximum context length is 8192 tokens","code":400}}"#,
    );
    let upstream = SseServer::start(vec![bad.into()]).await;
    let gw = start(&[upstream.url()]).await;
    let r = gw.chat(&chat_body(true)).await;
    assert_eq!(r.status(), 400);
    let body = json(r).await;
    assert_eq!(body["error"]["code"], 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maximum context length")
    );
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn nothing_is_retried_after_the_first_byte() {
    let first = r#"{"choices":[{"delta":{"content":"Hel"}}]}"#;
    let go = Arc::new(Notify::new());
    let broken = SseReply::new().event(first).wait(go.clone()).reset();
    let good = SseReply::new().event("never").event("[DONE]");
    let upstream = SseServer::start(vec![broken.into(), good.into()]).await;
    let gw = start(&[upstream.url()]).await;
    let mut r = gw.chat(&chat_body(true)).await;
    assert_eq!(r.status(), 200);
    // Read until the first event is in the client's hands, then break the
    // upstream.
    let mut got = Vec::new();
    let expected_first = format!("data: {first}\n\n");
    while got.len() < expected_first.len() {
        let chunk = r.chunk().await.expect("no error").expect("more");
        got.extend_from_slice(&chunk);
    }
    assert_eq!(String::from_utf8_lossy(&got), expected_first);
    go.notify_one();
    // The rest: one error event, then a clean end (no transport error).
    while let Some(chunk) = r.chunk().await.expect("the stream ends cleanly") {
        got.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(got).unwrap();
    let rest = text.strip_prefix(&expected_first).unwrap();
    let event: Value = serde_json::from_str(
        rest.strip_prefix("data: ")
            .and_then(|r| r.strip_suffix("\n\n"))
            .unwrap_or_else(|| panic!("{rest:?}")),
    )
    .unwrap();
    assert_eq!(event["error"]["code"], "stream_interrupted");
    assert!(!rest.contains("127.0.0.1"), "{rest}");
    assert_eq!(upstream.hits(), 1, "no retry after the first byte");
}

#[tokio::test]
async fn upstream_4xx_passes_through_with_status_and_body() {
    let body = r#"{"error":{"message":"'messages' is a required property","type":"invalid_request_error","param":"messages","code":null}}"#;
    let upstream = HttpServer::always(
        Reply::status(422)
            .body(body)
            .header("Content-Type", "application/json"),
    )
    .await;
    let gw = start(&[upstream.url()]).await;
    let r = gw.chat(&serde_json::json!({"model": MODEL})).await;
    assert_eq!(r.status(), 422);
    assert_eq!(header(&r, "content-type"), Some("application/json"));
    assert_eq!(header(&r, "x-retryctl-attempts"), Some("1"));
    assert_eq!(r.text().await.unwrap(), body);
    assert_eq!(upstream.hits(), 1, "a client error is never retried");
}

#[tokio::test]
async fn unknown_model_is_404_and_creates_no_metric_series() {
    let upstream = HttpServer::always(Reply::json(COMPLETION)).await;
    // Each test gateway's pool is built under a recorder of its own.
    let gw = start(&[upstream.url()]).await;

    let r = gw
        .chat(&serde_json::json!({"model": "no-such-model-x1", "messages": []}))
        .await;
    assert_eq!(r.status(), 404);
    let body = json(r).await;
    assert_eq!(body["error"]["code"], "model_not_found");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(gw.chat(&chat_body(false)).await.status(), 200);
    assert_eq!(upstream.hits(), 1);

    let rendered = gw.metrics.render();
    assert!(!rendered.contains("no-such-model-x1"), "{rendered}");
    assert!(
        rendered.contains("retryctl_unknown_model_requests_total 1"),
        "{rendered}"
    );
    assert!(
        rendered.contains(&format!("model=\"{MODEL}\"")),
        "{rendered}"
    );
}

#[tokio::test]
async fn oversize_bodies_are_413_declared_or_streamed() {
    let upstream = HttpServer::always(Reply::json(COMPLETION)).await;
    let gw = start_with(
        &config_text(&[upstream.url()], "body_limit = \"1KiB\"", "", ""),
        env_none,
    )
    .await
    .unwrap();
    let big = format!(r#"{{"model":"{MODEL}","pad":"{}"}}"#, "x".repeat(2000));
    let r = gw.post("/v1/chat/completions", big.clone()).await;
    assert_eq!(r.status(), 413);
    assert_eq!(json(r).await["error"]["code"], "request_too_large");
    // chunked: no Content-Length to refuse up front
    let chunks: Vec<Result<String, std::io::Error>> = big
        .as_bytes()
        .chunks(500)
        .map(|c| Ok(String::from_utf8(c.to_vec()).unwrap()))
        .collect();
    let r = gw
        .post(
            "/v1/chat/completions",
            reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)),
        )
        .await;
    assert_eq!(r.status(), 413);
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn bad_requests_are_400_in_openai_shape() {
    let upstream = HttpServer::always(Reply::json(COMPLETION)).await;
    let gw = start(&[upstream.url()]).await;
    for (body, code) in [
        ("{\"model\": ", "invalid_json"),
        ("[1, 2]", "invalid_json"),
        ("{\"model\": 7}", "invalid_json"),
        ("{\"messages\": []}", "missing_model"),
    ] {
        let r = gw.post("/v1/chat/completions", body).await;
        assert_eq!(r.status(), 400, "{body}");
        let v = json(r).await;
        assert_eq!(v["error"]["type"], "invalid_request_error", "{body}");
        assert_eq!(v["error"]["code"], code, "{body}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    // A byte that is not UTF-8 in a field the gateway does not read: JSON
    // is UTF-8, so the body is refused here, not by every upstream.
    let mut body = format!(r#"{{"model":"{MODEL}","messages":[{{"content":"#).into_bytes();
    body.extend_from_slice(b"\"a\xffb\"}]}");
    let offset = body.iter().position(|&b| b == 0xff).unwrap();
    let r = gw.post("/v1/chat/completions", body).await;
    assert_eq!(r.status(), 400);
    let v = json(r).await;
    assert_eq!(v["error"]["code"], "invalid_json");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    let expected = format!("not UTF-8: invalid byte at offset {offset}");
    assert!(message.ends_with(&expected), "{message}");
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn other_routes_and_health() {
    let upstream = HttpServer::always(Reply::json(COMPLETION)).await;
    let gw = start(&[upstream.url()]).await;
    let r = gw.client.get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.text().await.unwrap()),
        (200, "ok".to_owned())
    );
    let r = gw
        .client
        .get(gw.url("/v1/chat/completions"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(header(&r, "allow"), Some("POST"));
    let r = gw.post("/v1/nope", "{}").await;
    assert_eq!(r.status(), 404);
    assert_eq!(json(r).await["error"]["code"], "unknown_url");
    // A path that only starts like an endpoint is not one.
    let r = gw.post("/v1/chat/completions/", "{}").await;
    assert_eq!(r.status(), 404);
    let r = gw.client.head(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = gw.post("/healthz", "{}").await;
    assert_eq!(r.status(), 405);
    assert_eq!(header(&r, "allow"), Some("GET, HEAD"));
    assert_eq!(json(r).await["error"]["code"], "method_not_allowed");
    assert_eq!(upstream.hits(), 0);
}

/// `Gateway::router` is the same gateway inside an application's own axum
/// router: its routes answer as under `serve`, the application's as the
/// application wrote them.
#[tokio::test]
async fn the_router_serves_the_gateway_inside_an_axum_application() {
    let upstream = HttpServer::always(Reply::json(COMPLETION)).await;
    let text = config_text(&[upstream.url()], "metrics_listen = \"off\"", "", "");
    let config = GatewayConfig::from_toml(&text).unwrap();
    let gateway = Gateway::with_env(config, env_none).unwrap();
    let app = axum::Router::new()
        .route("/app", axum::routing::get(|| async { "the application" }))
        .merge(gateway.router());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let http = client();
    let url = |path: &str| format!("http://{addr}{path}");
    let r = http
        .post(url("/v1/chat/completions"))
        .body(chat_body(false).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-retryctl-provider"), Some("p0"));
    assert_eq!(header(&r, "x-retryctl-attempts"), Some("1"));
    assert_eq!(r.text().await.unwrap(), COMPLETION);
    let r = http.get(url("/app")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "the application");
    let r = http.get(url("/healthz")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "ok");
    let r = http.get(url("/v1/embeddings")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    let r = http.get(url("/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(json(r).await["error"]["code"], "unknown_url");
    assert_eq!(upstream.hits(), 1);
    server.abort();
}

#[tokio::test]
async fn all_providers_failed_is_502_with_reason_and_no_upstream_address() {
    let refused = closed_port();
    let failing = HttpServer::always(Reply::status(502).body(format!(
        "bad gateway: backend http://{refused}/v1/chat at 10.20.30.40 and [fd00::7] did not answer"
    )))
    .await;
    let urls = [failing.url(), format!("http://{refused}")];
    // Rounds only: with admission, the refused provider is waited for
    // (`a_provider_that_never_accepts_is_503_admission_timeout`).
    let policy = format!("{POLICY}[admission]\nenabled = false\n");
    let gw = start_with_policy(&policy, &config_text(&urls, "", "", ""), env_none)
        .await
        .unwrap();
    let r = gw.chat(&chat_body(false)).await;
    assert_eq!(r.status(), 502);
    assert_eq!(header(&r, "x-retryctl-attempts"), Some("4"));
    let text = r.text().await.unwrap();
    let body: Value = serde_json::from_str(&text).unwrap();
    let error = &body["error"];
    assert_eq!(error["type"], "upstream_error");
    assert_eq!(error["reason"], "rounds_exhausted");
    assert_eq!(
        (error["attempts"].as_u64(), error["rounds"].as_u64()),
        (Some(4), Some(2))
    );
    let causes: Vec<(String, u64, String)> = error["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["provider"].as_str().unwrap().to_owned(),
                f["round"].as_u64().unwrap(),
                f["cause"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expect = |p: &str, round, cause: &str| (p.to_owned(), round, cause.to_owned());
    assert_eq!(
        causes,
        vec![
            expect("p0", 1, "unavailable"),
            expect("p1", 1, "connect_refused"),
            expect("p0", 2, "unavailable"),
            expect("p1", 2, "connect_refused"),
        ]
    );
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("all providers failed after 4 attempts in 2 rounds"),
        "{message}"
    );
    for leak in [
        "127.0.0.1".to_owned(),
        "10.20.30.40".to_owned(),
        "fd00::7".to_owned(),
        refused.port().to_string(),
        failing.addr().port().to_string(),
    ] {
        assert!(!text.contains(&leak), "{leak} leaked: {text}");
    }
    assert_eq!(failing.hits(), 2);
}

/// `https://` providers go through TLS: a server that accepts the TCP
/// connection and never answers the handshake is a connect timeout (the
/// connect timeout covers the TLS handshake, as reqwest's did), one that
/// answers in plain HTTP is a connect failure. Neither saw the request.
#[tokio::test]
async fn https_providers_handshake_and_a_stalled_handshake_is_a_connect_timeout() {
    use tokio::io::AsyncWriteExt;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut streams = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            streams.push(stream);
        }
    });
    let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain_addr = plain.local_addr().unwrap();
    let answering = tokio::spawn(async move {
        while let Ok((mut stream, _)) = plain.accept().await {
            let _ = stream
                .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                .await;
            let _ = stream.shutdown().await;
        }
    });
    let urls = [
        format!("https://{silent_addr}"),
        format!("https://{plain_addr}"),
    ];
    let policy = format!("{POLICY}[admission]\nenabled = false\n");
    let text = config_text(&urls, "", "connect_timeout = \"200ms\"", "");
    let gw = start_with_policy(&policy, &text, env_none).await.unwrap();
    let started = std::time::Instant::now();
    let r = gw.chat(&chat_body(false)).await;
    assert!(
        started.elapsed() >= Duration::from_millis(390),
        "two rounds of 200 ms"
    );
    let status = r.status();
    let body = json(r).await;
    let causes: Vec<(String, String)> = body["error"]["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["provider"].as_str().unwrap().to_owned(),
                f["cause"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expect = |p: &str, cause: &str| (p.to_owned(), cause.to_owned());
    assert_eq!(
        causes,
        vec![
            expect("p0", "connect_timeout"),
            expect("p1", "connect"),
            expect("p0", "connect_timeout"),
            expect("p1", "connect"),
        ],
        "{body}"
    );
    assert_eq!(status, 502, "{body}");
    held.abort();
    answering.abort();
}

#[tokio::test]
async fn a_provider_that_never_accepts_is_503_admission_timeout() {
    let refused = closed_port();
    // 250 ms of waiting: the first refusal marks the provider down, and
    // the one probe due at 100 ms is refused too; the next (at 300 ms) is
    // past max_wait.
    let policy = format!("{POLICY}[admission]\nenabled = true\nmax_wait = \"250ms\"\n");
    let gw = start_with_policy(
        &policy,
        &config_text(&[format!("http://{refused}")], "", "", ""),
        env_none,
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let r = gw.chat(&chat_body(false)).await;
    let took = started.elapsed();
    assert_eq!(r.status(), 503);
    assert_eq!(header(&r, "retry-after"), Some("1"));
    assert_eq!(header(&r, "x-retryctl-attempts"), Some("2"));
    let body = json(r).await;
    let error = &body["error"];
    assert_eq!(error["reason"], "admission_timeout");
    assert_eq!(error["rounds"].as_u64(), Some(1), "no round was spent");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("did not accept work: waited 25") && message.contains("last error"),
        "{message}"
    );
    assert!(
        (Duration::from_millis(240)..Duration::from_secs(2)).contains(&took),
        "{took:?}"
    );
}

#[tokio::test]
async fn a_long_retry_after_is_503_with_the_header() {
    let upstream = HttpServer::always(Reply::status(503).header("Retry-After", "120")).await;
    let gw = start(&[upstream.url()]).await;
    let r = gw.chat(&chat_body(false)).await;
    assert_eq!(r.status(), 503);
    assert_eq!(header(&r, "retry-after"), Some("120"));
    let body = json(r).await;
    assert_eq!(body["error"]["reason"], "retry_after_too_long");
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn the_request_deadline_is_504() {
    let slow = HttpServer::always(Reply::json(COMPLETION).delay(Duration::from_secs(3))).await;
    let gw = start_with(
        &config_text(&[slow.url()], "request_timeout = \"300ms\"", "", ""),
        env_none,
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let r = gw.chat(&chat_body(false)).await;
    assert_eq!(r.status(), 504);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(json(r).await["error"]["reason"], "deadline_exceeded");
}

#[tokio::test]
async fn a_provider_attempt_timeout_moves_on_to_the_next_provider() {
    let slow = HttpServer::always(Reply::json("{\"slow\":1}").delay(Duration::from_secs(3))).await;
    let fast = HttpServer::always(Reply::json(COMPLETION)).await;
    let text = config_text(
        &[slow.url(), fast.url()],
        "",
        "attempt_timeout = \"200ms\"",
        "",
    );
    let gw = start_with(&text, env_none).await.unwrap();
    let r = gw.chat(&chat_body(false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-retryctl-provider"), Some("p1"));
    assert_eq!(r.text().await.unwrap(), COMPLETION);
}

#[tokio::test]
async fn the_upstream_model_name_is_spliced_into_the_same_bytes() {
    let upstream = HttpServer::always(Reply::json(COMPLETION)).await;
    let text = config_text(
        &[upstream.url()],
        "",
        "",
        "upstream_model = { p0 = \"gpt-oss-120b\" }",
    );
    let gw = start_with(&text, env_none).await.unwrap();
    let body = format!(r#"{{"messages":[{{"model":"inner"}}], "model":"{MODEL}" ,"n":1}}"#);
    let sent = body.len();
    assert_eq!(gw.post("/v1/chat/completions", body).await.status(), 200);
    let request = &upstream.requests()[0];
    let seen = String::from_utf8(request.body.clone()).unwrap();
    assert_eq!(
        seen,
        r#"{"messages":[{"model":"inner"}], "model":"gpt-oss-120b" ,"n":1}"#
    );
    // The length of the body sent, not of the client's.
    let length = seen.len().to_string();
    assert_ne!(length, sent.to_string());
    assert_eq!(request.header("content-length"), Some(length.as_str()));
}

#[tokio::test]
async fn the_api_key_goes_upstream_as_bearer_and_never_comes_back() {
    const KEY: &str = "k3y-0123456789-secret";
    let echo = |status: u16| {
        Reply::status(status)
            .header("Content-Type", "application/json")
            .body(format!(
                r#"{{"error":{{"message":"Incorrect API key provided: {KEY}. Header was Bearer {KEY}"}}}}"#
            ))
    };
    let upstream = HttpServer::start(vec![echo(401), echo(500), echo(500)]).await;
    let text = config_text(
        &[upstream.url()],
        "",
        "api_key_env = \"RETRYCTL_TEST_KEY\"",
        "",
    );
    let env = |name: &str| (name == "RETRYCTL_TEST_KEY").then(|| KEY.to_owned());
    let gw = start_with(&text, env).await.unwrap();

    let r = gw.chat(&chat_body(false)).await;
    assert_eq!(r.status(), 401, "passed through");
    let text = r.text().await.unwrap();
    assert!(!text.contains(KEY), "{text}");
    assert!(
        text.contains("Incorrect API key provided: [redacted]"),
        "{text}"
    );
    serde_json::from_str::<Value>(&text).expect("still JSON");

    let r = gw.chat(&chat_body(false)).await;
    assert_eq!(r.status(), 502, "two 500s: rounds exhausted");
    let text = r.text().await.unwrap();
    assert!(!text.contains(KEY) && !text.contains("k3y"), "{text}");

    for req in upstream.requests() {
        assert_eq!(req.header("authorization"), Some(&*format!("Bearer {KEY}")));
    }
    assert_eq!(upstream.hits(), 3);
}

#[tokio::test]
async fn a_missing_key_variable_is_a_startup_error() {
    let text = config_text(
        &["http://127.0.0.1:9".to_owned()],
        "",
        "api_key_env = \"RETRYCTL_NOT_SET_X\"",
        "",
    );
    let err = start_with(&text, env_none).await.err().expect("refused");
    assert!(matches!(err, GatewayError::MissingApiKey { .. }));
    let message = err.to_string();
    assert!(
        message.contains("RETRYCTL_NOT_SET_X") && message.contains("p0"),
        "{message}"
    );
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests() {
    let slow = HttpServer::always(Reply::json(COMPLETION).delay(Duration::from_millis(400))).await;
    let mut gw = start(&[slow.url()]).await;
    let client = gw.client.clone();
    let url = gw.url("/v1/chat/completions");
    let in_flight = tokio::spawn(async move {
        let r = client
            .post(url)
            .body(chat_body(false).to_string())
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    });
    // Wait until the upstream has the request, then shut down.
    while slow.hits() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let addr = gw.addr;
    gw.stop().await.expect("clean shutdown");
    assert_eq!(in_flight.await.unwrap(), (200, COMPLETION.to_owned()));
    // and nothing listens any more
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn shutdown_gives_up_on_streams_after_the_timeout() {
    let go = Arc::new(Notify::new());
    let endless = SseReply::new().event("{\"n\":1}").wait(go.clone());
    let upstream = SseServer::start(vec![Scripted::Stream(endless)]).await;
    let text = config_text(&[upstream.url()], "shutdown_timeout = \"200ms\"", "", "");
    let mut gw = start_with(&text, env_none).await.unwrap();
    let r = gw.chat(&chat_body(true)).await;
    assert_eq!(r.status(), 200);
    let started = std::time::Instant::now();
    gw.stop().await.expect("returns after the timeout");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(150) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    go.notify_one();
}

#[tokio::test]
async fn policy_file_changes_apply_without_restart() {
    let upstream = HttpServer::start(vec![
        Reply::status(502),
        Reply::json(COMPLETION),
        Reply::status(502),
    ])
    .await;
    let gw = start(&[upstream.url()]).await;
    let r = gw.chat(&chat_body(false)).await;
    assert_eq!(
        (r.status().as_u16(), header(&r, "x-retryctl-attempts")),
        (200, Some("2"))
    );

    // Retries off, by editing the file the gateway was started with.
    let policy = gw.dir.path().join("policy.toml");
    let next = POLICY.replace("max_rounds = 2", "max_rounds = 1");
    let tmp = gw.dir.path().join("policy.toml.new");
    std::fs::write(&tmp, next).unwrap();
    std::fs::rename(&tmp, &policy).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while gw.live.load().policy().max_rounds != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the change was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = gw.chat(&chat_body(false)).await;
    assert_eq!(
        (r.status().as_u16(), header(&r, "x-retryctl-attempts")),
        (502, Some("1"))
    );
    assert_eq!(upstream.hits(), 3);
}

#[tokio::test]
async fn a_bad_policy_file_is_a_startup_error_with_its_line() {
    let text = config_text(&["http://127.0.0.1:9".to_owned()], "", "", "");
    let err = start_with_policy("delay = \"20ms\"\nmax_rounds = 99\n", &text, env_none)
        .await
        .err()
        .expect("refused");
    let message = err.to_string();
    assert!(message.contains("policy.toml:2:"), "{message}");
    assert!(message.contains("max_rounds"), "{message}");
}

#[tokio::test]
async fn the_shipped_config_is_valid_and_needs_its_key() {
    let path = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .join("config/gateway.toml");
    let config = GatewayConfig::load(&path).unwrap();
    assert_eq!(config.listen, retryctl_gateway::DEFAULT_LISTEN);
    assert_eq!(
        config.metrics_listen,
        Some(retryctl_gateway::metrics_endpoint::DEFAULT_ADDR)
    );
    assert_eq!(config.body_limit, retryctl_gateway::DEFAULT_BODY_LIMIT);
    assert_eq!(
        config.policy.as_deref(),
        Some(&*path.parent().unwrap().join("policy.toml"))
    );
    let names: Vec<_> = config.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, [MODEL, "gpt-4o-mini"]);
    let err = Gateway::with_env(config.clone(), env_none).unwrap_err();
    assert!(err.to_string().contains("OPENAI_API_KEY"), "{err}");
    let env = |name: &str| (name == "OPENAI_API_KEY").then(|| "sk-test-not-a-real-key".to_owned());
    let gateway = Gateway::with_env(config, env).unwrap();
    assert_eq!(gateway.stats().len(), 3);
    assert_eq!(
        gateway.redactor().redact("sk-test-not-a-real-key"),
        "[redacted]"
    );
}

/// An upstream that answers each request with `answer` (nothing at all if
/// empty), then holds the connection open; it says what it saw: each
/// request ("request") and each connection's end ("closed").
async fn holding_upstream(
    answer: &'static str,
) -> (String, tokio::sync::mpsc::UnboundedReceiver<&'static str>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", upstream.local_addr().unwrap());
    let (seen, events) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = upstream.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return seen.send("closed"),
                        Ok(n) if buf[..n].starts_with(b"POST ") => {
                            seen.send("request").unwrap();
                            if !answer.is_empty() {
                                conn.write_all(answer.as_bytes()).await.unwrap();
                            }
                        }
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    (url, events)
}

/// Sends a chat request on a new connection of its own, by hand (the
/// test decides when the connection goes).
async fn raw_chat(gw: &TestGateway, stream: bool) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let body = chat_body(stream).to_string();
    let mut client = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    client.write_all(request.as_bytes()).await.unwrap();
    client
}

/// Hangs `client` up once the upstream has the request, and asserts that
/// the upstream's connection closes soon after, and that no other request
/// reaches it.
async fn hang_up_and_see_the_upstream_close(
    client: tokio::net::TcpStream,
    events: &mut tokio::sync::mpsc::UnboundedReceiver<&'static str>,
) {
    let soon = Duration::from_secs(2);
    let request = tokio::time::timeout(soon, events.recv()).await;
    assert_eq!(
        request.expect("the request reached the upstream"),
        Some("request")
    );
    let hung_up = tokio::time::Instant::now();
    drop(client);
    let closed = tokio::time::timeout(soon, events.recv()).await;
    assert_eq!(
        closed.expect("the upstream connection closed"),
        Some("closed")
    );
    assert!(hung_up.elapsed() < soon);
    // No other attempt: nothing more reaches the upstream.
    assert!(events.try_recv().is_err());
}

/// A client that hangs up while its request is at the upstream: the
/// gateway drops the attempt and closes that upstream connection (an LLM
/// server stops generating for nobody), long before the attempt's 5 s
/// limit, and sends the request nowhere else.
#[tokio::test]
async fn a_client_that_hangs_up_closes_the_upstream_request() {
    let (url, mut events) = holding_upstream("").await;
    let gw = start(&[url]).await;
    let client = raw_chat(&gw, false).await;
    hang_up_and_see_the_upstream_close(client, &mut events).await;
}

/// The same in the middle of a stream: the client has its first event,
/// the upstream holds the stream open (generating), the client goes.
#[tokio::test]
async fn a_client_that_hangs_up_mid_stream_closes_the_upstream_stream() {
    use tokio::io::AsyncReadExt;
    const FIRST: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"he\"}}]}\n\n";
    let answer: &'static str = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
             Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{FIRST}\r\n",
            FIRST.len()
        )
        .into_boxed_str(),
    );
    let (url, mut events) = holding_upstream(answer).await;
    let gw = start(&[url]).await;
    let mut client = raw_chat(&gw, true).await;
    // The first event reaches the client.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"he\"") {
        let n = tokio::time::timeout(Duration::from_secs(2), client.read(&mut buf))
            .await
            .expect("the first event")
            .unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    hang_up_and_see_the_upstream_close(client, &mut events).await;
}
