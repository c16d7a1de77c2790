//! Glue for HTTP upstreams called with `reqwest`.
//!
//! A pool operation usually sends a request and turns a non-success status
//! into an error the pool can classify. [`UpstreamError`] is that error:
//! either the transport failed (`reqwest::Error`, classified from its
//! `source()` chain) or the upstream answered with a failing status (kept
//! with its Retry-After and the start of the body, so a 5xx caused by the
//! client's own input can be told apart from an upstream fault).
//!
//! # Classifying a response
//!
//! A failing status can reach the classifier three ways, and they do not
//! know the same things:
//!
//! | path | status | Retry-After | body |
//! |---|---|---|---|
//! | [`check`] (then [`UpstreamError`]'s [`Classify`]) | yes | yes | first [`BODY_SNIPPET_LIMIT`] bytes |
//! | `Classify for reqwest::Response` (borrowed, body untouched) | yes | yes | no |
//! | `response.error_for_status()` (then `Classify for reqwest::Error`) | yes | **no** | **no** |
//!
//! `error_for_status()` keeps the status alone: a 429 with `Retry-After: 7`
//! becomes rate-limited with no wait (the policy's `rate_limited_delay`
//! applies instead), a 503 with a Retry-After is retried after the
//! round's delay, a 500 whose body says "model not found" is retried on
//! the same provider instead of moving on, and a 500 caused by the
//! client's input ("failed to fetch image") is retried instead of returned.
//! Use [`check`] when the body may be read; classify the `&Response` when
//! the body must stay untouched (e.g. to stream it to the client anyway).
//!
//! ```no_run
//! use retryctl::{Classify, Rules};
//! use retryctl::upstream::{self, UpstreamError};
//!
//! # async fn f(client: reqwest::Client) -> Result<(), UpstreamError> {
//! let rules = Rules::default();
//! let response = client.post("http://10.0.0.1:8000/v1/chat/completions").send().await?;
//! if !response.status().is_success() {
//!     // Status and Retry-After; the body is still there to forward.
//!     println!("{}", response.classify(&rules));
//! }
//! // Status, Retry-After and the start of the body: a failing response
//! // becomes an UpstreamError, a success passes through.
//! let served = upstream::check(response).await?;
//! # drop(served); Ok(()) }
//! ```

use std::fmt;
use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{Response, StatusCode};

use crate::classify::{Classify, Rules, Verdict};
use crate::policy::Timeouts;

/// How much of a failing response's body is kept for classification and
/// error messages.
pub const BODY_SNIPPET_LIMIT: usize = 4096;

/// A failed upstream call.
#[derive(Debug)]
pub enum UpstreamError {
    /// The request could not be sent or the response could not be read.
    Transport(reqwest::Error),
    /// The upstream answered with a non-success status.
    Status {
        /// The status.
        status: StatusCode,
        /// The parsed Retry-After header, if any.
        retry_after: Option<Duration>,
        /// The start of the body (at most [`BODY_SNIPPET_LIMIT`] bytes).
        body: String,
    },
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamError::Transport(e) => write!(f, "{e}"),
            UpstreamError::Status { status, body, .. } => {
                write!(f, "upstream returned {status}")?;
                if !body.is_empty() {
                    let short: String = body.chars().take(200).collect();
                    write!(f, ": {short}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for UpstreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UpstreamError::Transport(e) => Some(e),
            UpstreamError::Status { .. } => None,
        }
    }
}

impl From<reqwest::Error> for UpstreamError {
    fn from(e: reqwest::Error) -> Self {
        UpstreamError::Transport(e)
    }
}

impl Classify for UpstreamError {
    fn classify(&self, rules: &Rules) -> Verdict {
        match self {
            UpstreamError::Transport(e) => rules.reqwest(e),
            UpstreamError::Status {
                status,
                retry_after,
                body,
            } => rules.status(status.as_u16(), *retry_after, body),
        }
    }

    /// A transport error's `Display` is reqwest's ("error sending request
    /// for url (...)"): its cause is below it.
    fn error_source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UpstreamError::Transport(e) => e.error_source(),
            UpstreamError::Status { .. } => None,
        }
    }
}

/// A response classified by its status and Retry-After header, without
/// reading its body (see the [module docs](self#classifying-a-response)
/// for what the body adds). A success status is not a failure: it is
/// classified like any status the rules do not know (try the next
/// provider, cause `opaque`).
impl Classify for Response {
    fn classify(&self, rules: &Rules) -> Verdict {
        rules.status(self.status().as_u16(), retry_after(self.headers()), "")
    }
}

impl UpstreamError {
    /// The HTTP status, when the upstream answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            UpstreamError::Transport(e) => e.status(),
            UpstreamError::Status { status, .. } => Some(*status),
        }
    }
}

/// Passes a success response through; turns any other status into
/// [`UpstreamError::Status`], reading at most [`BODY_SNIPPET_LIMIT`] bytes
/// of its body.
pub async fn check(response: Response) -> Result<Response, UpstreamError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let retry_after = retry_after(response.headers());
    let body = read_snippet(response).await;
    Err(UpstreamError::Status {
        status,
        retry_after,
        body,
    })
}

async fn read_snippet(mut response: Response) -> String {
    let mut buf = Vec::new();
    while buf.len() < BODY_SNIPPET_LIMIT {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = BODY_SNIPPET_LIMIT - buf.len();
                buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Parses a Retry-After header (delta-seconds or an HTTP-date).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    parse_retry_after(headers.get(RETRY_AFTER)?.to_str().ok()?, SystemTime::now())
}

/// Parses a Retry-After value relative to `now`. A date in the past means
/// "now" (zero); anything unparseable is ignored.
///
/// Delay-seconds is `1*DIGIT` (RFC 9110 §10.2.3): a sign (`+5`, `-3`) or a
/// fraction is not a delay and is ignored. A delay too large for any clock
/// is capped at `u32::MAX` seconds (136 years) rather than ignored: the
/// upstream clearly asked for a long wait, and the pool's
/// `max_retry_after` then refuses to wait for it.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    const CAP: u64 = u32::MAX as u64;
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // All digits: only overflow can fail, and that is "very long".
        let secs = value.parse::<u64>().map_or(CAP, |secs| secs.min(CAP));
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A `reqwest` client builder with the policy's connect timeout set.
///
/// The connect timeout matters: reqwest reports a stuck connect as a
/// *connect* timeout (safe to retry, the upstream never saw the request)
/// only when `connect_timeout` is set; with only an overall timeout it looks
/// like a slow response. The pool applies `timeouts.attempt` itself.
pub fn client_builder(timeouts: &Timeouts) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(timeouts.connect)
        .tcp_nodelay(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
        assert_eq!(parse_retry_after("+5", now), None);
        assert_eq!(parse_retry_after("1.5", now), None);
        let cap = Some(Duration::from_secs(u64::from(u32::MAX)));
        assert_eq!(parse_retry_after("99999999999", now), cap);
        assert_eq!(parse_retry_after(&"9".repeat(40), now), cap);
        assert_eq!(parse_retry_after("", now), None);
    }

    #[test]
    fn status_errors_classify_with_body() {
        let rules = Rules::default();
        let e = UpstreamError::Status {
            status: StatusCode::BAD_GATEWAY,
            retry_after: None,
            body: String::new(),
        };
        assert!(e.classify(&rules).class.is_retryable());
        let e = UpstreamError::Status {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            retry_after: None,
            body: "could not fetch image https://x".into(),
        };
        assert_eq!(e.classify(&rules).class, crate::Classification::Permanent);
    }
}
