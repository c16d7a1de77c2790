//! One attempt against one provider: everything the pool may retry.
//!
//! The pool retries until the operation returns, so the operation is
//! drawn exactly where a retry stops being safe: **before the first byte
//! reaches the client**. A non-streaming attempt therefore reads the
//! whole upstream body (bounded): a connection reset halfway through it is
//! retried like a refused connect, because the client has seen nothing.
//! A streaming attempt reads up to the first SSE event: an upstream that
//! answers `200` and then reports its failure in the first event
//! (`data: {"error": ...}`) is classified and retried like any other
//! upstream error. What comes after belongs to the client's stream and is
//! never replayed (see [`stream`](super::stream)).
//!
//! For non-streaming completions this makes `timeouts.attempt` cover the
//! whole response, not just its headers. OpenAI-compatible servers send
//! the headers of a non-streaming completion when the completion is done,
//! so the two are the same moment in practice.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use http::header::{
    ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderMap, HeaderValue, USER_AGENT,
};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};

use super::client::UpstreamClient;
use super::keepalive::{KeepAlive, SendError};
use super::redact::{self, Redactor};
use super::request;
use super::stream;
use retryctl::upstream::{self, BODY_SNIPPET_LIMIT, UpstreamError};
use retryctl::{Cause, Classification, Classify, Rules, Verdict};

/// What the gateway calls itself upstream (reqwest sent the same).
const USER_AGENT_TEXT: &str = concat!("retryctl/", env!("CARGO_PKG_VERSION"));

/// The OpenAI-compatible endpoints the gateway serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
}

impl Endpoint {
    /// The path below the provider's base URL (which ends in `/v1`).
    fn suffix(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/chat/completions",
            Endpoint::Completions => "/completions",
            Endpoint::Embeddings => "/embeddings",
        }
    }

    /// The endpoint the gateway serves at `path` (its own routes are the
    /// provider's paths below `/v1`), if any.
    pub(crate) fn at(path: &str) -> Option<Endpoint> {
        let suffix = path.strip_prefix("/v1")?;
        Endpoint::ALL.into_iter().find(|e| e.suffix() == suffix)
    }

    const ALL: [Endpoint; 3] = [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Embeddings,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// Whether the endpoint can stream (embeddings never do).
    pub(crate) fn streams(self) -> bool {
        !matches!(self, Endpoint::Embeddings)
    }
}

/// A provider's URI for each endpoint, built once: an attempt clones one
/// (a few reference counts) instead of formatting and parsing a string
/// (the URL parser was ~5% of the gateway's CPU time under load). Each in
/// absolute form (hyper-util's client takes it) and in origin form, the
/// path alone (what an HTTP/1.1 request line carries, for [`KeepAlive`]).
#[derive(Clone, Debug)]
pub(crate) struct EndpointUrls {
    absolute: [Uri; 3],
    origin: [Uri; 3],
}

impl EndpointUrls {
    /// The base URL (trailing slashes trimmed) followed by each endpoint's
    /// path. The base is the configuration's parsed (and normalized)
    /// `Url`, so its text is a valid URI.
    pub(crate) fn new(base: &url::Url) -> Result<EndpointUrls, String> {
        let base = base.as_str().trim_end_matches('/');
        let [a, b, c] = Endpoint::ALL.map(|e| {
            format!("{base}{}", e.suffix())
                .parse::<Uri>()
                .map_err(|e| e.to_string())
        });
        let absolute = [a?, b?, c?];
        let origin = absolute.clone().map(|uri| {
            uri.path_and_query()
                .map_or_else(|| Uri::from_static("/"), |p| Uri::from(p.clone()))
        });
        Ok(EndpointUrls { absolute, origin })
    }

    /// The endpoint's URI in absolute form.
    pub(crate) fn get(&self, endpoint: Endpoint) -> &Uri {
        &self.absolute[endpoint.index()]
    }

    /// The endpoint's path (origin form).
    fn origin(&self, endpoint: Endpoint) -> &Uri {
        &self.origin[endpoint.index()]
    }
}

/// The headers of a provider's requests, built once: an attempt clones a
/// map (reference counts) instead of inserting (hashing) each header, and
/// the client does not format `Host` per request.
#[derive(Clone, Debug)]
pub(crate) struct RequestHeaders {
    /// `[Accept: application/json, Accept: text/event-stream]`.
    by_accept: [HeaderMap; 2],
}

impl RequestHeaders {
    /// `Content-Type`, `Accept`, `User-Agent`, `Authorization` (`auth`:
    /// `Bearer <key>`, marked sensitive), `Content-Length` (a placeholder,
    /// see [`RequestHeaders::for_body`]) and, for an `http://` base URL,
    /// `Host`.
    ///
    /// `Host` is what hyper-util's client would set from the URI: the
    /// host, and the port when it is not the scheme's default. Only
    /// `http://` providers get it here: they always speak HTTP/1.1 through
    /// [`KeepAlive`], which sends the headers as they are, while an
    /// `https://` one goes through hyper-util's client, which sets `Host`
    /// on HTTP/1.1 and sends the URI's authority on HTTP/2.
    pub(crate) fn new(urls: &EndpointUrls, auth: Option<HeaderValue>) -> RequestHeaders {
        // Every endpoint has the base URL's scheme and authority.
        let base = urls.get(Endpoint::ChatCompletions);
        let host = (base.scheme_str() == Some("http"))
            .then(|| base.host())
            .flatten()
            .and_then(|host| match base.port_u16() {
                Some(port) if port != 80 => HeaderValue::try_from(format!("{host}:{port}")).ok(),
                _ => HeaderValue::from_str(host).ok(),
            });
        let build = |accept: &'static str| {
            let mut headers = HeaderMap::with_capacity(7);
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            headers.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
            headers.insert(ACCEPT, HeaderValue::from_static(accept));
            headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_TEXT));
            if let Some(auth) = &auth {
                headers.insert(AUTHORIZATION, auth.clone());
            }
            if let Some(host) = &host {
                headers.insert(HOST, host.clone());
            }
            headers
        };
        RequestHeaders {
            by_accept: [build("application/json"), build("text/event-stream")],
        }
    }

    /// The headers of one request whose body is `len` bytes long.
    ///
    /// `Content-Length` is set here, in the entry the prebuilt map holds
    /// for it: a copied map has room for exactly its entries, so hyper,
    /// adding the header itself, grew it (a reallocation and a copy, ~310
    /// instructions per proxied request).
    fn for_body(&self, stream: bool, len: usize) -> HeaderMap {
        let mut headers = self.by_accept[usize::from(stream)].clone();
        headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
        headers
    }
}

/// How a provider's requests travel.
#[derive(Clone, Debug)]
pub(crate) enum Transport {
    /// `http://`: HTTP/1.1 connections of the gateway's own pool.
    KeepAlive(Arc<KeepAlive>),
    /// `https://`: hyper-util's client (TLS, ALPN, HTTP/2), boxed: it is
    /// large and shared by reference.
    Client(Box<UpstreamClient>),
}

impl Transport {
    /// `http://` base URLs get a [`KeepAlive`] pool, others a client.
    pub(crate) fn new(
        base: &Uri,
        connector: super::client::Connector,
        idle_timeout: Duration,
    ) -> Transport {
        if base.scheme_str() == Some("http") {
            Transport::KeepAlive(KeepAlive::new(connector, base.clone(), idle_timeout))
        } else {
            Transport::Client(Box::new(super::client::build(connector, idle_timeout)))
        }
    }
}

/// One provider of one model, as the pool hands it to an attempt.
#[derive(Debug)]
pub(crate) struct Provider {
    pub(crate) transport: Transport,
    /// Where each endpoint is.
    pub(crate) urls: EndpointUrls,
    /// The headers of every request to this provider.
    pub(crate) headers: RequestHeaders,
    /// The model name this provider expects, when it differs.
    pub(crate) upstream_model: Option<Arc<str>>,
    pub(crate) attempt_timeout: Option<Duration>,
    pub(crate) redactor: Arc<Redactor>,
}

/// What one client request asks of every attempt.
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) endpoint: Endpoint,
    pub(crate) body: Bytes,
    pub(crate) stream: bool,
    pub(crate) max_response_body: usize,
}

/// A successful attempt: what the client will get.
#[derive(Debug)]
pub(crate) enum Upstreamed {
    /// A complete body.
    Full {
        status: StatusCode,
        content_type: Option<HeaderValue>,
        body: Bytes,
    },
    /// An event stream whose first event has arrived and is not an error.
    Stream {
        status: StatusCode,
        content_type: Option<HeaderValue>,
        /// Every byte read so far: the first event and whatever followed
        /// it in the same reads.
        head: Bytes,
        /// The rest of the stream.
        rest: Incoming,
    },
}

/// Why an attempt failed. Its `Display` is redacted, so the pool's own
/// log lines never carry an upstream URL, address or key either.
#[derive(Debug)]
pub(crate) enum AttemptFailure {
    /// Transport failure or a failing status (body redacted).
    Upstream(UpstreamError),
    /// The stream's first event reported an error.
    ErrorEvent {
        /// The HTTP-like status the error carried, if any.
        status: Option<StatusCode>,
        /// The event's data, redacted and truncated.
        data: String,
    },
    /// The stream ended before its first event.
    StreamEnded,
    /// The response (or the stream's first event) exceeded its limit.
    TooLarge { limit: usize },
    /// The provider's own `attempt_timeout` passed.
    TimedOut(Duration),
    /// No connection to a plain-HTTP provider ([`KeepAlive`]): the request
    /// was never sent.
    Connect(Box<dyn std::error::Error + Send + Sync>),
    /// A plain-HTTP provider's connection failed before the response head.
    Send(hyper::Error),
}

impl AttemptFailure {
    /// The client's error: the request was not sent or no response head
    /// came back. hyper-util's errors carry no URL (reqwest's did, and
    /// lost it to `without_url`); their text is redacted when displayed.
    fn request(e: hyper_util::client::legacy::Error) -> Self {
        AttemptFailure::Upstream(UpstreamError::Request(e))
    }

    fn upstream(e: UpstreamError, redactor: &Redactor) -> Self {
        AttemptFailure::Upstream(match e {
            UpstreamError::Status {
                status,
                retry_after,
                body,
            } => UpstreamError::Status {
                status,
                retry_after,
                body: redactor.redact(&body),
            },
            other => other,
        })
    }

    pub(crate) fn error_event(status: Option<StatusCode>, data: &str, redactor: &Redactor) -> Self {
        let mut data = redactor.redact(data);
        if data.len() > BODY_SNIPPET_LIMIT {
            let mut cut = BODY_SNIPPET_LIMIT;
            while !data.is_char_boundary(cut) {
                cut -= 1;
            }
            data.truncate(cut);
        }
        AttemptFailure::ErrorEvent { status, data }
    }

    pub(crate) fn body_error(e: hyper::Error) -> Self {
        AttemptFailure::Upstream(UpstreamError::Body(e))
    }

    /// Whether this is a timeout of any kind (a connect timeout included).
    pub(crate) fn is_timeout(&self) -> bool {
        match self {
            AttemptFailure::TimedOut(_) => true,
            AttemptFailure::Upstream(e) => e.is_timeout(),
            AttemptFailure::Connect(e) => upstream::timed_out(&**e),
            AttemptFailure::Send(e) => upstream::timed_out(e),
            _ => false,
        }
    }
}

impl fmt::Display for AttemptFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttemptFailure::Upstream(e @ UpstreamError::Status { .. }) => {
                f.write_str(&redact::redact(&e.to_string()))
            }
            AttemptFailure::Upstream(e) => {
                // The whole chain: the top level alone says only "client
                // error (Connect)".
                f.write_str(&redact::redact(&chain(&e.to_string(), e.error_source())))
            }
            AttemptFailure::Connect(e) => f.write_str(&redact::redact(&chain(
                &format!("cannot connect: {e}"),
                e.source(),
            ))),
            AttemptFailure::Send(e) => f.write_str(&redact::redact(&chain(
                &format!("request failed: {e}"),
                std::error::Error::source(e),
            ))),
            AttemptFailure::ErrorEvent { status, data } => {
                f.write_str("the stream's first event is an error")?;
                if let Some(s) = status {
                    write!(f, " (status {})", s.as_u16())?;
                }
                let short: String = data.chars().take(200).collect();
                write!(f, ": {short}")
            }
            AttemptFailure::StreamEnded => {
                f.write_str("the upstream ended the stream before its first event")
            }
            AttemptFailure::TooLarge { limit } => {
                write!(f, "the upstream response exceeds the {limit}-byte limit")
            }
            AttemptFailure::TimedOut(d) => write!(
                f,
                "no response within the provider's attempt_timeout of {}",
                humantime::format_duration(*d)
            ),
        }
    }
}

/// `top` followed by the text of every error below it.
fn chain(top: &str, mut cur: Option<&(dyn std::error::Error + 'static)>) -> String {
    let mut text = top.to_owned();
    while let Some(inner) = cur {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cur = inner.source();
    }
    text
}

impl Classify for AttemptFailure {
    fn classify(&self, rules: &Rules) -> Verdict {
        match self {
            AttemptFailure::Upstream(e) => e.classify(rules),
            AttemptFailure::ErrorEvent {
                status: Some(s),
                data,
            } => rules.status(s.as_u16(), None, data),
            AttemptFailure::ErrorEvent { status: None, data } => rules.text(data),
            // Like a connection closed mid-message: nothing reached the
            // client, the upstream is at fault, waiting may help.
            AttemptFailure::StreamEnded => rules
                .io_kind(std::io::ErrorKind::UnexpectedEof)
                .unwrap_or(Verdict::new(Classification::Transient, Cause::Reset)),
            AttemptFailure::TooLarge { .. } => Verdict::new(Classification::TryNext, Cause::Decode),
            AttemptFailure::TimedOut(_) => rules.response_timeout(),
            AttemptFailure::Connect(e) => rules.hyper_connect(&**e),
            AttemptFailure::Send(e) => rules.hyper_send(e),
        }
    }
}

impl Provider {
    /// The attempt's future for this provider. It owns everything it uses,
    /// so the pool can drop it (cancel) at any point.
    pub(crate) fn attempt(
        &self,
        job: &Job,
        model_span: Option<std::ops::Range<usize>>,
    ) -> impl Future<Output = Result<Upstreamed, AttemptFailure>> + Send + use<> {
        let body = match (&self.upstream_model, model_span) {
            (Some(name), Some(span)) => request::rewrite_model(&job.body, span, name),
            _ => job.body.clone(),
        };
        let length = body.len();
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.headers_mut() = self.headers.for_body(job.stream, length);
        // Lazy either way: nothing happens until the attempt is polled.
        let sending = match &self.transport {
            Transport::KeepAlive(pool) => {
                *request.uri_mut() = self.urls.origin(job.endpoint).clone();
                Ok((pool.clone(), request))
            }
            Transport::Client(client) => {
                *request.uri_mut() = self.urls.get(job.endpoint).clone();
                Err(client.request(request))
            }
        };
        let redactor = self.redactor.clone();
        let stream = job.stream;
        let max = job.max_response_body;
        let limit = self.attempt_timeout;
        async move {
            let work = async move {
                let response = match sending {
                    Ok((pool, request)) => pool.send(request).await.map_err(|e| match e {
                        SendError::Connect(e) => AttemptFailure::Connect(e),
                        SendError::Send(e) => AttemptFailure::Send(e),
                    })?,
                    Err(sending) => sending.await.map_err(AttemptFailure::request)?,
                };
                let response = upstream::check(response)
                    .await
                    .map_err(|e| AttemptFailure::upstream(e, &redactor))?;
                if stream && stream::is_event_stream(response.headers()) {
                    stream::first_event(response, &redactor).await
                } else {
                    read_full(response, max).await
                }
            };
            match limit {
                Some(t) => tokio::time::timeout(t, work)
                    .await
                    .unwrap_or(Err(AttemptFailure::TimedOut(t))),
                None => work.await,
            }
        }
    }
}

/// The next chunk of data of an upstream body (trailers skipped), `None`
/// at its end.
pub(crate) async fn next_chunk(body: &mut Incoming) -> Result<Option<Bytes>, hyper::Error> {
    loop {
        match body.frame().await {
            None => return Ok(None),
            Some(Err(e)) => return Err(e),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    return Ok(Some(data));
                }
            }
        }
    }
}

/// Reads a complete response body of at most `limit` bytes.
async fn read_full(
    response: http::Response<Incoming>,
    limit: usize,
) -> Result<Upstreamed, AttemptFailure> {
    let (parts, mut body) = response.into_parts();
    // A declared Content-Length (hyper's exact size hint) over the limit
    // fails before any byte is read.
    if body.size_hint().exact().is_some_and(|n| n > limit as u64) {
        return Err(AttemptFailure::TooLarge { limit });
    }
    let status = parts.status;
    // A copy (one reference count), not `remove`: taking an entry out of
    // the map rearranges it, and the map is dropped next anyway.
    let content_type = parts.headers.get(CONTENT_TYPE).cloned();
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = next_chunk(&mut body)
        .await
        .map_err(AttemptFailure::body_error)?
    {
        total += chunk.len();
        if total > limit {
            return Err(AttemptFailure::TooLarge { limit });
        }
        chunks.push(chunk);
    }
    let body = match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.swap_remove(0),
        _ => Bytes::from(chunks.concat()),
    };
    Ok(Upstreamed::Full {
        status,
        content_type,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_event_errors_classify_like_statuses_or_text() {
        let rules = Rules::default();
        let r = Redactor::default();
        let e = AttemptFailure::error_event(Some(StatusCode::BAD_GATEWAY), "{}", &r);
        assert_eq!(e.classify(&rules).class, Classification::Transient);
        let e = AttemptFailure::error_event(
            Some(StatusCode::BAD_REQUEST),
            r#"{"error":{"message":"maximum context length is 8192"}}"#,
            &r,
        );
        assert_eq!(e.classify(&rules).class, Classification::Permanent);
        let e = AttemptFailure::error_event(None, "upstream connection reset", &r);
        assert_eq!(e.classify(&rules).class, Classification::Transient);
        let e = AttemptFailure::error_event(None, "something odd", &r);
        assert_eq!(e.classify(&rules).class, Classification::TryNext);
        assert_eq!(
            AttemptFailure::StreamEnded.classify(&rules).class,
            Classification::Transient
        );
    }

    #[test]
    fn endpoints_are_found_by_their_exact_path() {
        assert_eq!(
            Endpoint::at("/v1/chat/completions"),
            Some(Endpoint::ChatCompletions)
        );
        assert_eq!(Endpoint::at("/v1/completions"), Some(Endpoint::Completions));
        assert_eq!(Endpoint::at("/v1/embeddings"), Some(Endpoint::Embeddings));
        for other in [
            "/v1/chat/completions/",
            "/v2/completions",
            "/chat/completions",
            "/v1",
            "",
        ] {
            assert_eq!(Endpoint::at(other), None, "{other:?}");
        }
    }

    /// `Host` as the client would have set it: the port only when it is not
    /// the scheme's default; none for `https://` (HTTP/2 may be chosen).
    #[test]
    fn request_headers_carry_host_for_plain_http_only() {
        let host = |base: &str| {
            let urls = EndpointUrls::new(&url::Url::parse(base).unwrap()).unwrap();
            let headers = RequestHeaders::new(&urls, None);
            let [json, stream] = [false, true].map(|s| headers.for_body(s, 88));
            assert_eq!(json[CONTENT_LENGTH], "88");
            assert_eq!(json.get_all(CONTENT_LENGTH).iter().count(), 1);
            assert_eq!(json[ACCEPT], "application/json");
            assert_eq!(stream[ACCEPT], "text/event-stream");
            assert_eq!(json[USER_AGENT], USER_AGENT_TEXT);
            assert!(json.get(AUTHORIZATION).is_none());
            json.get(HOST).map(|h| h.to_str().unwrap().to_owned())
        };
        assert_eq!(
            host("http://10.0.0.9:8000/v1").as_deref(),
            Some("10.0.0.9:8000")
        );
        assert_eq!(
            host("http://models.internal/v1").as_deref(),
            Some("models.internal")
        );
        assert_eq!(host("http://[::1]:8000/v1").as_deref(), Some("[::1]:8000"));
        assert_eq!(host("https://api.example.com/v1"), None);
        let urls = EndpointUrls::new(&url::Url::parse("http://a/v1").unwrap()).unwrap();
        let mut key = HeaderValue::from_static("Bearer k");
        key.set_sensitive(true);
        let headers = RequestHeaders::new(&urls, Some(key));
        assert!(headers.for_body(false, 0)[AUTHORIZATION].is_sensitive());
    }

    #[test]
    fn display_is_redacted() {
        let r = Redactor::new(["k3y-value".to_owned()]);
        let e = AttemptFailure::error_event(
            None,
            "failed at http://10.0.0.9:8000/v1 with k3y-value from 10.0.0.9",
            &r,
        );
        let shown = e.to_string();
        assert!(
            !shown.contains("10.0.0.9") && !shown.contains("k3y-value"),
            "{shown}"
        );
        let e = AttemptFailure::upstream(
            UpstreamError::Status {
                status: StatusCode::BAD_GATEWAY,
                retry_after: None,
                body: "proxy 192.168.3.4 down".into(),
            },
            &r,
        );
        assert_eq!(
            e.to_string(),
            "upstream returned 502 Bad Gateway: proxy [ip] down"
        );
    }
}
