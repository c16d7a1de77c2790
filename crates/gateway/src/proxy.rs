//! The HTTP surface: routes, the request path, and the success responses.
//!
//! One request: read the body (size and time limits), parse `model` and
//! `stream`, then one [`Pool::call_with`] under the request's deadline
//! whose operation is an [attempt](super::attempt). A success is relayed
//! (a complete body, or the first event and then the rest of the stream);
//! a failure becomes an OpenAI-style [error](super::errors).

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use tokio::time::Instant;

use super::attempt::{Endpoint, Job, Provider, Upstreamed};
use super::errors::{self, invalid_request};
use super::redact::Redactor;
use super::request::{self, BodyError, ModelName, RequestHead};
use super::stream::{self, StreamContext};
use retryctl::{CallOptions, FailReason, Pool, Report, Served};

/// The header naming the provider that served a request.
pub(crate) const PROVIDER_HEADER: HeaderName = HeaderName::from_static("x-retryctl-provider");

/// Tells a buffering reverse proxy in front (nginx) to pass a stream's
/// events on as they come.
const ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");

/// What every request handler shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) pool: Pool<Provider>,
    pub(crate) redactor: Arc<Redactor>,
    pub(crate) body_limit: usize,
    pub(crate) max_response_body: usize,
    pub(crate) max_headers: usize,
    pub(crate) request_timeout: Option<Duration>,
    /// Each provider's response headers, built once.
    pub(crate) provider_headers: Vec<(String, ProviderHeaders)>,
}

/// A provider's response headers, built when the gateway starts.
#[derive(Debug)]
pub(crate) struct ProviderHeaders {
    /// Its name as a [`PROVIDER_HEADER`] value.
    name: HeaderValue,
    /// Every header of the most common response, a JSON body served by
    /// this provider at the first attempt: a copy of this map is one
    /// allocation and no hashing, where inserting its four headers one by
    /// one hashed each name (~1,000 instructions per request).
    first_try_json: HeaderMap,
}

impl ProviderHeaders {
    /// `None` for a name that cannot be a header value.
    pub(crate) fn new(provider: &str) -> Option<ProviderHeaders> {
        let name = HeaderValue::from_str(provider).ok()?;
        let mut first_try_json = HeaderMap::with_capacity(4);
        first_try_json.insert(header::CONTENT_TYPE, JSON.clone());
        first_try_json.insert(PROVIDER_HEADER, name.clone());
        let first_try = Report {
            attempts: 1,
            rounds: 1,
            ..Report::default()
        };
        errors::add_report(&mut first_try_json, &first_try);
        Some(ProviderHeaders {
            name,
            first_try_json,
        })
    }
}

/// The content type of a full response the upstream did not label.
const JSON: HeaderValue = HeaderValue::from_static("application/json");

impl Shared {
    fn provider_headers(&self, provider: &str) -> Option<&ProviderHeaders> {
        self.provider_headers
            .iter()
            .find(|(name, _)| name == provider)
            .map(|(_, headers)| headers)
    }
}

/// The gateway's routes, for embedding in a larger `axum` application:
/// every request goes to [`dispatch`], the one place the routes are
/// decided, which [`Gateway::serve`](crate::Gateway::serve) serves
/// directly.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(move |req: Request| dispatch(shared.clone(), req))
}

/// The gateway as a hyper service: [`dispatch`] without axum's router in
/// front. The routes are three fixed paths and a health check, so a match
/// on the path does what the router did, without what the router costs on
/// every request (its path lookup, the URL-parameter map it inserts, the
/// response future it boxes and maps, the `Content-Length` it sets that
/// hyper sets anyway): ~3,000 instructions of a proxied request.
///
/// The request's future is not boxed either: hyper keeps it in the
/// connection's own state (allocated once per connection), where a box
/// cost an allocation of its ~4.6 KiB and a free per request.
pub(crate) fn service(
    shared: Arc<Shared>,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = Response,
    Error = std::convert::Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ 'static {
    hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let shared = shared.clone();
        async move { Ok(dispatch(shared, req).await) }
    })
}

/// Routes one request: `POST` to the three proxied endpoints, `GET` (and
/// `HEAD`) `/healthz`; any other method there is a 405 naming the allowed
/// ones, any other path a 404.
///
/// Generic over the request body: `serve` passes hyper's own (not boxed
/// into `axum`'s `Body`, an allocation and a dynamic call per frame), the
/// router `axum`'s.
pub(crate) async fn dispatch<B>(shared: Arc<Shared>, req: http::Request<B>) -> Response
where
    B: hyper::body::Body<Data = Bytes> + Unpin + Send + 'static,
{
    let path = req.uri().path();
    if let Some(endpoint) = Endpoint::at(path) {
        return if req.method() == Method::POST {
            handle(shared, endpoint, req).await
        } else {
            method_not_allowed(req.method(), "POST")
        };
    }
    if path == "/healthz" {
        return match *req.method() {
            Method::GET | Method::HEAD => "ok".into_response(),
            ref other => method_not_allowed(other, "GET, HEAD"),
        };
    }
    not_found(req.method(), req.uri())
}

fn not_found(method: &Method, uri: &Uri) -> Response {
    let path = uri.path().chars().take(200).collect::<String>();
    invalid_request(
        StatusCode::NOT_FOUND,
        "unknown_url",
        &format!("Invalid URL ({method} {path})"),
    )
}

fn method_not_allowed(method: &Method, allow: &'static str) -> Response {
    let mut response = invalid_request(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("{method} is not allowed here: use {allow}"),
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

async fn handle<B>(shared: Arc<Shared>, endpoint: Endpoint, req: http::Request<B>) -> Response
where
    B: hyper::body::Body<Data = Bytes> + Unpin + Send + 'static,
{
    let start = Instant::now();
    let limit = shared
        .request_timeout
        .unwrap_or_else(|| shared.pool.policy().load().policy().timeouts.request);
    let deadline = start
        .checked_add(limit)
        .unwrap_or(start + Duration::from_secs(86_400));
    if req.headers().len() > shared.max_headers {
        return invalid_request(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "too_many_headers",
            &format!("more than {} request headers", shared.max_headers),
        );
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let body =
        match request::read_body(req.into_body(), declared, shared.body_limit, deadline).await {
            Ok(body) => body,
            Err(BodyError::TooLarge { limit }) => {
                return invalid_request(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request_too_large",
                    &format!("the request body exceeds the gateway's limit of {limit} bytes"),
                );
            }
            Err(BodyError::TimedOut) => {
                return invalid_request(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    "the request body did not arrive within the request's time limit",
                );
            }
            Err(BodyError::Read) => {
                return invalid_request(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    "the request body could not be read",
                );
            }
        };
    let mut job = Job {
        endpoint,
        body,
        stream: false,
        max_response_body: shared.max_response_body,
    };
    // The model name is borrowed from the body the job holds: no copy.
    let model = match RequestHead::parse(&job.body) {
        Ok(RequestHead {
            model: Some(ModelName(model)),
            stream,
        }) => {
            job.stream = endpoint.streams() && stream == Some(true);
            model
        }
        Ok(RequestHead { model: None, .. }) => {
            return invalid_request(
                StatusCode::BAD_REQUEST,
                "missing_model",
                "you must provide a model parameter",
            );
        }
        Err(e) => {
            let message = format!("the request body is not a valid JSON request: {e}");
            return invalid_request(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                &shared.redactor.redact(&message),
            );
        }
    };
    // Found on the first attempt at a provider that renames the model.
    let mut span: Option<Option<Range<usize>>> = None;
    let result = shared
        .pool
        .call_with(&model, CallOptions::deadline(deadline), |p: &Provider| {
            let model_span = match &p.upstream_model {
                Some(_) => span
                    .get_or_insert_with(|| request::model_span(&job.body))
                    .clone(),
                None => None,
            };
            p.attempt(&job, model_span)
        })
        .await;
    match result {
        Ok(served) => {
            tracing::debug!(
                target: "retryctl::gateway",
                model = %model,
                provider = served.provider,
                attempts = served.attempts(),
                rounds = served.rounds(),
                stream = job.stream,
                "served"
            );
            respond(served, deadline, &model, &shared)
        }
        Err(e) => {
            let response = errors::pool_failure(&e, &shared.redactor);
            let client_fault = matches!(
                e.reason,
                FailReason::UnknownModel { .. } | FailReason::Permanent
            );
            if client_fault {
                tracing::debug!(
                    target: "retryctl::gateway",
                    status = response.status().as_u16(),
                    reason = e.reason.as_str(),
                    "request refused"
                );
            } else {
                // The pool has logged the failure with its last error (at
                // warn); this line adds what the client was told.
                tracing::info!(
                    target: "retryctl::gateway",
                    model = %model,
                    status = response.status().as_u16(),
                    reason = e.reason.as_str(),
                    attempts = e.report.attempts,
                    rounds = e.report.rounds,
                    "request failed"
                );
            }
            response
        }
    }
}

/// The client's response for a served call.
fn respond(
    served: Served<Upstreamed>,
    deadline: Instant,
    model: &str,
    shared: &Shared,
) -> Response {
    let report = served.report;
    let provider = served.provider;
    let prebuilt = shared.provider_headers(provider);
    let mut response = match served.value {
        Upstreamed::Full {
            status,
            content_type,
            body,
        } => {
            let mut response = Response::new(Body::from(body));
            *response.status_mut() = status;
            let json = content_type.as_ref().is_none_or(|t| t == JSON);
            if json && report.attempts == 1 && report.rounds == 1 {
                if let Some(headers) = prebuilt {
                    *response.headers_mut() = headers.first_try_json.clone();
                    return response;
                }
            }
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, content_type.unwrap_or(JSON));
            response
        }
        Upstreamed::Stream {
            status,
            content_type,
            head,
            rest,
        } => {
            let context = StreamContext {
                model: model.to_owned(),
                provider,
                redactor: shared.redactor.clone(),
            };
            let body = stream::relay(head, rest, deadline, context);
            let content_type =
                content_type.unwrap_or_else(|| HeaderValue::from_static("text/event-stream"));
            let mut response = (
                status,
                [
                    (header::CONTENT_TYPE, content_type),
                    (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
                ],
                body,
            )
                .into_response();
            response
                .headers_mut()
                .insert(ACCEL_BUFFERING, HeaderValue::from_static("no"));
            response
        }
    };
    let name = match prebuilt {
        Some(headers) => Some(headers.name.clone()),
        None => HeaderValue::from_str(provider).ok(),
    };
    if let Some(name) = name {
        response.headers_mut().insert(PROVIDER_HEADER, name);
    }
    errors::with_report(response, &report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The headers of a response, in the order they are written.
    fn written(headers: &HeaderMap) -> Vec<(String, String)> {
        headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
            .collect()
    }

    #[test]
    fn first_try_headers_are_those_built_one_by_one() {
        let prebuilt = ProviderHeaders::new("primary").unwrap();
        let mut one_by_one = Response::new(Body::empty());
        let headers = one_by_one.headers_mut();
        headers.insert(header::CONTENT_TYPE, JSON);
        headers.insert(PROVIDER_HEADER, HeaderValue::from_static("primary"));
        let report = Report {
            attempts: 1,
            rounds: 1,
            ..Report::default()
        };
        let one_by_one = errors::with_report(one_by_one, &report);
        assert_eq!(
            written(&prebuilt.first_try_json),
            written(one_by_one.headers())
        );
        assert_eq!(
            written(&prebuilt.first_try_json),
            [
                ("content-type", "application/json"),
                ("x-retryctl-provider", "primary"),
                ("x-retryctl-attempts", "1"),
                ("x-retryctl-rounds", "1"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        assert!(ProviderHeaders::new("bad\nname").is_none());
    }
}
