//! Fuzz target `gateway_request`: a client's request body through the
//! reference gateway, end to end.
//!
//! The functions that read the body (`RequestHead::parse` for `model` and
//! `stream`, `model_span` and `rewrite_model` for a provider that renames
//! the model) are `pub(crate)`, so the closest public entry is used:
//! `Gateway::router()`, driven in-process with `tower::ServiceExt::oneshot`
//! (no client socket), whose providers point at a loopback upstream that
//! records what it receives and answers 200 (an event stream when the
//! forwarded body asks for one).
//!
//! Input: the raw request body of `POST /v1/chat/completions`.
//!
//! Checks, against a mirror of the gateway's documented contract
//! (README, "Reference gateway"):
//! * a body that is not a JSON object, or whose `model` or `stream` has
//!   the wrong type, is a 400 and reaches no upstream; no `model` is a
//!   400; an unknown model is a 404;
//! * model `m` (a provider without `upstream_model`) is forwarded byte
//!   for byte;
//! * model `openai/gpt-oss-120b` (a provider with `upstream_model`) is
//!   forwarded with only its `model` value replaced: the forwarded body
//!   parses, names the upstream model, keeps `stream`, and (when the
//!   client's body is plain JSON) equals the client's body with `model`
//!   replaced;
//! * a served request answers 200 with the upstream's body relayed whole.

use std::borrow::Cow;
use std::sync::{Arc, Mutex, OnceLock};

use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use retryctl_gateway::{Gateway, GatewayConfig};
use serde::Deserialize;
use tower::ServiceExt;

/// The model whose provider knows it by another name.
const RENAMED: &str = "openai/gpt-oss-120b";
/// The name that provider knows it by (escapes and non-ASCII on purpose).
const UPSTREAM_NAME: &str = "upstream/\"model\" \u{fc}\\n";
/// The model forwarded as is.
const PLAIN: &str = "m";

const JSON_ANSWER: &str = r#"{"id":"x","choices":[{"message":{"content":"ok"}}]}"#;
const SSE_ANSWER: &str =
    "data: {\"choices\":[{\"delta\":{\"content\":\"ok\"}}]}\n\ndata: [DONE]\n\n";

/// The gateway's view of a body, mirrored: the two fields it reads, with
/// the same types (so the same acceptance) as its `RequestHead`.
#[derive(Debug, Deserialize)]
struct Head<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
}

fn head(body: &[u8]) -> Option<Head<'_>> {
    let first = body
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    if first.and_then(|i| body.get(i)) != Some(&b'{') {
        return None;
    }
    // JSON is UTF-8 (RFC 8259, 8.1), all of it: serde_json's `from_slice`
    // does not check the strings it skips, so the text is checked first,
    // as the gateway does.
    serde_json::from_str(std::str::from_utf8(body).ok()?).ok()
}

struct Harness {
    rt: tokio::runtime::Runtime,
    router: axum::Router,
    received: Arc<Mutex<Vec<Bytes>>>,
    _gateway: Gateway,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let received = Arc::new(Mutex::new(Vec::new()));
        let port = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind the upstream");
            let port = listener.local_addr().expect("address").port();
            let upstream = axum::Router::new()
                .fallback(upstream)
                .with_state(received.clone());
            tokio::spawn(async move {
                let _ = axum::serve(listener, upstream).await;
            });
            port
        });
        let upstream_name = serde_json::to_string(UPSTREAM_NAME).expect("a JSON string");
        let config = GatewayConfig::from_toml(&format!(
            r#"
            metrics_listen = "off"
            request_timeout = "20s"
            [providers.renames]
            base_url = "http://127.0.0.1:{port}/v1"
            [providers.plain]
            base_url = "http://127.0.0.1:{port}/v1"
            [[models]]
            name = "{RENAMED}"
            providers = ["renames"]
            upstream_model = {{ renames = {upstream_name} }}
            [[models]]
            name = "{PLAIN}"
            providers = ["plain"]
            "#
        ))
        .expect("the harness configuration is valid");
        let gateway = Gateway::with_env(config, |_| None).expect("the gateway builds");
        let router = gateway.router();
        Harness {
            rt,
            router,
            received,
            _gateway: gateway,
        }
    })
}

/// The loopback upstream: records the body, answers 200.
async fn upstream(
    axum::extract::State(received): axum::extract::State<Arc<Mutex<Vec<Bytes>>>>,
    body: Bytes,
) -> Response {
    let stream = head(&body).is_some_and(|h| h.stream == Some(true));
    received
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(body);
    if stream {
        ([(header::CONTENT_TYPE, "text/event-stream")], SSE_ANSWER).into_response()
    } else {
        ([(header::CONTENT_TYPE, "application/json")], JSON_ANSWER).into_response()
    }
}

/// One fuzz input.
pub fn run(data: &[u8]) {
    let h = harness();
    h.received.lock().unwrap_or_else(|e| e.into_inner()).clear();
    let request = Request::post("/v1/chat/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(data.to_vec()))
        .expect("a request");
    let (status, body) = h.rt.block_on(async {
        let response = h.router.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("the gateway's body");
        (status, body)
    });
    let received = std::mem::take(&mut *h.received.lock().unwrap_or_else(|e| e.into_inner()));
    let shown = String::from_utf8_lossy(data);

    let Some(client) = head(data) else {
        assert_eq!(status, StatusCode::BAD_REQUEST, "invalid body {shown:?}");
        assert!(
            received.is_empty(),
            "an invalid body reached an upstream: {shown:?}"
        );
        return;
    };
    let expected = match client.model.as_deref() {
        None => Some(StatusCode::BAD_REQUEST),
        Some(RENAMED | PLAIN) => None,
        Some(_) => Some(StatusCode::NOT_FOUND),
    };
    if let Some(expected) = expected {
        assert_eq!(status, expected, "{shown:?}");
        assert!(
            received.is_empty(),
            "a refused body reached an upstream: {shown:?}"
        );
        return;
    }
    assert_eq!(status, StatusCode::OK, "{shown:?}: {body:?}");
    assert_eq!(received.len(), 1, "one attempt for {shown:?}");
    let forwarded = &received[0];
    let streamed = client.stream == Some(true);
    let answer = if streamed { SSE_ANSWER } else { JSON_ANSWER };
    assert_eq!(&body[..], answer.as_bytes(), "relayed answer for {shown:?}");
    if client.model.as_deref() == Some(PLAIN) {
        assert_eq!(&forwarded[..], data, "forwarded byte for byte");
        return;
    }
    let fwd = head(forwarded).unwrap_or_else(|| {
        panic!(
            "the rewritten body does not parse: {shown:?} -> {:?}",
            String::from_utf8_lossy(forwarded)
        )
    });
    assert_eq!(
        fwd.model.as_deref(),
        Some(UPSTREAM_NAME),
        "model not replaced: {shown:?} -> {:?}",
        String::from_utf8_lossy(forwarded)
    );
    assert_eq!(fwd.stream, client.stream, "stream changed: {shown:?}");
    if let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(data) {
        value["model"] = serde_json::Value::from(UPSTREAM_NAME);
        let got: serde_json::Value = serde_json::from_slice(forwarded).expect("parsed above");
        assert_eq!(got, value, "more than `model` changed: {shown:?}");
    }
}
