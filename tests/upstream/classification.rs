//! Every way a user meets a failed upstream call, classified from real
//! faults on loopback with a real `reqwest` client.
//!
//! Each case produces one fault (a refused connect, a reset, a full accept
//! queue, a 429 with Retry-After, a bad URL, ...) and classifies what the
//! user gets through each path they have:
//!
//! * `Typed`: the `reqwest::Error` itself (from `send`, a body read, or
//!   `error_for_status_ref()` for a failing status);
//! * `Wrapped`: that error inside a gateway's own error type, classified
//!   with `Rules::error_chain`;
//! * `Display`: its `to_string()` as opaque text (what a gateway that logs
//!   errors as strings has to go by);
//! * `Chain`: the whole `source()` chain joined by ": " (`{:#}` of an
//!   `anyhow::Error`), as opaque text;
//! * `ChainNoUrl`: the same without the URL (`reqwest::Error::without_url`,
//!   what the reference gateway logs);
//! * `Headers`: the `reqwest::Response` classified by status and headers;
//! * `Checked`: `upstream::check`, which keeps Retry-After and the body;
//! * `SentChecked`: `upstream::checked`, sending and checking in one
//!   future, then the body read, as a pool operation does (a failing
//!   status's error must be `check`'s, to the last byte of its body);
//! * `Pool`: the verdict the pool recorded for the attempt, and its error
//!   message, which must name the root cause.
//!
//! A path that lacks information by construction (`error_for_status`
//! drops Retry-After and the body; a plain `Display` of a send failure
//! says only "error sending request") expects its documented, lossy
//! verdict, listed per case. Opaque text names no kind: where a kind is
//! expected, a text path may give the text causes instead (`keyword` for a
//! transient verdict, `opaque` for "try the next provider"), the class
//! must match. The run prints one line per check (`--nocapture`) and the
//! count of checks right.

use std::error::Error as StdError;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use retryctl::policy::{LivePolicy, Policy};
use retryctl::upstream::{self, UpstreamError};
use retryctl::{Cause, Classification, Classify, Pool, Rules, Verdict};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use super::support::http::{RequestReader, reset};
use super::support::{
    HttpServer, Reply, ResetMode, ResetServer, StalledServer, TaskGuard, closed_port,
};

/// How a case's fault is produced.
enum Fault {
    /// Nothing listens on the port.
    Refused,
    /// The server resets each connection as soon as it accepts it.
    ResetBeforeSend,
    /// The server reads the request, then resets.
    ResetAfterSend,
    /// The server reads the request, then closes without a byte of answer.
    CloseWithoutResponse,
    /// A `listen(1)` socket whose accept queue is full: the connect hangs
    /// until the client's connect timeout.
    ConnectTimeout,
    /// A listener that never accepts: the kernel completes the handshake
    /// and takes the request, no one answers.
    NeverServed,
    /// An HTTP server answering each request with this reply.
    Http(Reply),
    /// A server that reads the request, writes these bytes and closes (or
    /// resets, when `reset` is set).
    Raw { bytes: &'static [u8], reset: bool },
    /// A URL `reqwest` refuses to send to.
    Url(&'static str),
    /// A header value `reqwest` refuses to send.
    BadHeader,
}

/// What the operation does with a response.
#[derive(Clone, Copy)]
enum Read {
    /// Nothing: the response headers are the result.
    Headers,
    /// Reads the body as text.
    Text,
    /// Decodes the body as JSON.
    Json,
}

/// The paths a user has to classify a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Typed,
    Wrapped,
    Display,
    Chain,
    ChainNoUrl,
    Headers,
    Checked,
    SentChecked,
    Pool,
}

/// An expected verdict: the class, and the causes that may come with it.
#[derive(Clone, Copy, Debug)]
struct Want {
    class: Classification,
    causes: &'static [Cause],
}

const fn want(class: Classification, causes: &'static [Cause]) -> Want {
    Want { class, causes }
}

const TRANSIENT: Classification = Classification::Transient;
const TRY_NEXT: Classification = Classification::TryNext;
const PERMANENT: Classification = Classification::Permanent;

const fn rate_limited(secs: Option<u64>) -> Classification {
    Classification::RateLimited {
        retry_after: match secs {
            Some(s) => Some(Duration::from_secs(s)),
            None => None,
        },
    }
}

/// The plain Display of every send failure is the same text ("error
/// sending request for url (...)"), and that of every failed body read
/// too ("error decoding response body for url (...)"): retried, whatever
/// the cause was.
const TEXT_TRANSIENT: Want = want(TRANSIENT, &[Cause::Keyword]);
/// The paths that start from the error `error_for_status` returns: it
/// keeps the status alone, without Retry-After or the body.
const STATUS_ONLY: [Path; 5] = [
    Path::Typed,
    Path::Wrapped,
    Path::Display,
    Path::Chain,
    Path::ChainNoUrl,
];

struct Case {
    name: &'static str,
    fault: Fault,
    read: Read,
    /// The verdict with everything known: kinds, status, Retry-After, body.
    want: Want,
    /// Paths that lack the information by construction, and the verdict
    /// they give instead.
    losses: Vec<(Path, Want)>,
}

impl Case {
    fn new(name: &'static str, fault: Fault, want: Want) -> Case {
        Case {
            name,
            fault,
            read: Read::Headers,
            want,
            losses: Vec::new(),
        }
    }

    fn read(mut self, read: Read) -> Case {
        self.read = read;
        self
    }

    fn loses(mut self, paths: &[Path], instead: Want) -> Case {
        self.losses.extend(paths.iter().map(|&p| (p, instead)));
        self
    }

    /// What `path` is expected to give.
    fn expected(&self, path: Path) -> Want {
        // `upstream::checked` then the body: what the pool's operation does.
        let path = match path {
            Path::SentChecked => Path::Pool,
            other => other,
        };
        self.losses
            .iter()
            .find(|(p, _)| *p == path)
            .map_or(self.want, |(_, w)| *w)
    }
}

fn cases() -> Vec<Case> {
    use Cause as C;
    let status_5xx = want(TRANSIENT, &[C::Status5xx]);
    vec![
        Case::new(
            "refused",
            Fault::Refused,
            want(TRANSIENT, &[C::ConnectRefused]),
        ),
        // hyper hands the request back unsent when the connection dies
        // before it was written; a reset seen while writing is a reset.
        Case::new(
            "reset before send",
            Fault::ResetBeforeSend,
            want(TRANSIENT, &[C::NotSent, C::Reset]),
        ),
        Case::new(
            "reset after send",
            Fault::ResetAfterSend,
            want(TRANSIENT, &[C::Reset]),
        ),
        Case::new(
            "closed without response",
            Fault::CloseWithoutResponse,
            want(TRANSIENT, &[C::Reset]),
        ),
        Case::new(
            "connect timeout (full accept queue)",
            Fault::ConnectTimeout,
            want(TRANSIENT, &[C::ConnectTimeout]),
        ),
        // The request sits in a socket no one reads: to the client it is a
        // response timeout, and its plain Display is that of any send
        // failure.
        Case::new(
            "never served (stalled accept)",
            Fault::NeverServed,
            want(TRY_NEXT, &[C::ResponseTimeout]),
        )
        .loses(&[Path::Display], TEXT_TRANSIENT),
        Case::new(
            "slow response",
            Fault::Http(Reply::ok("late").delay(Duration::from_millis(900))),
            want(TRY_NEXT, &[C::ResponseTimeout]),
        )
        .loses(&[Path::Display], TEXT_TRANSIENT),
        Case::new(
            "malformed response head",
            Fault::Raw {
                bytes: b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
                reset: false,
            },
            want(TRY_NEXT, &[C::Opaque]),
        )
        .loses(&[Path::Display], TEXT_TRANSIENT),
        Case::new(
            "body cut short (FIN)",
            Fault::Raw {
                bytes: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc",
                reset: false,
            },
            want(TRANSIENT, &[C::Reset]),
        )
        .read(Read::Text),
        Case::new(
            "body reset midway",
            Fault::Raw {
                bytes: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc",
                reset: true,
            },
            want(TRANSIENT, &[C::Reset]),
        )
        .read(Read::Text),
        Case::new(
            "body is not JSON",
            Fault::Http(Reply::ok("not json")),
            want(TRY_NEXT, &[C::Decode]),
        )
        .read(Read::Json)
        .loses(&[Path::Display], TEXT_TRANSIENT),
        Case::new(
            "429 with Retry-After: 7",
            Fault::Http(Reply::status(429).header("Retry-After", "7")),
            want(rate_limited(Some(7)), &[C::RateLimited]),
        )
        .loses(&STATUS_ONLY, want(rate_limited(None), &[C::RateLimited])),
        Case::new(
            "429 without Retry-After",
            Fault::Http(Reply::status(429)),
            want(rate_limited(None), &[C::RateLimited]),
        ),
        Case::new(
            "500 \"model not found\"",
            Fault::Http(Reply::status(500).body("{\"error\":\"model not found\"}")),
            want(TRY_NEXT, &[C::NextProvider]),
        )
        .loses(&STATUS_ONLY, status_5xx)
        .loses(&[Path::Headers], status_5xx),
        Case::new(
            "500 \"failed to fetch image\"",
            Fault::Http(Reply::status(500).body("Failed to fetch image from http://x/y.png")),
            want(PERMANENT, &[C::ClientError]),
        )
        .loses(&STATUS_ONLY, status_5xx)
        .loses(&[Path::Headers], status_5xx),
        Case::new(
            "500",
            Fault::Http(Reply::status(500).body("internal error")),
            status_5xx,
        ),
        Case::new(
            "502",
            Fault::Http(Reply::status(502)),
            want(TRANSIENT, &[C::Unavailable]),
        ),
        Case::new(
            "503",
            Fault::Http(Reply::status(503)),
            want(TRANSIENT, &[C::Unavailable]),
        ),
        Case::new(
            "503 with Retry-After: 2",
            Fault::Http(Reply::status(503).header("Retry-After", "2")),
            want(rate_limited(Some(2)), &[C::Unavailable]),
        )
        .loses(&STATUS_ONLY, want(TRANSIENT, &[C::Unavailable])),
        Case::new(
            "400",
            Fault::Http(Reply::status(400).body("{\"error\":\"bad messages\"}")),
            want(PERMANENT, &[C::ClientError]),
        ),
        Case::new(
            "404 \"model not found\"",
            Fault::Http(Reply::status(404).body("model not found")),
            want(TRY_NEXT, &[C::NextProvider]),
        ),
        Case::new(
            "bad scheme",
            Fault::Url("ftp://127.0.0.1:9/v1/chat/completions"),
            want(PERMANENT, &[C::InvalidRequest]),
        ),
        Case::new(
            "relative URL",
            Fault::Url("/v1/chat/completions"),
            want(PERMANENT, &[C::InvalidRequest]),
        ),
        Case::new(
            "invalid header value",
            Fault::BadHeader,
            want(PERMANENT, &[C::InvalidRequest]),
        ),
    ]
}

/// A running fault: the URL to call, and what keeps the fault alive.
struct Target {
    url: String,
    bad_header: bool,
    _servers: Vec<Box<dyn std::any::Any + Send>>,
}

impl Fault {
    async fn start(&self) -> Target {
        let mut servers: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
        let url = match self {
            Fault::Refused => format!("http://{}/v1", closed_port()),
            Fault::ResetBeforeSend | Fault::ResetAfterSend => {
                let mode = match self {
                    Fault::ResetBeforeSend => ResetMode::OnAccept,
                    _ => ResetMode::AfterRequest,
                };
                let s = ResetServer::start(mode).await;
                let url = s.url();
                servers.push(Box::new(s));
                url
            }
            Fault::CloseWithoutResponse => {
                let s = HttpServer::always(Reply::close()).await;
                let url = s.url();
                servers.push(Box::new(s));
                url
            }
            Fault::ConnectTimeout => {
                let s = StalledServer::start().await;
                let url = s.url();
                servers.push(Box::new(s));
                url
            }
            Fault::NeverServed => {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let url = format!("http://{}", l.local_addr().unwrap());
                servers.push(Box::new(l));
                url
            }
            Fault::Http(reply) => {
                let s = HttpServer::always(reply.clone()).await;
                let url = s.url();
                servers.push(Box::new(s));
                url
            }
            Fault::Raw { bytes, reset } => {
                let (addr, task) = raw_server(bytes, *reset).await;
                servers.push(Box::new(task));
                format!("http://{addr}")
            }
            Fault::Url(url) => url.to_string(),
            Fault::BadHeader => {
                let s = HttpServer::always(Reply::ok("never")).await;
                let url = s.url();
                servers.push(Box::new(s));
                url
            }
        };
        Target {
            url,
            bad_header: matches!(self, Fault::BadHeader),
            _servers: servers,
        }
    }
}

/// Reads each request, writes `bytes`, then closes (FIN) or resets.
async fn raw_server(bytes: &'static [u8], rst: bool) -> (SocketAddr, TaskGuard) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = TaskGuard::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = RequestReader::default().next(&mut stream).await;
                let _ = stream.write_all(bytes).await;
                let _ = stream.flush().await;
                if rst {
                    reset(stream);
                } else {
                    let _ = stream.shutdown().await;
                }
            });
        }
    });
    (addr, task)
}

/// The client every case uses: a 200 ms connect timeout and a 500 ms
/// request timeout, so a connect that hangs and a response that does not
/// come are told apart; no pooled connections, so every call meets the
/// fault afresh.
fn client() -> reqwest::Client {
    let mut timeouts = Policy::default().timeouts;
    timeouts.connect = Duration::from_millis(200);
    upstream::client_builder(&timeouts)
        .timeout(Duration::from_millis(500))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

fn request(client: &reqwest::Client, target: &Target) -> reqwest::RequestBuilder {
    let request = client.post(&target.url).body("{}");
    if target.bad_header {
        request.header("x-trace", "a\nb")
    } else {
        request
    }
}

async fn read(response: reqwest::Response, read: Read) -> Result<(), reqwest::Error> {
    match read {
        Read::Headers => {}
        Read::Text => {
            response.text().await?;
        }
        Read::Json => {
            response.json::<serde_json::Value>().await?;
        }
    }
    Ok(())
}

/// A gateway's own error type: its Display says what it was doing, the
/// reqwest error is its source.
#[derive(Debug)]
struct GatewayError(reqwest::Error);

impl fmt::Display for GatewayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("calling the upstream failed")
    }
}

impl StdError for GatewayError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&self.0)
    }
}

/// `{:#}` of an `anyhow::Error`: every link of the chain, ": "-joined.
fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cur = e.source();
    }
    text
}

/// The innermost link of the chain: the root cause a log must keep.
fn root_cause(err: &(dyn StdError + 'static)) -> String {
    let mut cur = err;
    while let Some(e) = cur.source() {
        cur = e;
    }
    cur.to_string()
}

/// One check's result.
struct Check {
    case: &'static str,
    path: Path,
    got: Verdict,
    want: Want,
    note: String,
    ok: bool,
    /// The path expects a documented loss.
    lossy: bool,
}

fn check(case: &Case, path: Path, got: Verdict, note: String, extra_ok: bool) -> Check {
    let want = case.expected(path);
    // Opaque text names no kind: besides the kinds reqwest's own text
    // gives away, its causes are the keyword (transient) and "opaque".
    let text_cause = matches!(path, Path::Display | Path::Chain | Path::ChainNoUrl)
        && match want.class {
            Classification::Transient => got.cause == Cause::Keyword,
            Classification::TryNext => got.cause == Cause::Opaque,
            _ => false,
        };
    let ok =
        extra_ok && got.class == want.class && (want.causes.contains(&got.cause) || text_cause);
    Check {
        case: case.name,
        path,
        got,
        want,
        note,
        ok,
        lossy: case.losses.iter().any(|(p, _)| *p == path),
    }
}

/// Runs `case` once directly (every path but the pool) and once through
/// a pool, against the same fault.
async fn run(case: &Case, client: &reqwest::Client, rules: &Rules) -> Vec<Check> {
    let target = case.fault.start().await;
    let mut checks = Vec::new();

    // One call, every direct path.
    let mut status_error = None;
    let error = match request(client, &target).send().await {
        Err(e) => Some(e),
        Ok(response) => match response.error_for_status_ref().err() {
            Some(e) => {
                let v = response.classify(rules);
                checks.push(check(case, Path::Headers, v, String::new(), true));
                let v = match upstream::check(response).await {
                    Err(e) => {
                        status_error = Some(format!("{e:?}"));
                        e.classify(rules)
                    }
                    Ok(_) => panic!("{}: check passed a failing status", case.name),
                };
                checks.push(check(case, Path::Checked, v, String::new(), true));
                Some(e)
            }
            None => read(response, case.read).await.err(),
        },
    };
    let Some(error) = error else {
        panic!("{}: the fault produced no error", case.name);
    };
    // Sent and checked in one future, then the body read.
    let v = match upstream::checked(request(client, &target).send()).await {
        Err(e) => {
            if let UpstreamError::Status { .. } = e {
                assert_eq!(
                    Some(format!("{e:?}")),
                    status_error,
                    "{}: checked and check disagree",
                    case.name
                );
            }
            e.classify(rules)
        }
        Ok(response) => match read(response, case.read).await {
            Err(e) => UpstreamError::from(e).classify(rules),
            Ok(()) => panic!("{}: checked: the fault produced no error", case.name),
        },
    };
    checks.push(check(case, Path::SentChecked, v, String::new(), true));
    let text = error.to_string();
    let full = chain(&error);
    let wrapped = GatewayError(error);
    checks.push(check(
        case,
        Path::Typed,
        wrapped.0.classify(rules),
        String::new(),
        true,
    ));
    checks.push(check(
        case,
        Path::Wrapped,
        rules.error_chain(&wrapped),
        String::new(),
        true,
    ));
    checks.push(check(case, Path::Display, rules.text(&text), text, true));
    checks.push(check(
        case,
        Path::Chain,
        rules.text(&full),
        full.clone(),
        true,
    ));
    let without_url = chain(&wrapped.0.without_url());
    checks.push(check(
        case,
        Path::ChainNoUrl,
        rules.text(&without_url),
        without_url,
        true,
    ));

    // The same fault through a pool: the recorded verdict, and a message
    // that keeps the root cause.
    let mut policy = Policy {
        max_rounds: 1,
        ..Policy::default()
    };
    policy.admission.enabled = false;
    policy.timeouts.connect = Duration::from_millis(200);
    policy.timeouts.attempt = Duration::from_secs(3);
    let pool = Pool::builder()
        .provider("m", "p", ())
        .policy(LivePolicy::new(policy).unwrap())
        .build()
        .unwrap();
    let read_mode = case.read;
    let err = pool
        .call("m", |_| {
            let request = request(client, &target);
            async move {
                let response = upstream::check(request.send().await?).await?;
                read(response, read_mode).await?;
                Ok::<(), UpstreamError>(())
            }
        })
        .await
        .expect_err(case.name);
    let message = err.to_string();
    let keeps = match err.upstream() {
        Some(UpstreamError::Transport(e)) => {
            let root = root_cause(e);
            message.contains(&root)
        }
        Some(UpstreamError::Status { status, .. }) => message.contains(status.as_str()),
        // Another client's transport error: not sent by this test.
        Some(_) | None => false,
    };
    let v = err.report.failures()[0].verdict;
    checks.push(check(case, Path::Pool, v, message, keeps));
    checks
}

#[tokio::test]
async fn every_fault_through_every_path() {
    let client = client();
    let rules = Rules::default();
    let cases = cases();
    let mut checks = Vec::new();
    for case in &cases {
        checks.extend(run(case, &client, &rules).await);
    }
    let right = checks.iter().filter(|c| c.ok).count();
    let lossy = checks.iter().filter(|c| c.lossy).count();
    for c in &checks {
        println!(
            "{} {:<36} {:<11} got {:?}/{:?}, want {:?}/{:?}  {}",
            if c.ok { "ok  " } else { "FAIL" },
            c.case,
            format!("{:?}", c.path),
            c.got.class,
            c.got.cause,
            c.want.class,
            c.want.causes,
            c.note
        );
    }
    println!(
        "{right} of {} checks right ({} cases; {lossy} checks expect a documented loss)",
        checks.len(),
        cases.len()
    );
    let wrong: Vec<String> = checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| format!("{} / {:?}: {:?}", c.case, c.path, c.got))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}
