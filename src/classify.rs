//! What a failed attempt means: retry later, try another provider, or stop.
//!
//! Classification looks at error *kinds* first and text last:
//!
//! 1. an HTTP status (429 is rate-limited, 5xx transient, 4xx the client's);
//! 2. `reqwest::Error` flags, or the connect flag of hyper-util's legacy
//!    client error (`hyper_util::client::legacy::Error`, feature
//!    `hyper-client`): a connect failure or a connect timeout is transient
//!    (the upstream never saw the request); a timeout after the request
//!    was accepted is a *response* timeout, not retried by default; a
//!    request that could not be built (bad URL, scheme or header) is the
//!    caller's bug: permanent, and never held against the provider;
//! 3. `std::io::ErrorKind`s and hyper's flags found by walking the
//!    `source()` chain: every send-time failure displays as "error sending
//!    request for url (...)" (reqwest) or "client error (Connect)",
//!    "client error (SendRequest)" (hyper-util), the cause is only in the
//!    chain;
//! 4. for opaque errors only ([`Rules::text`]): reqwest's own message
//!    forms, then the policy's keywords, matched ASCII-case-insensitively
//!    on the raw text of the whole chain.
//!
//! Gateways classify their own error types by implementing [`Classify`],
//! usually by delegating to [`Rules::error_chain`] or [`Rules::status`].
//! An HTTP response is classified with its status and Retry-After through
//! `Classify for reqwest::Response` (or `http::Response<B>`), or with its
//! body too through `upstream::check`.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::time::Duration;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::policy::ClassifyPolicy;

/// What the pool does after a failed attempt.
///
/// `Display` gives its stable snake_case name (`transient`,
/// `rate_limited`, `try_next`, `permanent`), with the wait when a rate
/// limit named one: `rate_limited, retry after 7s`. Serialized, it is an
/// object tagged by `class`, with the wait in whole milliseconds when there
/// is one: `{"class":"rate_limited","retry_after_ms":7000}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "class", rename_all = "snake_case")]
pub enum Classification {
    /// Try the other providers now; retry this one after the round's delay.
    Transient,
    /// The provider is overloaded (429, or a transient status with a
    /// Retry-After header): retry it no earlier than `retry_after` (when it
    /// said) or the policy's rate-limited delay.
    RateLimited {
        /// The provider's Retry-After, if it sent one.
        #[serde(
            rename = "retry_after_ms",
            with = "retry_after_ms",
            default,
            skip_serializing_if = "Option::is_none"
        )]
        retry_after: Option<Duration>,
    },
    /// This provider cannot serve this request (e.g. model not found, an
    /// unparseable response): try the next provider, never retry this one.
    TryNext,
    /// The request itself is bad: stop now and return the error.
    Permanent,
}

impl Classification {
    /// Whether the same provider may be tried again in a later round.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Classification::Transient | Classification::RateLimited { .. }
        )
    }

    /// A stable snake_case name: `transient`, `rate_limited`, `try_next`,
    /// `permanent` (the `class` of the serialized form).
    pub fn as_str(self) -> &'static str {
        match self {
            Classification::Transient => "transient",
            Classification::RateLimited { .. } => "rate_limited",
            Classification::TryNext => "try_next",
            Classification::Permanent => "permanent",
        }
    }
}

impl fmt::Display for Classification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())?;
        if let Classification::RateLimited {
            retry_after: Some(wait),
        } = self
        {
            write!(f, ", retry after {}", humantime::format_duration(*wait))?;
        }
        Ok(())
    }
}

/// A Retry-After as whole milliseconds (saturating), for the serialized
/// form of [`Classification`].
mod retry_after_ms {
    use super::*;

    pub(super) fn serialize<S: Serializer>(
        wait: &Option<Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match wait {
            Some(wait) => s.serialize_some(&u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

/// The evidence behind a [`Classification`]: a fixed set, used as the
/// metric label and in logs. `Display` and the serialized form are its
/// stable snake_case name ([`Cause::as_str`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Cause {
    /// The connection was refused (nothing listening, backlog overflow).
    ConnectRefused,
    /// Another failure while connecting (DNS, unreachable, reset in handshake).
    Connect,
    /// The connect did not complete in time (a full accept queue).
    ConnectTimeout,
    /// The connection was reset, aborted, or closed mid-message.
    Reset,
    /// The request was handed back unsent (a pooled connection went away).
    NotSent,
    /// An operating-system timeout on an established connection.
    Timeout,
    /// No response headers before the attempt's time limit.
    ResponseTimeout,
    /// No response headers within the adaptive limit (a multiple of the
    /// provider's recent p99): most likely a stalled connection.
    AdaptiveTimeout,
    /// Reading the response body failed.
    Body,
    /// The response could not be decoded (not a transport failure).
    Decode,
    /// An HTTP 5xx other than 502/503.
    Status5xx,
    /// HTTP 502 or 503: the upstream, or the proxy in front of it, could
    /// not take the work (a connection-level signal for admission).
    Unavailable,
    /// A non-5xx status the policy lists as retryable (e.g. 408).
    StatusRetryable,
    /// HTTP 429.
    RateLimited,
    /// A 4xx, a 5xx the policy marks permanent, or a client-error keyword.
    ClientError,
    /// The request could not be built (a bad URL or scheme, an invalid
    /// header): the caller's bug, never sent and never the provider's
    /// fault.
    InvalidRequest,
    /// A status or keyword that means "not served here" (e.g. 404).
    NextProvider,
    /// An opaque error text that matched a transient keyword, or that is
    /// reqwest's bare "error sending request" with no cause after it.
    Keyword,
    /// An opaque error with nothing recognisable in it.
    Opaque,
}

impl Cause {
    /// Every cause, in declaration order (for pre-registering metrics).
    pub const ALL: [Cause; 19] = [
        Cause::ConnectRefused,
        Cause::Connect,
        Cause::ConnectTimeout,
        Cause::Reset,
        Cause::NotSent,
        Cause::Timeout,
        Cause::ResponseTimeout,
        Cause::AdaptiveTimeout,
        Cause::Body,
        Cause::Decode,
        Cause::Status5xx,
        Cause::Unavailable,
        Cause::StatusRetryable,
        Cause::RateLimited,
        Cause::ClientError,
        Cause::InvalidRequest,
        Cause::NextProvider,
        Cause::Keyword,
        Cause::Opaque,
    ];

    /// A stable snake_case name, used as a metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::ConnectRefused => "connect_refused",
            Cause::Connect => "connect",
            Cause::ConnectTimeout => "connect_timeout",
            Cause::Reset => "reset",
            Cause::NotSent => "not_sent",
            Cause::Timeout => "timeout",
            Cause::ResponseTimeout => "response_timeout",
            Cause::AdaptiveTimeout => "adaptive_timeout",
            Cause::Body => "body",
            Cause::Decode => "decode",
            Cause::Status5xx => "status_5xx",
            Cause::Unavailable => "unavailable",
            Cause::StatusRetryable => "status_retryable",
            Cause::RateLimited => "rate_limited",
            Cause::ClientError => "client_error",
            Cause::InvalidRequest => "invalid_request",
            Cause::NextProvider => "next_provider",
            Cause::Keyword => "keyword",
            Cause::Opaque => "opaque",
        }
    }

    /// Whether a failure with this cause says something about the
    /// provider's health. Client errors, "not served here" and rate limits
    /// do not: the provider answered, correctly. Neither does a request
    /// that could not be built: the provider never saw it.
    pub fn is_provider_fault(self) -> bool {
        !matches!(
            self,
            Cause::ClientError | Cause::InvalidRequest | Cause::NextProvider | Cause::RateLimited
        )
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Cause {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Cause {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Cause::ALL
            .into_iter()
            .find(|c| c.as_str() == name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown cause {name:?}")))
    }
}

/// A classification with its cause.
///
/// `Display` is the class, then the cause in parentheses:
/// `transient (connect_refused)`, `rate_limited, retry after 7s
/// (rate_limited)`. Serialized, it is one flat object:
/// `{"class":"rate_limited","retry_after_ms":7000,"cause":"rate_limited"}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Verdict {
    /// What the pool does next.
    #[serde(flatten)]
    pub class: Classification,
    /// Why.
    pub cause: Cause,
}

impl Verdict {
    /// A verdict from its parts.
    pub const fn new(class: Classification, cause: Cause) -> Self {
        Verdict { class, cause }
    }

    const fn transient(cause: Cause) -> Self {
        Verdict::new(Classification::Transient, cause)
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.class, self.cause)
    }
}

/// Implemented by error types the pool can classify.
///
/// Implementations exist for [`std::io::Error`], [`str`]/[`String`]
/// (opaque text) and boxed errors; with the `reqwest` feature for
/// `reqwest::Error`, with the `hyper-client` feature for
/// `hyper_util::client::legacy::Error`, with either for `http::StatusCode`,
/// and, in `retryctl::upstream`, for `reqwest::Response` or
/// `http::Response<B>` (status and headers) and `UpstreamError`.
pub trait Classify {
    /// Classifies `self` under the policy's `rules`.
    fn classify(&self, rules: &Rules) -> Verdict;

    /// The error below what this one's `Display` says, if any. A
    /// [`PoolError`](crate::PoolError)'s message quotes the last error and
    /// then this error and every one below it (`": "`-joined), so a log
    /// line keeps the root cause: reqwest's own text of a refused, reset or
    /// timed-out connect is only "error sending request for url (...)".
    ///
    /// The default is `None` (the `Display` alone). An error type whose
    /// `Display` does not already include its cause returns its
    /// `source()` here.
    fn error_source(&self) -> Option<&(dyn StdError + 'static)> {
        None
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeywordGroup {
    ClientError = 0,
    NextProvider = 1,
    Transient = 2,
}

/// A [`ClassifyPolicy`] compiled for matching: a case-insensitive
/// automaton per keyword list, and status lookup tables.
#[derive(Clone, Debug)]
pub struct Rules {
    /// By [`KeywordGroup`], strongest first (`None`: an empty list).
    keywords: [Option<AhoCorasick>; 3],
    retryable: Vec<u16>,
    permanent: Vec<u16>,
    next_provider: Vec<u16>,
    retry_response_timeout: bool,
}

impl Default for Rules {
    fn default() -> Self {
        Rules::new(&ClassifyPolicy::default())
    }
}

impl Rules {
    /// Compiles a classification policy.
    pub fn new(policy: &ClassifyPolicy) -> Rules {
        let compile = |words: &[String]| {
            if words.is_empty() {
                return None;
            }
            // Validated keywords are short and few; building cannot fail,
            // but a failure must not take the gateway down: match nothing.
            AhoCorasickBuilder::new()
                .ascii_case_insensitive(true)
                .match_kind(MatchKind::LeftmostFirst)
                .build(words)
                .ok()
        };
        let keywords = [
            compile(&policy.client_error_keywords),
            compile(&policy.next_provider_keywords),
            compile(&policy.transient_keywords),
        ];
        Rules {
            keywords,
            retryable: policy.retryable_statuses.clone(),
            permanent: policy.permanent_statuses.clone(),
            next_provider: policy.next_provider_statuses.clone(),
            retry_response_timeout: policy.retry_response_timeout,
        }
    }

    /// The strongest keyword group found in `text`: client error beats
    /// "next provider" beats transient.
    ///
    /// One search per list, strongest first, each stopping at its first
    /// match: at most three linear scans, whatever the lists hold. (One
    /// automaton for all three lists needs every overlapping match to find
    /// the strongest, and their number grows with the text's length times
    /// the keywords that end at each byte: a fuzzed list of many short or
    /// empty keywords took 34 ms over a 60-byte text.)
    fn keyword(&self, text: &str) -> Option<KeywordGroup> {
        [
            KeywordGroup::ClientError,
            KeywordGroup::NextProvider,
            KeywordGroup::Transient,
        ]
        .into_iter()
        .find(|&g| {
            self.keywords[g as usize]
                .as_ref()
                .is_some_and(|ac| ac.is_match(text))
        })
    }

    /// Classifies an opaque error text: an error's `to_string()`, or its
    /// whole chain (`{:#}` of an `anyhow::Error`).
    ///
    /// In this order:
    ///
    /// 1. a client-error keyword anywhere: permanent;
    /// 2. reqwest's own messages, recognised by their fixed forms
    ///    (ASCII-case-insensitively, at a word start, anywhere in the text;
    ///    the URL part is optional):
    ///
    ///    | text | verdict |
    ///    |---|---|
    ///    | `builder error ...` | permanent (`invalid_request`) |
    ///    | `HTTP status client error (429 ...`, `... server error (503 ...` | that status, as [`Rules::status`] with the text as body |
    ///    | `client error (Connect): ...` (a failed connect) | transient: `connect_refused` ("connection refused"), `connect_timeout` ("timed out", "deadline has elapsed"), else `connect` |
    ///    | `client error (Canceled): ...` (handed back unsent) | transient (`not_sent`) |
    ///    | `client error (UserUnsupportedVersion)`, `(UserAbsoluteUriRequired)`, `(UserUnsupportedRequestMethod)` (hyper-util refused the request) | permanent (`invalid_request`) |
    ///    | `error sending request [for url (...)]: operation timed out` (reqwest's own timer) | [`Rules::response_timeout`] |
    ///
    ///    These are the texts of reqwest 0.13 and hyper-util 0.1, checked
    ///    against errors from real sockets in `tests/upstream`;
    /// 3. the next-provider keywords, then the transient keywords;
    /// 4. reqwest's bare "error sending request" or "error decoding
    ///    response body" with nothing after them: transient. That is all
    ///    the `Display` of a refused, reset or timed-out connect says (the
    ///    cause is only in the chain), and most such failures are
    ///    connection-level; a response timeout or a malformed response
    ///    reads the same and is retried too;
    /// 5. anything else is opaque: the next provider is tried.
    pub fn text(&self, text: &str) -> Verdict {
        let keyword = self.keyword(text);
        if keyword == Some(KeywordGroup::ClientError) {
            return Verdict::new(Classification::Permanent, Cause::ClientError);
        }
        if let Some(v) = self.reqwest_text(text) {
            return v;
        }
        match keyword {
            Some(KeywordGroup::NextProvider) => {
                Verdict::new(Classification::TryNext, Cause::NextProvider)
            }
            Some(KeywordGroup::Transient) => Verdict::transient(Cause::Keyword),
            _ if reqwest_bare_failure(text) => Verdict::transient(Cause::Keyword),
            _ => Verdict::new(Classification::TryNext, Cause::Opaque),
        }
    }

    /// The verdict reqwest's own text gives away (step 2 of
    /// [`Rules::text`]).
    fn reqwest_text(&self, text: &str) -> Option<Verdict> {
        if find_form(text, "builder error").is_some() {
            return Some(Verdict::new(
                Classification::Permanent,
                Cause::InvalidRequest,
            ));
        }
        for form in ["http status client error (", "http status server error ("] {
            if let Some(at) = find_form(text, form) {
                let digits = text.get(at + form.len()..at + form.len() + 3);
                if let Some(code) = digits
                    .filter(|d| d.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|d| d.parse::<u16>().ok())
                {
                    return Some(self.status(code, None, text));
                }
            }
        }
        if let Some(at) = find_form(text, "client error (connect)") {
            let detail = &text[at..];
            let cause = if find_form(detail, "connection refused").is_some() {
                Cause::ConnectRefused
            } else if find_form(detail, "timed out").is_some()
                || find_form(detail, "deadline has elapsed").is_some()
            {
                Cause::ConnectTimeout
            } else {
                Cause::Connect
            };
            return Some(Verdict::transient(cause));
        }
        if find_form(text, "client error (canceled)").is_some() {
            return Some(Verdict::transient(Cause::NotSent));
        }
        // hyper-util's `UserUnsupportedVersion`, `UserAbsoluteUriRequired`,
        // `UserUnsupportedRequestMethod`: a request the client refused to
        // send, like reqwest's builder errors.
        if find_form(text, "client error (user").is_some() {
            return Some(Verdict::new(
                Classification::Permanent,
                Cause::InvalidRequest,
            ));
        }
        let detail = after_form(text, "error sending request")?;
        detail
            .trim()
            .eq_ignore_ascii_case("operation timed out")
            .then(|| self.response_timeout())
    }

    /// Classifies an HTTP status, with the provider's Retry-After and (part
    /// of) the response body when the caller has them.
    pub fn status(&self, code: u16, retry_after: Option<Duration>, body: &str) -> Verdict {
        if code == 429 {
            return Verdict::new(
                Classification::RateLimited { retry_after },
                Cause::RateLimited,
            );
        }
        let keyword = if body.is_empty() {
            None
        } else {
            self.keyword(body)
        };
        if keyword == Some(KeywordGroup::ClientError) || self.permanent.contains(&code) {
            return Verdict::new(Classification::Permanent, Cause::ClientError);
        }
        if self.next_provider.contains(&code) || keyword == Some(KeywordGroup::NextProvider) {
            return Verdict::new(Classification::TryNext, Cause::NextProvider);
        }
        // A transient status that says when to come back is treated like a
        // rate limit: the wait honours its Retry-After.
        let transient = |cause| match retry_after {
            Some(_) => Verdict::new(Classification::RateLimited { retry_after }, cause),
            None => Verdict::transient(cause),
        };
        if self.retryable.contains(&code) {
            return transient(Cause::StatusRetryable);
        }
        match code {
            502 | 503 => transient(Cause::Unavailable),
            500..=599 => transient(Cause::Status5xx),
            400..=499 => Verdict::new(Classification::Permanent, Cause::ClientError),
            _ => Verdict::new(Classification::TryNext, Cause::Opaque),
        }
    }

    /// The verdict for an attempt that got no response headers in time.
    pub fn response_timeout(&self) -> Verdict {
        if self.retry_response_timeout {
            Verdict::transient(Cause::ResponseTimeout)
        } else {
            Verdict::new(Classification::TryNext, Cause::ResponseTimeout)
        }
    }

    /// Classifies an io error kind, if the kind means anything.
    #[inline]
    pub fn io_kind(&self, kind: io::ErrorKind) -> Option<Verdict> {
        use io::ErrorKind as K;
        let cause = match kind {
            K::ConnectionRefused => Cause::ConnectRefused,
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
                Cause::Reset
            }
            K::NotConnected | K::AddrNotAvailable | K::HostUnreachable | K::NetworkUnreachable => {
                Cause::Connect
            }
            K::TimedOut => Cause::Timeout,
            _ => return None,
        };
        Some(Verdict::transient(cause))
    }

    /// Classifies any error by walking its `source()` chain: a
    /// `reqwest::Error`, a hyper-util legacy client error, an `io::Error`
    /// or a hyper error anywhere in the chain decides; otherwise the
    /// keywords on the whole chain's text.
    pub fn error_chain(&self, err: &(dyn StdError + 'static)) -> Verdict {
        let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
        while let Some(e) = cur {
            #[cfg(feature = "reqwest")]
            if let Some(r) = e.downcast_ref::<reqwest::Error>() {
                return self.reqwest(r);
            }
            #[cfg(feature = "hyper-client")]
            if let Some(h) = e.downcast_ref::<hyper_util::client::legacy::Error>() {
                return self.hyper_client(h);
            }
            if let Some(v) = self.kind_of(e) {
                return v;
            }
            cur = next_in_chain(e);
        }
        self.text(&chain_text(err))
    }

    /// One level of the chain: an io kind or a hyper flag.
    fn kind_of(&self, e: &(dyn StdError + 'static)) -> Option<Verdict> {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return self.io_kind(io.kind());
        }
        #[cfg(any(feature = "reqwest", feature = "hyper-client"))]
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_canceled() {
                return Some(Verdict::transient(Cause::NotSent));
            }
            if h.is_incomplete_message() {
                return Some(Verdict::transient(Cause::Reset));
            }
            if h.is_timeout() {
                return Some(self.response_timeout());
            }
        }
        None
    }

    /// The first io kind or hyper flag below `err` that means something.
    #[cfg(any(feature = "reqwest", feature = "hyper-client"))]
    fn cause_below(&self, err: &(dyn StdError + 'static)) -> Option<Verdict> {
        let mut cur = next_in_chain(err);
        while let Some(e) = cur {
            if let Some(v) = self.kind_of(e) {
                return Some(v);
            }
            cur = next_in_chain(e);
        }
        None
    }

    /// Classifies a reqwest error (see the module docs for the order).
    #[cfg(feature = "reqwest")]
    pub fn reqwest(&self, err: &reqwest::Error) -> Verdict {
        if let Some(status) = err.status() {
            return self.status(status.as_u16(), None, "");
        }
        // A bad URL, scheme or header: the request was never sent, and no
        // provider (nor any wait) can make it valid.
        if err.is_builder() {
            return Verdict::new(Classification::Permanent, Cause::InvalidRequest);
        }
        if err.is_connect() {
            if err.is_timeout() {
                return Verdict::transient(Cause::ConnectTimeout);
            }
            return self.connect_failure(err);
        }
        // A timeout while waiting for headers or reading the body: the
        // upstream had the request. Checked before decode, which reqwest
        // also reports for a body cut short by its timer.
        if err.is_timeout() {
            return self.response_timeout();
        }
        if let Some(v) = self.cause_below(err) {
            return v;
        }
        if err.is_body() {
            return Verdict::transient(Cause::Body);
        }
        if err.is_decode() {
            return Verdict::new(Classification::TryNext, Cause::Decode);
        }
        self.text(&chain_text(err))
    }

    /// A connect that failed, by what is below it: refused (or reset in
    /// the handshake) as found, an OS or connector timeout as a connect
    /// timeout, anything else (DNS, unreachable, TLS) as `connect`. All
    /// transient: the upstream never saw the request.
    #[cfg(any(feature = "reqwest", feature = "hyper-client"))]
    fn connect_failure(&self, err: &(dyn StdError + 'static)) -> Verdict {
        connect_verdict(self.cause_below(err))
    }

    /// Classifies an error of hyper-util's legacy client (what
    /// `Client::request` fails with), as [`Rules::reqwest`] classifies
    /// reqwest's (which wraps this same error), step for step:
    ///
    /// * a connect error (`is_connect`): a timeout anywhere below it
    ///   (`HttpConnector::set_connect_timeout` leaves an `io::Error` of
    ///   kind `TimedOut`) is `connect_timeout`, refused is
    ///   `connect_refused`, anything else (DNS, unreachable, TLS)
    ///   `connect`; all transient: the upstream never saw the request;
    /// * a timeout anywhere below a send error (an `io::Error` of kind
    ///   `TimedOut` on the established connection, hyper's own timer): a
    ///   response timeout, as reqwest's `is_timeout` makes it;
    /// * otherwise the first io kind or hyper flag in the chain: a reset
    ///   or a connection closed mid-message is `reset`, a request handed
    ///   back unsent (a pooled connection went away) `not_sent`;
    /// * otherwise the text of the chain (a request the client refused to
    ///   send, `client error (User...)`, is the caller's: permanent).
    #[cfg(feature = "hyper-client")]
    pub fn hyper_client(&self, err: &hyper_util::client::legacy::Error) -> Verdict {
        if err.is_connect() {
            self.hyper_connect(err)
        } else {
            self.hyper_send(err)
        }
    }

    /// Classifies a failed connect (the upstream never saw the request),
    /// whatever its error type (a connector's, as hyper's connection API
    /// leaves it; [`Rules::hyper_client`] uses it for the legacy client's
    /// connect errors): a timeout anywhere in the chain is
    /// `connect_timeout`, refused `connect_refused`, a reset `reset`,
    /// anything else (DNS, unreachable, TLS) `connect`; all transient.
    #[cfg(feature = "hyper-client")]
    pub fn hyper_connect(&self, err: &(dyn StdError + 'static)) -> Verdict {
        if timed_out(err) {
            return Verdict::transient(Cause::ConnectTimeout);
        }
        match self.kind_of(err) {
            Some(v) => connect_verdict(Some(v)),
            None => self.connect_failure(err),
        }
    }

    /// Classifies a request that failed on an established connection
    /// before its response head arrived (hyper's `SendRequest` error, or
    /// the legacy client's wrapping one): a timeout anywhere in the chain
    /// is a response timeout; then the first io kind or hyper flag in it
    /// (a reset or a connection closed mid-message is `reset`, a request
    /// handed back unsent `not_sent`); otherwise the chain's text.
    #[cfg(feature = "hyper-client")]
    pub fn hyper_send(&self, err: &(dyn StdError + 'static)) -> Verdict {
        if timed_out(err) {
            return self.response_timeout();
        }
        if let Some(v) = self.kind_of(err).or_else(|| self.cause_below(err)) {
            return v;
        }
        self.text(&chain_text(err))
    }

    /// Classifies a failed read of a hyper response body (the response
    /// head had arrived), as [`Rules::reqwest`] classifies a reqwest body
    /// error: a timeout anywhere in it is a response timeout, then its
    /// own flags and the io kind below it (a reset, or a body cut short,
    /// is `reset`), else transient with cause `body`.
    #[cfg(feature = "hyper-client")]
    pub fn hyper_body(&self, err: &hyper::Error) -> Verdict {
        if timed_out(err) {
            return self.response_timeout();
        }
        self.kind_of(err)
            .or_else(|| self.cause_below(err))
            .unwrap_or(Verdict::transient(Cause::Body))
    }
}

/// A connect failure's verdict from the first io kind or hyper flag of its
/// chain that means something (`None`: none did).
#[cfg(any(feature = "reqwest", feature = "hyper-client"))]
fn connect_verdict(found: Option<Verdict>) -> Verdict {
    match found {
        Some(v) if matches!(v.cause, Cause::ConnectRefused | Cause::Reset) => v,
        Some(v) if v.cause == Cause::Timeout => Verdict::transient(Cause::ConnectTimeout),
        _ => Verdict::transient(Cause::Connect),
    }
}

/// Whether `err` or an error below it is a timeout: an `io::Error` of kind
/// `TimedOut` or a hyper timeout (what reqwest's `is_timeout` looks for
/// besides its own timer's error).
#[cfg(feature = "hyper-client")]
pub(crate) fn timed_out(err: &(dyn StdError + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::TimedOut)
            || e.downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_timeout)
        {
            return true;
        }
        cur = next_in_chain(e);
    }
    false
}

/// Whether `text` ends with reqwest's bare message of a failed send or
/// body read: "error sending request" or "error decoding response body"
/// (each with or without " for url (...)"), no cause after it.
fn reqwest_bare_failure(text: &str) -> bool {
    ["error sending request", "error decoding response body"]
        .into_iter()
        .any(|form| after_form(text, form).is_some_and(|rest| rest.trim().is_empty()))
}

/// Where `form` (ASCII, lower case) first occurs in `text`, ignoring ASCII
/// case, at the start of a word (not preceded by a letter or digit).
fn find_form(text: &str, form: &str) -> Option<usize> {
    let (hay, needle) = (text.as_bytes(), form.as_bytes());
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    (0..=hay.len() - needle.len()).find(|&at| {
        (at == 0 || !hay[at - 1].is_ascii_alphanumeric())
            && hay[at..at + needle.len()].eq_ignore_ascii_case(needle)
    })
}

/// What follows reqwest's message `form` in `text`: the text after it and
/// after its optional " for url (...)", with the ": " that joins the next
/// error of a chain removed. A URL holds no whitespace, so it ends at the
/// last ")" before the next whitespace.
fn after_form<'t>(text: &'t str, form: &str) -> Option<&'t str> {
    // `form` is ASCII: every offset below is a char boundary.
    let mut rest = &text[find_form(text, form)? + form.len()..];
    const URL: &str = " for url (";
    if rest
        .get(..URL.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(URL))
    {
        let url = &rest[URL.len()..];
        let run = &url[..url.find(char::is_whitespace).unwrap_or(url.len())];
        if let Some(close) = run.rfind(')') {
            rest = &url[close + 1..];
        }
    }
    Some(rest.strip_prefix(':').unwrap_or(rest))
}

/// The next error below `e`. An `io::Error` wrapping a custom error
/// reports that error's *source* as its own, skipping the wrapped error
/// itself: step into it with `get_ref` instead.
fn next_in_chain<'e>(e: &'e (dyn StdError + 'static)) -> Option<&'e (dyn StdError + 'static)> {
    if let Some(inner) = e.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
        return Some(inner);
    }
    e.source()
}

/// The raw text of an error and all its sources, joined by ": ".
pub(crate) fn chain_text(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut cur = next_in_chain(err);
    while let Some(e) = cur {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cur = next_in_chain(e);
    }
    text
}

#[cfg(feature = "reqwest")]
impl Classify for reqwest::Error {
    fn classify(&self, rules: &Rules) -> Verdict {
        rules.reqwest(self)
    }

    fn error_source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source()
    }
}

impl Classify for io::Error {
    #[inline]
    fn classify(&self, rules: &Rules) -> Verdict {
        // The chain's first link is this error, which is neither a reqwest
        // nor a hyper-util error: a kind that means something is what
        // `error_chain` would decide on first. Checked here without the
        // walk's downcasts, for the errors a connect most often ends with.
        if let Some(v) = rules.io_kind(self.kind()) {
            return v;
        }
        rules.error_chain(self)
    }

    // An io::Error wrapping a custom error displays that error, and
    // reports the custom error's source as its own.
    fn error_source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source()
    }
}

#[cfg(feature = "hyper-client")]
impl Classify for hyper_util::client::legacy::Error {
    fn classify(&self, rules: &Rules) -> Verdict {
        rules.hyper_client(self)
    }

    /// Its `Display` is only the kind ("client error (Connect)").
    fn error_source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source()
    }
}

#[cfg(any(feature = "reqwest", feature = "hyper-client"))]
impl Classify for http::StatusCode {
    fn classify(&self, rules: &Rules) -> Verdict {
        rules.status(self.as_u16(), None, "")
    }
}

impl Classify for str {
    fn classify(&self, rules: &Rules) -> Verdict {
        rules.text(self)
    }
}

impl Classify for String {
    fn classify(&self, rules: &Rules) -> Verdict {
        rules.text(self)
    }
}

impl Classify for Box<dyn StdError + Send + Sync> {
    fn classify(&self, rules: &Rules) -> Verdict {
        rules.error_chain(self.as_ref())
    }

    fn error_source(&self) -> Option<&(dyn StdError + 'static)> {
        self.as_ref().source()
    }
}

impl<T: Classify + ?Sized> Classify for &T {
    fn classify(&self, rules: &Rules) -> Verdict {
        (**self).classify(rules)
    }

    fn error_source(&self) -> Option<&(dyn StdError + 'static)> {
        (**self).error_source()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules::default()
    }

    #[test]
    fn statuses() {
        let r = rules();
        let v = r.status(429, Some(Duration::from_secs(3)), "");
        assert_eq!(
            v.class,
            Classification::RateLimited {
                retry_after: Some(Duration::from_secs(3))
            }
        );
        assert_eq!(r.status(502, None, "").class, Classification::Transient);
        assert_eq!(r.status(502, None, "").cause, Cause::Unavailable);
        assert_eq!(r.status(503, None, "").cause, Cause::Unavailable);
        assert_eq!(r.status(500, None, "").cause, Cause::Status5xx);
        let v = r.status(503, Some(Duration::from_secs(2)), "");
        assert_eq!(
            v,
            Verdict::new(
                Classification::RateLimited {
                    retry_after: Some(Duration::from_secs(2))
                },
                Cause::Unavailable
            )
        );
        assert_eq!(r.status(408, None, "").class, Classification::Transient);
        assert_eq!(r.status(400, None, "").class, Classification::Permanent);
        assert_eq!(r.status(401, None, "").class, Classification::Permanent);
        assert_eq!(r.status(404, None, "").class, Classification::TryNext);
        assert_eq!(r.status(501, None, "").class, Classification::Permanent);
        // a 5xx caused by the client's own input
        let v = r.status(500, None, "upstream: Failed To Fetch Image from url");
        assert_eq!(v.class, Classification::Permanent);
        assert_eq!(v.cause, Cause::ClientError);
        // a 400 that says the model is not here
        let v = r.status(400, None, "{\"error\":\"Model Not Found\"}");
        assert_eq!(v.class, Classification::TryNext);
    }

    #[test]
    fn keywords_are_case_insensitive_and_ranked() {
        let r = rules();
        assert_eq!(
            r.text("Connection RESET by peer").class,
            Classification::Transient
        );
        assert_eq!(r.text("Connection RESET by peer").cause, Cause::Keyword);
        assert_eq!(r.text("BROKEN PIPE").class, Classification::Transient);
        assert_eq!(
            r.text("expected value at line 1 column 1").class,
            Classification::TryNext
        );
        assert_eq!(
            r.text("expected value at line 1 column 1").cause,
            Cause::Opaque
        );
        // a client-error keyword wins over a transient one in the same text
        let v = r.text("connection ok but could not fetch image");
        assert_eq!(v.class, Classification::Permanent);
        assert_eq!(r.text("unknown model foo").cause, Cause::NextProvider);
    }

    #[test]
    fn policy_keywords_replace_defaults() {
        let policy = ClassifyPolicy {
            transient_keywords: vec!["Flaky".into()],
            ..ClassifyPolicy::default()
        };
        let r = Rules::new(&policy);
        assert_eq!(r.text("it was FLAKY").class, Classification::Transient);
        assert_eq!(r.text("connection refused").class, Classification::TryNext);
    }

    #[test]
    fn io_kinds_in_the_chain() {
        let r = rules();
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(refused.classify(&r).cause, Cause::ConnectRefused);
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(reset.classify(&r).cause, Cause::Reset);
        // wrapped: the kind is found below an opaque layer
        let wrapped = io::Error::other(reset);
        assert_eq!(wrapped.classify(&r).cause, Cause::Reset);
        let boxed: Box<dyn StdError + Send + Sync> =
            Box::new(io::Error::from(io::ErrorKind::BrokenPipe));
        assert_eq!(boxed.classify(&r).class, Classification::Transient);
        // an io error with a meaningless kind falls back to its text
        let other = io::Error::other("weird thing");
        assert_eq!(other.classify(&r).cause, Cause::Opaque);
    }

    #[test]
    fn io_error_shortcut_matches_the_chain_walk() {
        use io::ErrorKind as K;
        let r = rules();
        let kinds = [
            K::ConnectionRefused,
            K::ConnectionReset,
            K::ConnectionAborted,
            K::BrokenPipe,
            K::UnexpectedEof,
            K::NotConnected,
            K::AddrNotAvailable,
            K::TimedOut,
            K::NotFound,
            K::PermissionDenied,
            K::Other,
        ];
        for kind in kinds {
            for inner in kinds {
                let errors = [
                    io::Error::from(kind),
                    io::Error::new(kind, "connection refused by the upstream"),
                    io::Error::new(kind, io::Error::from(inner)),
                ];
                for e in errors {
                    assert_eq!(e.classify(&r), r.error_chain(&e), "{kind:?} over {inner:?}");
                }
            }
        }
    }

    #[test]
    fn response_timeout_follows_policy() {
        assert_eq!(rules().response_timeout().class, Classification::TryNext);
        let r = Rules::new(&ClassifyPolicy {
            retry_response_timeout: true,
            ..ClassifyPolicy::default()
        });
        assert_eq!(r.response_timeout().class, Classification::Transient);
    }

    #[test]
    fn default_keywords_are_phrases_not_the_word_connection() {
        let r = rules();
        // A parameter name is not a transport failure.
        for text in [
            "invalid value for 'connection_id'",
            "unknown field `connection_pool_size`",
            "Connection: keep-alive header not allowed",
        ] {
            assert_eq!(r.text(text).cause, Cause::Opaque, "{text}");
        }
        // The transport failures the bare word used to catch still are.
        for text in [
            "Connection refused (os error 111)",
            "Connection reset by peer (os error 104)",
            "connection closed before message completed",
            "operation was canceled: connection closed",
            "connection error: Broken pipe (os error 32)",
            "Connection timed out (os error 110)",
            "tcp connect error: Network is unreachable (os error 101)",
            "APIConnectionError: Connection error.",
            "read ECONNRESET",
            "upstream connect error or disconnect/reset before headers",
        ] {
            assert_eq!(r.text(text), Verdict::transient(Cause::Keyword), "{text}");
        }
    }

    /// The texts of real reqwest 0.13 errors (see tests/upstream, which
    /// produces each from a faulty socket): the Display, and the chain.
    #[test]
    fn reqwest_message_forms() {
        let r = rules();
        let url = " for url (http://127.0.0.1:4000/v1)";
        let send = |detail: &str| format!("error sending request{url}{detail}");
        let cases = [
            // The bare Display of any send failure: transient.
            (send(""), Verdict::transient(Cause::Keyword)),
            ("error sending request".into(), Verdict::transient(Cause::Keyword)),
            (
                format!("error decoding response body{url}"),
                Verdict::transient(Cause::Keyword),
            ),
            (
                send(": client error (Connect): tcp connect error: Connection refused (os error 111)"),
                Verdict::transient(Cause::ConnectRefused),
            ),
            (
                send(": client error (Connect): tcp connect error: deadline has elapsed"),
                Verdict::transient(Cause::ConnectTimeout),
            ),
            (
                "error sending request: client error (Connect): tcp connect error: No route to host (os error 113)".into(),
                Verdict::transient(Cause::Connect),
            ),
            (
                send(": client error (Canceled): operation was canceled: connection error: Connection reset by peer (os error 104)"),
                Verdict::transient(Cause::NotSent),
            ),
            (
                send(": client error (SendRequest): connection closed before message completed"),
                Verdict::transient(Cause::Keyword),
            ),
            // reqwest's own timer, after the request went out.
            (send(": operation timed out"), r.response_timeout()),
            ("error sending request: operation timed out".into(), r.response_timeout()),
            // A malformed response, or a body that is not JSON: not a
            // transport failure.
            (
                send(": client error (SendRequest): invalid content-length parsed"),
                Verdict::new(Classification::TryNext, Cause::Opaque),
            ),
            (
                format!("error decoding response body{url}: expected ident at line 1 column 2"),
                Verdict::new(Classification::TryNext, Cause::Opaque),
            ),
            (
                format!("error decoding response body{url}: request or response body error: error reading a body from connection: end of file before message length reached"),
                Verdict::transient(Cause::Keyword),
            ),
            // error_for_status(): the status alone.
            (
                format!("HTTP status client error (429 Too Many Requests){url}"),
                Verdict::new(
                    Classification::RateLimited { retry_after: None },
                    Cause::RateLimited,
                ),
            ),
            (
                "HTTP status server error (503 Service Unavailable)".into(),
                Verdict::transient(Cause::Unavailable),
            ),
            (
                "HTTP status server error (500 Internal Server Error)".into(),
                Verdict::transient(Cause::Status5xx),
            ),
            (
                "HTTP status client error (400 Bad Request)".into(),
                Verdict::new(Classification::Permanent, Cause::ClientError),
            ),
            (
                "HTTP status client error (404 Not Found)".into(),
                Verdict::new(Classification::TryNext, Cause::NextProvider),
            ),
            // A request that could not be built.
            (
                "builder error for url (ftp://127.0.0.1:9/x): URL scheme is not allowed".into(),
                Verdict::new(Classification::Permanent, Cause::InvalidRequest),
            ),
            (
                "builder error: relative URL without a base".into(),
                Verdict::new(Classification::Permanent, Cause::InvalidRequest),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(r.text(&text), want, "{text}");
            // A gateway's own prefix, and any ASCII case, change nothing.
            assert_eq!(
                r.text(&format!("upstream call failed: {text}")),
                want,
                "{text}"
            );
            assert_eq!(r.text(&text.to_ascii_uppercase()), want, "{text}");
        }
        // Only at a word start, and only with the status digits.
        assert_eq!(r.text("rebuilder error").cause, Cause::Opaque);
        assert_eq!(
            r.text("HTTP status server error (5xx)").cause,
            Cause::Opaque
        );
        // Something after the bare message that is no cause: not bare.
        assert_eq!(r.text(&send(" (attempt 2)")).cause, Cause::Opaque);
        // A client-error keyword still wins over everything.
        assert_eq!(
            r.text(&send(": failed to fetch image")).class,
            Classification::Permanent
        );
    }

    #[test]
    #[cfg(feature = "reqwest")]
    fn builder_errors_are_the_callers_and_permanent() {
        let r = rules();
        let client = reqwest::Client::new();
        for request in [
            client.get("/relative/path"),
            client.get("http://127.0.0.1:9/").header("x-trace", "a\nb"),
        ] {
            let err = request.build().unwrap_err();
            assert!(err.is_builder(), "{err:?}");
            let v = err.classify(&r);
            assert_eq!(
                v,
                Verdict::new(Classification::Permanent, Cause::InvalidRequest)
            );
            assert!(!v.cause.is_provider_fault());
            // Wrapped in another error: found in the chain.
            let wrapped = io::Error::other(err);
            assert_eq!(wrapped.classify(&r).cause, Cause::InvalidRequest);
        }
    }

    #[test]
    fn display_and_serialized_names_are_stable() {
        let secs = |s| Classification::RateLimited {
            retry_after: Some(Duration::from_secs(s)),
        };
        let no_wait = Classification::RateLimited { retry_after: None };
        let classes = [
            (
                Classification::Transient,
                "transient",
                r#"{"class":"transient"}"#,
            ),
            (no_wait, "rate_limited", r#"{"class":"rate_limited"}"#),
            (
                secs(7),
                "rate_limited, retry after 7s",
                r#"{"class":"rate_limited","retry_after_ms":7000}"#,
            ),
            (
                Classification::TryNext,
                "try_next",
                r#"{"class":"try_next"}"#,
            ),
            (
                Classification::Permanent,
                "permanent",
                r#"{"class":"permanent"}"#,
            ),
        ];
        for (class, display, json) in classes {
            assert_eq!(class.to_string(), display);
            assert_eq!(serde_json::to_string(&class).unwrap(), json);
            assert_eq!(serde_json::from_str::<Classification>(json).unwrap(), class);
        }
        let names: Vec<String> = Cause::ALL.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            names,
            [
                "connect_refused",
                "connect",
                "connect_timeout",
                "reset",
                "not_sent",
                "timeout",
                "response_timeout",
                "adaptive_timeout",
                "body",
                "decode",
                "status_5xx",
                "unavailable",
                "status_retryable",
                "rate_limited",
                "client_error",
                "invalid_request",
                "next_provider",
                "keyword",
                "opaque",
            ]
        );
        for cause in Cause::ALL {
            let json = serde_json::to_string(&cause).unwrap();
            assert_eq!(json, format!("\"{}\"", cause.as_str()));
            assert_eq!(serde_json::from_str::<Cause>(&json).unwrap(), cause);
        }
        assert!(serde_json::from_str::<Cause>("\"refused\"").is_err());

        let v = Verdict::new(secs(7), Cause::RateLimited);
        assert_eq!(v.to_string(), "rate_limited, retry after 7s (rate_limited)");
        let json = r#"{"class":"rate_limited","retry_after_ms":7000,"cause":"rate_limited"}"#;
        assert_eq!(serde_json::to_string(&v).unwrap(), json);
        assert_eq!(serde_json::from_str::<Verdict>(json).unwrap(), v);
        let v = Verdict::transient(Cause::ConnectRefused);
        assert_eq!(v.to_string(), "transient (connect_refused)");
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"{"class":"transient","cause":"connect_refused"}"#
        );
        // Sub-millisecond waits are cut to the millisecond; the longest
        // wait saturates instead of failing.
        let v = Verdict::new(
            Classification::RateLimited {
                retry_after: Some(Duration::MAX),
            },
            Cause::Unavailable,
        );
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            format!(
                r#"{{"class":"rate_limited","retry_after_ms":{},"cause":"unavailable"}}"#,
                u64::MAX
            )
        );
    }

    #[test]
    fn empty_keyword_lists_match_nothing() {
        let r = Rules::new(&ClassifyPolicy {
            transient_keywords: vec![],
            next_provider_keywords: vec![],
            client_error_keywords: vec![],
            ..ClassifyPolicy::default()
        });
        assert_eq!(r.text("connection reset").cause, Cause::Opaque);
    }
}
