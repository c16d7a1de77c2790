//! The pool as a tower service inside a real axum router: a client on
//! loopback calls the router, whose handler sends the buffered request
//! through `PoolService`; each provider is a tower service (reqwest to a
//! real loopback upstream). Checks what reaches the upstreams, how often,
//! and what the client gets back.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use retryctl::policy::{LivePolicy, Policy};
use retryctl::upstream::{self, UpstreamError};
use retryctl::{Cause, FailReason, Pool, Rules, Verdict};
use retryctl_testkit::{HttpServer, Reply, closed_port};
use tower::{Service, ServiceExt, service_fn};

const MODEL: &str = "m";

const POLICY: &str = r#"
max_rounds = 2
delay = "10ms"
jitter = 0.0
[timeouts]
connect = "200ms"
attempt = "2s"
request = "10s"
"#;

/// A provider: the request's path and body POSTed to `base`, the answer's
/// body back (5xx and 429 as `UpstreamError`, Retry-After kept).
fn provider(
    client: reqwest::Client,
    base: String,
) -> impl Service<Request<Bytes>, Response = Bytes, Error = UpstreamError, Future: Send>
+ Clone
+ Send
+ Sync
+ 'static {
    service_fn(move |request: Request<Bytes>| {
        let client = client.clone();
        let url = format!("{base}{}", request.uri().path());
        async move {
            let response = client.post(url).body(request.into_body()).send().await?;
            Ok(upstream::check(response).await?.bytes().await?)
        }
    })
}

/// The model is the `x-model` header (a real gateway would read the JSON
/// body; the pool does not care how).
fn model_of(request: &Request<Bytes>) -> &str {
    request
        .headers()
        .get("x-model")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Serves an axum router on loopback whose one route sends the request
/// through `service`; returns its base URL.
async fn serve<S>(service: S) -> String
where
    S: Service<Request<Bytes>, Response = Bytes, Error = retryctl::PoolError<UpstreamError>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send,
{
    async fn handler<S>(State(service): State<S>, request: Request<axum::body::Body>) -> Response
    where
        S: Service<Request<Bytes>, Response = Bytes, Error = retryctl::PoolError<UpstreamError>>
            + Clone,
    {
        let (parts, body) = request.into_parts();
        let Ok(body) = axum::body::to_bytes(body, 1 << 20).await else {
            return StatusCode::PAYLOAD_TOO_LARGE.into_response();
        };
        match service.oneshot(Request::from_parts(parts, body)).await {
            Ok(answer) => answer.into_response(),
            Err(e) if matches!(e.reason, FailReason::UnknownModel { .. }) => {
                (StatusCode::NOT_FOUND, e.to_string()).into_response()
            }
            Err(e) if e.is_client_error() => {
                (StatusCode::BAD_REQUEST, e.to_string()).into_response()
            }
            Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
        }
    }
    let app = axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(handler::<S>))
        .with_state(service);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn pool_of<P>(providers: Vec<(&str, P)>) -> Pool<P> {
    let mut builder =
        Pool::builder().policy(LivePolicy::new(Policy::from_toml(POLICY).unwrap()).unwrap());
    for (name, p) in providers {
        builder = builder.provider(MODEL, name, p);
    }
    builder.build().unwrap()
}

async fn post(router: &str, model: &str, body: &'static str) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(format!("{router}/v1/chat/completions"))
        .header("x-model", model)
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

const BODY: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;

#[tokio::test]
async fn a_refused_provider_falls_back_and_the_request_reaches_the_next_byte_for_byte() {
    let client = reqwest::Client::new();
    let good = HttpServer::always(Reply::json(r#"{"ok":true}"#)).await;
    let refused = format!("http://{}", closed_port());
    let pool = pool_of(vec![
        ("down", provider(client.clone(), refused)),
        ("up", provider(client.clone(), good.url())),
    ]);
    let service = pool.into_service(model_of);
    let router = serve(service.clone()).await;

    let (status, text) = post(&router, MODEL, BODY).await;
    assert_eq!((status, text.as_str()), (200, r#"{"ok":true}"#));
    let seen = good.requests();
    assert_eq!(seen.len(), 1, "one attempt reached the healthy upstream");
    assert_eq!(seen[0].body, BODY.as_bytes(), "the request body, unchanged");
    assert_eq!(seen[0].path, "/v1/chat/completions");
    let stats = service.pool().stats();
    let attempts = |name: &str| {
        stats
            .iter()
            .find(|s| s.provider == name)
            .map(|s| s.recent.attempts)
            .unwrap()
    };
    assert_eq!((attempts("down"), attempts("up")), (1, 1));
}

#[tokio::test]
async fn a_503_is_retried_on_the_same_provider_with_the_request_cloned() {
    let client = reqwest::Client::new();
    let flaky = HttpServer::start(vec![Reply::status(503), Reply::json(r#"{"ok":2}"#)]).await;
    let service = pool_of(vec![("only", provider(client, flaky.url()))]).into_service(model_of);
    let router = serve(service).await;

    let (status, text) = post(&router, MODEL, BODY).await;
    assert_eq!((status, text.as_str()), (200, r#"{"ok":2}"#));
    let seen = flaky.requests();
    assert_eq!(seen.len(), 2, "the first attempt and one retry");
    assert!(
        seen.iter().all(|r| r.body == BODY.as_bytes()),
        "each attempt had the whole body"
    );
}

#[tokio::test]
async fn failures_map_to_statuses_and_a_400_is_not_retried() {
    let client = reqwest::Client::new();
    let rejecting = HttpServer::always(Reply::status(400).body("bad prompt")).await;
    let service = pool_of(vec![("only", provider(client, rejecting.url()))]).into_service(model_of);
    let router = serve(service).await;

    let (status, text) = post(&router, MODEL, BODY).await;
    assert_eq!(status, 400, "{text}");
    assert_eq!(rejecting.hits(), 1, "a client error is not retried");

    let (status, text) = post(&router, "no-such-model", BODY).await;
    assert_eq!(status, 404, "{text}");
    assert!(text.contains("unknown model"), "{text}");
    assert_eq!(rejecting.hits(), 1, "an unknown model reaches no upstream");
}

#[tokio::test]
async fn all_providers_down_is_a_502_after_every_round() {
    let client = reqwest::Client::new();
    let a = format!("http://{}", closed_port());
    let b = format!("http://{}", closed_port());
    let mut policy = Policy::from_toml(POLICY).unwrap();
    policy.admission.enabled = false;
    let service = Pool::builder()
        .policy(LivePolicy::new(policy).unwrap())
        .provider(MODEL, "a", provider(client.clone(), a))
        .provider(MODEL, "b", provider(client, b))
        .build()
        .unwrap()
        .into_service(model_of);
    let router = serve(service.clone()).await;

    let (status, text) = post(&router, MODEL, BODY).await;
    assert_eq!(status, 502, "{text}");
    assert!(text.contains("after 4 attempts in 2 rounds"), "{text}");
    assert!(
        text.contains("Connection refused") || text.contains("refused"),
        "{text}"
    );
}

/// A foreign error type classified by a function given to the builder:
/// no newtype, and the verdict decides what is retried.
#[tokio::test(start_paused = true)]
async fn a_classifier_function_serves_a_foreign_error_type() {
    #[derive(Debug, Clone)]
    struct Status(u16);
    impl std::fmt::Display for Status {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "status {}", self.0)
        }
    }
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counted = calls.clone();
    let flaky = service_fn(move |_: String| {
        let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            if n == 0 {
                Err(Status(503))
            } else {
                Ok("served")
            }
        }
    });
    let mut service = Pool::builder()
        .policy(LivePolicy::new(Policy::from_toml(POLICY).unwrap()).unwrap())
        .provider(MODEL, "p", flaky)
        .classifier(|e: &Status, rules: &Rules| -> Verdict { rules.status(e.0, None, "") })
        .build()
        .unwrap()
        .into_service(|_: &String| MODEL);
    let started = tokio::time::Instant::now();
    let answer = service
        .ready()
        .await
        .unwrap()
        .call("q".to_owned())
        .await
        .unwrap();
    assert_eq!(answer, "served");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(10),
        "the policy's delay, once"
    );

    // A 400 from the same function: permanent, one call, and the verdict
    // names the status.
    let mut rejecting = Pool::builder()
        .provider(
            MODEL,
            "p",
            service_fn(|_: String| async { Err::<&str, _>(Status(400)) }),
        )
        .classifier(|e: &Status, rules: &Rules| rules.status(e.0, None, ""))
        .build()
        .unwrap()
        .into_service(|_: &String| MODEL);
    let err = rejecting
        .ready()
        .await
        .unwrap()
        .call("q".to_owned())
        .await
        .unwrap_err();
    assert_eq!(err.report.attempts, 1);
    assert!(err.is_client_error());
    assert!(err.to_string().contains("status 400"), "{err}");
    assert_eq!(err.report.failures[0].verdict.cause, Cause::ClientError);
}
