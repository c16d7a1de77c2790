//! What a client sees when a request fails: an HTTP status that says
//! whose fault it was and an OpenAI-style error body that says why.
//!
//! OpenAI SDKs parse `{"error": {"message", "type", "param", "code"}}` and
//! decide from the status whether to retry themselves, so the status must
//! be honest: a client error passed through from the upstream keeps its
//! status (retrying it cannot help), an exhausted retry budget is a 503
//! with a Retry-After when one is known (the client should back off, not
//! hammer), and a deadline is a 504. Failures add `reason`, `attempts`,
//! `rounds` and each failed attempt's provider and cause, so an operator
//! can tell "the provider is down" from "we gave up early" without reading
//! gateway logs.
//!
//! Every message is redacted: upstream URLs, addresses and keys never
//! reach a client.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::Response;
use serde_json::{Map, Value, json};

use super::attempt::AttemptFailure;
use super::redact::Redactor;
use retryctl::upstream::UpstreamError;
use retryctl::{AttemptError, FailReason, PoolError, Report};

/// Headers reporting the pool's accounting on every proxied answer.
///
/// Names are `HeaderName` constants, not `&str`: a string key is parsed
/// and validated byte by byte on every insert (two such names were ~1,200
/// instructions of every proxied request).
pub(crate) const ATTEMPTS_HEADER: HeaderName = HeaderName::from_static("x-retryctl-attempts");
/// See [`ATTEMPTS_HEADER`].
pub(crate) const ROUNDS_HEADER: HeaderName = HeaderName::from_static("x-retryctl-rounds");

/// A JSON response.
pub(crate) fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// An OpenAI-style error: `{"error": {"message", "type", "param", "code", ...extra}}`.
pub(crate) fn openai_error(
    status: StatusCode,
    kind: &str,
    code: Option<&str>,
    message: &str,
    extra: Map<String, Value>,
) -> Response {
    let mut error = Map::new();
    error.insert("message".into(), message.into());
    error.insert("type".into(), kind.into());
    error.insert("param".into(), Value::Null);
    error.insert("code".into(), code.map_or(Value::Null, Value::from));
    error.extend(extra);
    json_response(status, &json!({ "error": error }))
}

/// A client error detected by the gateway itself (bad body, unknown route).
pub(crate) fn invalid_request(status: StatusCode, code: &str, message: &str) -> Response {
    openai_error(
        status,
        "invalid_request_error",
        Some(code),
        message,
        Map::new(),
    )
}

/// Adds the accounting headers.
pub(crate) fn with_report(mut response: Response, report: &Report) -> Response {
    add_report(response.headers_mut(), report);
    response
}

/// Adds the accounting headers to `headers`.
pub(crate) fn add_report(headers: &mut HeaderMap, report: &Report) {
    headers.insert(ATTEMPTS_HEADER, count_value(report.attempts));
    headers.insert(ROUNDS_HEADER, count_value(report.rounds));
}

/// A count as a header value: the common small ones are static (no
/// formatting, no allocation), the rest formatted.
fn count_value(n: u32) -> HeaderValue {
    const SMALL: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    match SMALL.get(n as usize) {
        Some(text) => HeaderValue::from_static(text),
        None => HeaderValue::from(n),
    }
}

/// The status a failed call maps to, the error `type`, and the
/// Retry-After to send (in seconds), if any.
fn failure_status(e: &PoolError<AttemptFailure>) -> (StatusCode, &'static str, Option<u64>) {
    let upstream_retry_after = match e.upstream() {
        Some(AttemptFailure::Upstream(UpstreamError::Status { retry_after, .. })) => *retry_after,
        _ => None,
    };
    let secs = |d: std::time::Duration| d.as_secs() + u64::from(d.subsec_nanos() > 0);
    let timed_out = matches!(e.last, Some(AttemptError::TimedOut(_)))
        || e.upstream().is_some_and(AttemptFailure::is_timeout);
    // The provider said to come back later (a 429, or any status with a
    // Retry-After): the client should back off too.
    let rate_limited = upstream_retry_after.is_some()
        || e.upstream().and_then(upstream_status) == Some(StatusCode::TOO_MANY_REQUESTS);
    match &e.reason {
        FailReason::DeadlineExceeded { .. } => (StatusCode::GATEWAY_TIMEOUT, "timeout_error", None),
        FailReason::BudgetExhausted => (
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable_error",
            upstream_retry_after.map(secs),
        ),
        // The provider was not accepting work for as long as the request
        // could wait (or its queue was full): unavailable, come back soon.
        FailReason::AdmissionTimeout { .. } | FailReason::AdmissionQueueFull => (
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable_error",
            Some(1),
        ),
        FailReason::RetryAfterTooLong { retry_after } => (
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable_error",
            Some(secs(*retry_after)),
        ),
        _ if rate_limited => (
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable_error",
            upstream_retry_after.map(secs),
        ),
        _ if timed_out => (StatusCode::GATEWAY_TIMEOUT, "timeout_error", None),
        _ => (StatusCode::BAD_GATEWAY, "upstream_error", None),
    }
}

fn upstream_status(e: &AttemptFailure) -> Option<StatusCode> {
    match e {
        AttemptFailure::Upstream(u) => u.status(),
        AttemptFailure::ErrorEvent { status, .. } => *status,
        _ => None,
    }
}

/// A body passed through from the upstream: as JSON when it is JSON.
fn passthrough(status: StatusCode, body: String) -> Response {
    let is_json = serde_json::from_str::<serde::de::IgnoredAny>(&body).is_ok();
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    let content_type = if is_json {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The response for a failed pool call.
pub(crate) fn pool_failure(e: &PoolError<AttemptFailure>, redactor: &Redactor) -> Response {
    let report = &e.report;
    let response = match (&e.reason, e.upstream()) {
        (FailReason::UnknownModel { model }, _) => invalid_request(
            StatusCode::NOT_FOUND,
            "model_not_found",
            &redactor.redact(&format!("The model {model:?} does not exist")),
        ),
        // The upstream refused the request itself: its answer, as is.
        (
            FailReason::Permanent,
            Some(AttemptFailure::Upstream(UpstreamError::Status { status, body, .. })),
        ) => passthrough(*status, redactor.redact(body)),
        (FailReason::Permanent, Some(AttemptFailure::ErrorEvent { status, data })) => {
            let status = status.unwrap_or(StatusCode::BAD_REQUEST);
            let data = redactor.redact(data);
            match serde_json::from_str::<Value>(&data) {
                Ok(v) if v.get("error").is_some() => json_response(status, &v),
                _ => openai_error(status, "invalid_request_error", None, &data, Map::new()),
            }
        }
        _ => {
            let (status, kind, retry_after) = failure_status(e);
            let mut extra = Map::new();
            extra.insert("reason".into(), e.reason.as_str().into());
            extra.insert("attempts".into(), report.attempts.into());
            extra.insert("rounds".into(), report.rounds.into());
            // Which provider failed how, in order: names from the
            // configuration and causes from a fixed set, nothing upstream-
            // supplied.
            let failures: Vec<Value> = report
                .failures()
                .iter()
                .map(|f| {
                    json!({
                        "provider": f.provider,
                        "round": f.round,
                        "cause": f.verdict.cause.as_str(),
                    })
                })
                .collect();
            extra.insert("failures".into(), failures.into());
            let message = redactor.redact(&e.to_string());
            let mut response = openai_error(status, kind, Some(e.reason.as_str()), &message, extra);
            if let Some(secs) = retry_after {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            response
        }
    };
    with_report(response, report)
}
