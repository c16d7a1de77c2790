//! Glue for HTTP upstreams called with `reqwest` (feature `reqwest`) or
//! with hyper-util's legacy client directly (feature `hyper-client`).
//!
//! A pool operation usually sends a request and turns a non-success status
//! into an error the pool can classify. [`UpstreamError`] is that error:
//! either the transport failed (a `reqwest::Error`, or hyper-util's
//! `client::legacy::Error` and hyper's body error, each classified from
//! its flags and its `source()` chain) or the upstream answered with a
//! failing status (kept with its Retry-After and the start of the body, so
//! a 5xx caused by the client's own input can be told apart from an
//! upstream fault).
//!
//! Both clients meet in one [`check`]: it takes any [`UpstreamResponse`]
//! (a `reqwest::Response`, or an `http::Response` with a hyper body such as
//! the legacy client's `Incoming`), so the status, Retry-After and body
//! snippet rules are the same code whichever client sent the request.
//! [`checked`] puts a client's send and [`check`] in one future, the usual
//! pool operation: `|p| upstream::checked(p.client.post(&p.url).send())`.
//!
//! # Classifying a response
//!
//! A failing status can reach the classifier three ways, and they do not
//! know the same things:
//!
//! | path | status | Retry-After | body |
//! |---|---|---|---|
//! | [`check`] (then [`UpstreamError`]'s [`Classify`]) | yes | yes | first [`BODY_SNIPPET_LIMIT`] bytes |
//! | `Classify for reqwest::Response` or `http::Response<B>` (borrowed, body untouched) | yes | yes | no |
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
//! # #[cfg(feature = "reqwest")] mod example {
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
//! # }
//! ```
//!
//! With hyper-util's legacy client (no redirect or retry layer, no URL
//! parsed per request: the `Uri` is built once), the same steps:
//!
//! ```no_run
//! # #[cfg(feature = "hyper-client")] mod example {
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use retryctl::policy::Timeouts;
//! use retryctl::upstream::{self, UpstreamError};
//!
//! # async fn f() -> Result<(), UpstreamError> {
//! let client: Client<_, String> = Client::builder(TokioExecutor::new())
//!     .build(upstream::http_connector(&Timeouts::default()));
//! let uri: http::Uri = "http://10.0.0.1:8000/v1/chat/completions".parse().unwrap();
//! let request = http::Request::post(uri).body(String::from("{}")).unwrap();
//! // A refused or timed-out connect, a reset: UpstreamError::Request.
//! let response = client.request(request).await?;
//! let served = upstream::check(response).await?;
//! # drop(served); Ok(()) }
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use http::StatusCode;
use http::header::{HeaderMap, RETRY_AFTER};
use hyper::body::Bytes;

use crate::classify::{Classify, Rules, Verdict};
use crate::policy::Timeouts;

/// How much of a failing response's body is kept for classification and
/// error messages.
pub const BODY_SNIPPET_LIMIT: usize = 4096;

/// A failed upstream call.
///
/// Which transport variants exist depends on the crate's features (one per
/// client), so the enum is `#[non_exhaustive]`: a `match` keeps a
/// wildcard arm, and enabling another feature elsewhere in a build never
/// breaks it.
#[derive(Debug)]
#[non_exhaustive]
pub enum UpstreamError {
    /// reqwest could not send the request or read the response.
    #[cfg(feature = "reqwest")]
    Transport(reqwest::Error),
    /// hyper-util's legacy client could not send the request or got no
    /// response head: a failed or timed-out connect, a reset, a request
    /// handed back unsent.
    #[cfg(feature = "hyper-client")]
    Request(hyper_util::client::legacy::Error),
    /// Reading a hyper response body failed (e.g. the connection was
    /// reset or closed before the body was complete).
    #[cfg(feature = "hyper-client")]
    Body(hyper::Error),
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
            #[cfg(feature = "reqwest")]
            UpstreamError::Transport(e) => write!(f, "{e}"),
            #[cfg(feature = "hyper-client")]
            UpstreamError::Request(e) => write!(f, "{e}"),
            #[cfg(feature = "hyper-client")]
            UpstreamError::Body(e) => write!(f, "{e}"),
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
            #[cfg(feature = "reqwest")]
            UpstreamError::Transport(e) => Some(e),
            #[cfg(feature = "hyper-client")]
            UpstreamError::Request(e) => Some(e),
            #[cfg(feature = "hyper-client")]
            UpstreamError::Body(e) => Some(e),
            UpstreamError::Status { .. } => None,
        }
    }
}

#[cfg(feature = "reqwest")]
impl From<reqwest::Error> for UpstreamError {
    fn from(e: reqwest::Error) -> Self {
        UpstreamError::Transport(e)
    }
}

#[cfg(feature = "hyper-client")]
impl From<hyper_util::client::legacy::Error> for UpstreamError {
    fn from(e: hyper_util::client::legacy::Error) -> Self {
        UpstreamError::Request(e)
    }
}

/// A `hyper::Error` where the legacy client is used is a body read's: the
/// client wraps every send failure in its own error type.
#[cfg(feature = "hyper-client")]
impl From<hyper::Error> for UpstreamError {
    fn from(e: hyper::Error) -> Self {
        UpstreamError::Body(e)
    }
}

impl Classify for UpstreamError {
    fn classify(&self, rules: &Rules) -> Verdict {
        match self {
            #[cfg(feature = "reqwest")]
            UpstreamError::Transport(e) => rules.reqwest(e),
            #[cfg(feature = "hyper-client")]
            UpstreamError::Request(e) => rules.hyper_client(e),
            #[cfg(feature = "hyper-client")]
            UpstreamError::Body(e) => rules.hyper_body(e),
            UpstreamError::Status {
                status,
                retry_after,
                body,
            } => rules.status(status.as_u16(), *retry_after, body),
        }
    }

    /// A transport error's `Display` says little (reqwest's "error sending
    /// request for url (...)", hyper-util's "client error (Connect)",
    /// hyper's "error reading a body from connection"): its cause is below
    /// it.
    fn error_source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            #[cfg(feature = "reqwest")]
            UpstreamError::Transport(e) => e.error_source(),
            #[cfg(feature = "hyper-client")]
            UpstreamError::Request(e) => std::error::Error::source(e),
            #[cfg(feature = "hyper-client")]
            UpstreamError::Body(e) => std::error::Error::source(e),
            UpstreamError::Status { .. } => None,
        }
    }
}

impl UpstreamError {
    /// The HTTP status, when the upstream answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            #[cfg(feature = "reqwest")]
            UpstreamError::Transport(e) => e.status(),
            #[cfg(feature = "hyper-client")]
            UpstreamError::Request(_) | UpstreamError::Body(_) => None,
            UpstreamError::Status { status, .. } => Some(*status),
        }
    }

    /// Whether the transport failed on a timeout: reqwest's `is_timeout`,
    /// or for hyper-util's and hyper's errors an `io::Error` of kind
    /// `TimedOut` or a hyper timeout in the chain (a connect timeout
    /// included). A status is never a timeout.
    pub fn is_timeout(&self) -> bool {
        match self {
            #[cfg(feature = "reqwest")]
            UpstreamError::Transport(e) => e.is_timeout(),
            #[cfg(feature = "hyper-client")]
            UpstreamError::Request(e) => crate::classify::timed_out(e),
            #[cfg(feature = "hyper-client")]
            UpstreamError::Body(e) => crate::classify::timed_out(e),
            UpstreamError::Status { .. } => false,
        }
    }
}

/// Whether `err` or an error below it is a timeout: an `io::Error` of kind
/// `TimedOut` or a hyper timeout, as [`UpstreamError::is_timeout`] looks
/// for them in hyper-util's and hyper's errors (for an application that
/// drives hyper's connections itself).
#[cfg(feature = "hyper-client")]
pub fn timed_out(err: &(dyn std::error::Error + 'static)) -> bool {
    crate::classify::timed_out(err)
}

/// A response [`check`] can judge: its status and headers, and its body
/// read a chunk at a time.
///
/// Implemented for `reqwest::Response` (feature `reqwest`) and for
/// `http::Response<B>` with any hyper body `B` (feature `hyper-client`),
/// such as the `Incoming` body hyper-util's legacy client returns. Another
/// client's response type implements it in a few lines and gets the same
/// status, Retry-After and body-snippet rules.
pub trait UpstreamResponse {
    /// The response's status.
    fn status(&self) -> StatusCode;

    /// The response's headers.
    fn headers(&self) -> &HeaderMap;

    /// The next chunk of the body: `None` at its end, and also on a read
    /// error (the snippet of a failing response is what could be read).
    fn next_chunk(&mut self) -> impl Future<Output = Option<Bytes>> + Send;
}

#[cfg(feature = "reqwest")]
impl UpstreamResponse for reqwest::Response {
    fn status(&self) -> StatusCode {
        reqwest::Response::status(self)
    }

    fn headers(&self) -> &HeaderMap {
        reqwest::Response::headers(self)
    }

    async fn next_chunk(&mut self) -> Option<Bytes> {
        self.chunk().await.ok().flatten()
    }
}

#[cfg(feature = "hyper-client")]
impl<B> UpstreamResponse for http::Response<B>
where
    B: hyper::body::Body + Send + Unpin,
{
    fn status(&self) -> StatusCode {
        http::Response::status(self)
    }

    fn headers(&self) -> &HeaderMap {
        http::Response::headers(self)
    }

    fn next_chunk(&mut self) -> impl Future<Output = Option<Bytes>> + Send {
        use hyper::body::Buf;
        use std::pin::Pin;
        use std::task::Poll;

        let body = self.body_mut();
        std::future::poll_fn(move |cx| {
            loop {
                let frame = match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(Ok(frame))) => frame,
                    Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(None),
                };
                // Trailers carry no body bytes: read on.
                if let Ok(mut data) = frame.into_data() {
                    return Poll::Ready(Some(data.copy_to_bytes(data.remaining())));
                }
            }
        })
    }
}

/// The verdict of a status and its Retry-After, the body unread.
fn status_verdict(rules: &Rules, status: StatusCode, headers: &HeaderMap) -> Verdict {
    rules.status(status.as_u16(), retry_after(headers), "")
}

/// A response classified by its status and Retry-After header, without
/// reading its body (see the [module docs](self#classifying-a-response)
/// for what the body adds). A success status is not a failure: it is
/// classified like any status the rules do not know (try the next
/// provider, cause `opaque`).
#[cfg(feature = "reqwest")]
impl Classify for reqwest::Response {
    fn classify(&self, rules: &Rules) -> Verdict {
        status_verdict(rules, self.status(), self.headers())
    }
}

/// A response classified by its status and Retry-After header, without
/// reading its body, as `Classify for reqwest::Response`.
#[cfg(feature = "hyper-client")]
impl<B> Classify for http::Response<B> {
    fn classify(&self, rules: &Rules) -> Verdict {
        status_verdict(rules, self.status(), self.headers())
    }
}

/// Passes a success response through; turns any other status into
/// [`UpstreamError::Status`], reading at most [`BODY_SNIPPET_LIMIT`] bytes
/// of its body. Takes a `reqwest::Response` or an `http::Response` with a
/// hyper body alike ([`UpstreamResponse`]).
pub async fn check<R: UpstreamResponse>(response: R) -> Result<R, UpstreamError> {
    if response.status().is_success() {
        return Ok(response);
    }
    Err(failing(response).await)
}

/// Sends with `sending` (reqwest's `RequestBuilder::send()`, hyper-util's
/// `Client::request`, any future of a response), then [`check`]s the
/// response: a pool operation in one call,
/// `|p| upstream::checked(p.client.post(&p.url).body(body).send())`.
///
/// The same result as `async move { upstream::check(sending.await?).await }`
/// at a smaller cost: that block is a state machine of its own around the
/// client's, whose states are moved into place as it goes (an HTTP
/// request's are hundreds of bytes), while this future is the client's
/// own plus a pointer. A failing status's body is read by a boxed future:
/// the allocation is on the error path only.
pub fn checked<F, R, E>(sending: F) -> Checked<F>
where
    F: Future<Output = Result<R, E>>,
    R: UpstreamResponse + Send + 'static,
    E: Into<UpstreamError>,
{
    Checked {
        sending,
        failing: None,
    }
}

/// A failing status's error, its Retry-After and body snippet read.
type Failing = Pin<Box<dyn Future<Output = UpstreamError> + Send>>;

pin_project_lite::pin_project! {
    /// The future of [`checked`]: the response, or the error of sending or
    /// of its status.
    #[must_use = "futures do nothing unless polled"]
    pub struct Checked<F> {
        #[pin]
        sending: F,
        failing: Option<Failing>,
    }
}

impl<F, R, E> Future for Checked<F>
where
    F: Future<Output = Result<R, E>>,
    R: UpstreamResponse + Send + 'static,
    E: Into<UpstreamError>,
{
    type Output = Result<R, UpstreamError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(failing) = this.failing {
            return failing.as_mut().poll(cx).map(Err);
        }
        let response = match this.sending.poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(response)) => response,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
        };
        if response.status().is_success() {
            return Poll::Ready(Ok(response));
        }
        let failing = this.failing.insert(Box::pin(failing(response)));
        failing.as_mut().poll(cx).map(Err)
    }
}

/// The error of a response whose status is not a success.
async fn failing<R: UpstreamResponse>(response: R) -> UpstreamError {
    let status = response.status();
    let retry_after = retry_after(response.headers());
    let body = read_snippet(response).await;
    UpstreamError::Status {
        status,
        retry_after,
        body,
    }
}

async fn read_snippet<R: UpstreamResponse>(mut response: R) -> String {
    let mut buf = Vec::new();
    while buf.len() < BODY_SNIPPET_LIMIT {
        let Some(chunk) = response.next_chunk().await else {
            break;
        };
        let room = BODY_SNIPPET_LIMIT - buf.len();
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
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
#[cfg(feature = "reqwest")]
pub fn client_builder(timeouts: &Timeouts) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(timeouts.connect)
        .tcp_nodelay(true)
}

/// hyper-util's `HttpConnector` with the policy's connect timeout set and
/// reqwest 0.13's socket defaults, for hyper-util's legacy client.
///
/// The connect timeout matters as it does for `client_builder`: without
/// it a connect to a full accept queue hangs for the kernel's SYN retries
/// and, cut by the pool's `timeouts.attempt`, looks like a slow response;
/// with it the client fails with a connect error whose chain holds an
/// `io::Error` of kind `TimedOut`, which [`Rules::hyper_client`] calls a
/// connect timeout (safe to retry: the upstream never saw the request).
/// Also set: `TCP_NODELAY` (a request is one write, and Nagle's algorithm
/// would hold a small one back), and what reqwest sets by default, so a
/// move from one client to the other changes no socket: TCP keep-alive
/// probes after 15 s idle, every 15 s, 3 of them, and (Linux)
/// `TCP_USER_TIMEOUT` of 30 s. To reach `https://` upstreams, set
/// `enforce_http(false)` and wrap it in a TLS connector (e.g.
/// hyper-rustls's `HttpsConnector`).
#[cfg(feature = "hyper-client")]
pub fn http_connector(timeouts: &Timeouts) -> hyper_util::client::legacy::connect::HttpConnector {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_connect_timeout(Some(timeouts.connect));
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(15)));
    http.set_keepalive_interval(Some(Duration::from_secs(15)));
    http.set_keepalive_retries(Some(3));
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    http.set_tcp_user_timeout(Some(Duration::from_secs(30)));
    http
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

/// hyper-util's legacy client against real faulty sockets on loopback:
/// each transport failure the gateway meets, with the cause it must get.
#[cfg(all(test, feature = "hyper-client"))]
mod hyper_client_tests {
    use std::time::Duration;

    use hyper::body::Incoming;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use retryctl_testkit::http::RequestReader;
    use retryctl_testkit::{HttpServer, Reply, StalledServer, closed_port};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;
    use crate::{Cause, Classification};

    type TestClient = Client<hyper_util::client::legacy::connect::HttpConnector, String>;

    fn client(connect: Duration) -> TestClient {
        let timeouts = Timeouts {
            connect,
            ..Timeouts::default()
        };
        Client::builder(TokioExecutor::new()).build(http_connector(&timeouts))
    }

    async fn send(
        client: &TestClient,
        url: &str,
    ) -> Result<http::Response<Incoming>, UpstreamError> {
        let request = http::Request::post(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(String::from("{}"))
            .unwrap();
        Ok(client.request(request).await?)
    }

    /// Sends, checks the status, and reads the whole body, as the gateway
    /// does: the first failure, classified.
    async fn attempt(client: &TestClient, url: &str) -> UpstreamError {
        let result = async {
            let mut response = check(send(client, url).await?).await?;
            use http_body::Body as _;
            while let Some(frame) =
                std::future::poll_fn(|cx| std::pin::Pin::new(response.body_mut()).poll_frame(cx))
                    .await
            {
                frame?;
            }
            Ok::<(), UpstreamError>(())
        }
        .await;
        result.expect_err("the attempt must fail")
    }

    fn transient(cause: Cause) -> Verdict {
        Verdict::new(Classification::Transient, cause)
    }

    fn verdict(e: &UpstreamError) -> Verdict {
        e.classify(&Rules::default())
    }

    #[tokio::test]
    async fn a_refused_connect_is_connect_refused() {
        let url = format!("http://{}/v1/chat/completions", closed_port());
        let e = attempt(&client(Duration::from_secs(2)), &url).await;
        assert!(
            matches!(&e, UpstreamError::Request(r) if r.is_connect()),
            "{e:?}"
        );
        assert_eq!(verdict(&e), transient(Cause::ConnectRefused), "{e:?}");
        assert!(!e.is_timeout());
        // The Display is only the kind; the cause is below it.
        assert_eq!(e.to_string(), "client error (Connect)");
        let below = e.error_source().expect("a source").to_string();
        assert_eq!(below, "tcp connect error");
    }

    #[tokio::test]
    async fn a_full_accept_queue_is_a_connect_timeout() {
        // listen(1), never accepted, its queue filled: the SYN is dropped,
        // the connect hangs until the connector's timer fires.
        let server = StalledServer::start().await;
        let url = format!("http://{}/v1/chat/completions", server.addr());
        let started = std::time::Instant::now();
        let e = tokio::time::timeout(
            Duration::from_secs(5),
            attempt(&client(Duration::from_millis(200)), &url),
        )
        .await
        .expect("the connect timeout fires, not the test's");
        assert!(started.elapsed() >= Duration::from_millis(190));
        assert!(
            matches!(&e, UpstreamError::Request(r) if r.is_connect()),
            "{e:?}"
        );
        assert_eq!(verdict(&e), transient(Cause::ConnectTimeout), "{e:?}");
        assert!(e.is_timeout());
    }

    #[tokio::test]
    async fn a_reset_after_the_request_is_reset() {
        let server = HttpServer::always(Reply::reset()).await;
        let e = attempt(&client(Duration::from_secs(2)), &server.url()).await;
        assert!(
            matches!(&e, UpstreamError::Request(r) if !r.is_connect()),
            "{e:?}"
        );
        assert_eq!(verdict(&e), transient(Cause::Reset), "{e:?}");
        assert!(!e.is_timeout());
    }

    #[tokio::test]
    async fn a_close_before_the_response_is_reset() {
        // "connection closed before message completed": hyper's
        // incomplete-message flag.
        let server = HttpServer::always(Reply::close()).await;
        let e = attempt(&client(Duration::from_secs(2)), &server.url()).await;
        assert!(matches!(&e, UpstreamError::Request(_)), "{e:?}");
        assert_eq!(verdict(&e), transient(Cause::Reset), "{e:?}");
    }

    /// A server that answers the head and half the body, then closes.
    async fn cut_body_server() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut reader = RequestReader::default();
                if let Ok(Some(_)) = reader.next(&mut stream).await {
                    let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                                content-length: 100\r\n\r\n{\"choices\":";
                    let _ = stream.write_all(head.as_bytes()).await;
                    let _ = stream.shutdown().await;
                }
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn a_body_cut_short_is_a_transient_body_failure() {
        let (addr, task) = cut_body_server().await;
        let url = format!("http://{addr}/v1/chat/completions");
        let e = attempt(&client(Duration::from_secs(2)), &url).await;
        task.abort();
        assert!(matches!(&e, UpstreamError::Body(_)), "{e:?}");
        let v = verdict(&e);
        assert_eq!(v.class, Classification::Transient, "{e:?}");
        // hyper reports a body cut short as an incomplete message.
        assert_eq!(v.cause, Cause::Reset, "{e:?}");
        assert!(!e.is_timeout());
    }

    #[tokio::test]
    async fn a_failing_status_keeps_retry_after_and_body() {
        let server = HttpServer::always(
            Reply::status(503)
                .header("Retry-After", "7")
                .body("engine overloaded"),
        )
        .await;
        let c = client(Duration::from_secs(2));
        let response = send(&c, &server.url()).await.unwrap();
        // Borrowed: status and Retry-After, the body untouched.
        assert_eq!(
            response.classify(&Rules::default()).class,
            Classification::RateLimited {
                retry_after: Some(Duration::from_secs(7))
            }
        );
        let e = check(response).await.expect_err("503");
        match &e {
            UpstreamError::Status {
                status,
                retry_after,
                body,
            } => {
                assert_eq!(status.as_u16(), 503);
                assert_eq!(*retry_after, Some(Duration::from_secs(7)));
                assert_eq!(body, "engine overloaded");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(verdict(&e).cause, Cause::Unavailable);
        // A success passes through with its body unread.
        let ok = HttpServer::always(Reply::json("{}")).await;
        let response = check(send(&c, &ok.url()).await.unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn errors_in_a_chain_are_found() {
        // A gateway's own error wrapping the client's: error_chain finds
        // the legacy error and classifies it the same way.
        let url = format!("http://{}/v1/chat/completions", closed_port());
        let UpstreamError::Request(e) = attempt(&client(Duration::from_secs(2)), &url).await else {
            panic!("not a request error");
        };
        let wrapped = std::io::Error::other(e);
        assert_eq!(
            Rules::default().error_chain(&wrapped),
            transient(Cause::ConnectRefused)
        );
    }
}
