//! The load: keep-alive clients sending chat completions at a fixed rate,
//! JSON and streaming ones to the two models and requests for unknown
//! models mixed in, each answer checked to its last byte.
//!
//! The rate is held by a shared pacer of send slots (slot `k` is due
//! `k / rate` after the start) and bounded by the number of workers, each
//! with one request at a time: a stall delays the slots, then the workers
//! catch up as fast as the gateway answers, as clients with a queue do.
//! Every request ends in exactly one of: a success, a 404 for an unknown
//! model, a failure (non-2xx, a body that is not the upstream's, a
//! connection error), or a hang (no complete answer within the
//! per-request timeout).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use reqwest::header::CONTENT_TYPE;
use serde_json::Value;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::gateway::{JSON_MODEL, STREAM_MODEL};

/// Unknown model names start with this; none may appear in `/metrics`.
pub(crate) const UNKNOWN_PREFIX: &str = "soak-unknown-model-";
/// Distinct unknown model names sent (then they repeat).
pub(crate) const UNKNOWN_NAMES: u64 = 10_000;

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    Json,
    Stream,
    Unknown,
}

impl Kind {
    pub(crate) const ALL: [Kind; 3] = [Kind::Json, Kind::Stream, Kind::Unknown];

    pub(crate) fn describe(self) -> &'static str {
        match self {
            Kind::Json => "JSON completion",
            Kind::Stream => "streamed completion",
            Kind::Unknown => "unknown model",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How the load is made.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LoadOptions {
    pub(crate) rate: f64,
    pub(crate) workers: usize,
    /// Share of requests for unknown models.
    pub(crate) unknown_share: f64,
    /// Share of the other requests that stream.
    pub(crate) stream_share: f64,
    /// A request without its complete answer after this is a hang.
    pub(crate) timeout: Duration,
    pub(crate) seed: u64,
}

/// Why an answer is not the one expected.
#[derive(Clone, Debug)]
pub(crate) enum Failure {
    /// A non-2xx status (other than an unknown model's 404): the
    /// gateway's reason, the providers its failures name with their
    /// causes, and its attempt and round counts.
    Status {
        status: u16,
        reason: String,
        failures: Vec<(String, String)>,
        attempts: String,
        rounds: String,
    },
    /// A 2xx whose body is not the upstream's, or could not be read to
    /// the end.
    Body {
        status: u16,
        provider: Option<String>,
        detail: String,
    },
    /// No response at all: the connection to the gateway failed.
    Connection(String),
    /// No complete answer within the per-request timeout.
    Hang,
}

impl Failure {
    /// A short label for the report's table.
    pub(crate) fn label(&self) -> String {
        match self {
            Failure::Status { status, reason, .. } => format!("{status} {reason}"),
            Failure::Body { status, detail, .. } => format!("{status} {detail}"),
            Failure::Connection(e) => format!("connection error: {e}"),
            Failure::Hang => "no answer (hang)".into(),
        }
    }

    /// The details: causes and counts, or the provider.
    pub(crate) fn detail(&self) -> String {
        match self {
            Failure::Status {
                failures,
                attempts,
                rounds,
                ..
            } => {
                let causes: Vec<String> =
                    failures.iter().map(|(p, c)| format!("{p}: {c}")).collect();
                format!(
                    "attempts {attempts}, rounds {rounds}; {}",
                    causes.join(", ")
                )
            }
            Failure::Body { provider, .. } => {
                format!("provider {}", provider.as_deref().unwrap_or("-"))
            }
            Failure::Connection(_) | Failure::Hang => String::new(),
        }
    }
}

/// A request whose answer was not the expected one, with when it ran
/// (offsets from the start of the load).
#[derive(Clone, Debug)]
pub(crate) struct Bad {
    pub(crate) kind: Kind,
    pub(crate) start: Duration,
    pub(crate) end: Duration,
    pub(crate) failure: Failure,
}

/// What the workers saw, merged.
#[derive(Debug)]
pub(crate) struct Tally {
    pub(crate) sent: [u64; 3],
    /// Successes (for unknown models: the expected 404).
    pub(crate) ok: [u64; 3],
    pub(crate) statuses: BTreeMap<u16, u64>,
    /// Latency of every answered request, in microseconds, by kind.
    pub(crate) latency: [Histogram<u64>; 3],
    pub(crate) bad: Vec<Bad>,
    pub(crate) unknown_names: u64,
    /// Time under load: from each phase's start until its last answer.
    pub(crate) load_time: Duration,
    /// Each phase's answers and time under load, in order.
    pub(crate) phases: Vec<(u64, Duration)>,
}

impl Tally {
    pub(crate) fn new() -> Tally {
        let h = || Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds");
        Tally {
            sent: [0; 3],
            ok: [0; 3],
            statuses: BTreeMap::new(),
            latency: [h(), h(), h()],
            bad: Vec::new(),
            unknown_names: 0,
            load_time: Duration::ZERO,
            phases: Vec::new(),
        }
    }

    pub(crate) fn merge(&mut self, other: Tally) {
        for i in 0..3 {
            self.sent[i] += other.sent[i];
            self.ok[i] += other.ok[i];
            // Same bounds: adding cannot fail.
            let _ = self.latency[i].add(&other.latency[i]);
        }
        for (s, n) in other.statuses {
            *self.statuses.entry(s).or_default() += n;
        }
        self.bad.extend(other.bad);
        self.load_time += other.load_time;
        self.phases.extend(other.phases);
    }

    pub(crate) fn total_sent(&self) -> u64 {
        self.sent.iter().sum()
    }

    /// Requests with an answer: everything but hangs.
    pub(crate) fn answered(&self) -> u64 {
        self.total_sent() - self.hangs()
    }

    pub(crate) fn hangs(&self) -> u64 {
        self.bad
            .iter()
            .filter(|b| matches!(b.failure, Failure::Hang))
            .count() as u64
    }

    pub(crate) fn connection_errors(&self) -> u64 {
        self.bad
            .iter()
            .filter(|b| matches!(b.failure, Failure::Connection(_)))
            .count() as u64
    }
}

/// Send slots shared by the workers.
#[derive(Debug)]
struct Pacer {
    start: Instant,
    end: Instant,
    /// From here to `end`, slots are due at once: every worker sends as
    /// fast as it is answered.
    unpaced: Instant,
    rate: f64,
    next: AtomicU64,
}

impl Pacer {
    /// When the next slot is due; `None` once slots reach the end, or
    /// the end has passed (workers that fell behind the rate do not send
    /// the missed slots after it).
    fn next(&self) -> Option<Instant> {
        let now = Instant::now();
        if now >= self.end {
            return None;
        }
        if now >= self.unpaced {
            return Some(now);
        }
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        let at = self.start + Duration::from_secs_f64(k as f64 / self.rate);
        (at < self.end).then_some(at)
    }
}

/// What every worker shares.
#[derive(Debug)]
struct Shared {
    client: reqwest::Client,
    url: String,
    options: LoadOptions,
    pacer: Pacer,
    epoch: Instant,
    unknown: Arc<AtomicU64>,
}

/// One stretch of load: the slots from `start` until `end`, on a client
/// (and so connections) of its own; its last `burst` is sent unpaced.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Phase {
    pub(crate) number: u64,
    pub(crate) start: Instant,
    pub(crate) end: Instant,
    pub(crate) burst: Duration,
}

/// Runs one phase of load and returns its tally once every request has
/// its outcome; times are recorded from `epoch`. Unknown model names are
/// drawn from `unknown`, shared across phases.
pub(crate) async fn run(
    gateway_url: &str,
    options: LoadOptions,
    epoch: Instant,
    phase: Phase,
    unknown: Arc<AtomicU64>,
) -> Result<Tally, crate::Error> {
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(options.workers)
        .build()?;
    let shared = Arc::new(Shared {
        client,
        url: format!("{gateway_url}/v1/chat/completions"),
        options,
        pacer: Pacer {
            start: phase.start,
            end: phase.end,
            unpaced: phase.end - phase.burst,
            rate: options.rate,
            next: AtomicU64::new(0),
        },
        epoch,
        unknown,
    });
    let mut workers = JoinSet::new();
    for w in 0..options.workers as u64 {
        let seed = options
            .seed
            .wrapping_add(phase.number.wrapping_mul(1_000_003))
            .wrapping_add(w);
        workers.spawn(worker(shared.clone(), seed));
    }
    let mut tally = Tally::new();
    while let Some(done) = workers.join_next().await {
        tally.merge(done?);
    }
    tally.load_time = phase.start.elapsed();
    tally.phases.push((tally.answered(), tally.load_time));
    Ok(tally)
}

async fn worker(shared: Arc<Shared>, seed: u64) -> Tally {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut tally = Tally::new();
    while let Some(due) = shared.pacer.next() {
        tokio::time::sleep_until(due).await;
        let kind = pick(&mut rng, &shared.options);
        let model = match kind {
            Kind::Json => JSON_MODEL.to_owned(),
            Kind::Stream => STREAM_MODEL.to_owned(),
            Kind::Unknown => {
                let i = shared.unknown.fetch_add(1, Ordering::Relaxed) % UNKNOWN_NAMES;
                format!("{UNKNOWN_PREFIX}{i:05}")
            }
        };
        let started = Instant::now();
        let outcome = tokio::time::timeout(
            shared.options.timeout,
            exchange(&shared.client, &shared.url, kind, &model),
        )
        .await;
        let latency = started.elapsed();
        tally.sent[kind.index()] += 1;
        let (status, result) = outcome.unwrap_or((None, Err(Failure::Hang)));
        if let Some(s) = status {
            *tally.statuses.entry(s).or_default() += 1;
            tally.latency[kind.index()].saturating_record(latency.as_micros() as u64);
        }
        match result {
            Ok(()) => tally.ok[kind.index()] += 1,
            Err(failure) => tally.bad.push(Bad {
                kind,
                start: started - shared.epoch,
                end: started + latency - shared.epoch,
                failure,
            }),
        }
    }
    tally
}

fn pick(rng: &mut fastrand::Rng, options: &LoadOptions) -> Kind {
    if rng.f64() < options.unknown_share {
        Kind::Unknown
    } else if rng.f64() < options.stream_share {
        Kind::Stream
    } else {
        Kind::Json
    }
}

fn request_body(kind: Kind, model: &str) -> String {
    let stream = if kind == Kind::Stream {
        r#","stream":true"#
    } else {
        ""
    };
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]{stream}}}"#)
}

/// One request and its whole answer: the status, if a response came, and
/// whether the answer is the expected one.
async fn exchange(
    client: &reqwest::Client,
    url: &str,
    kind: Kind,
    model: &str,
) -> (Option<u16>, Result<(), Failure>) {
    let response = match client
        .post(url)
        .header(CONTENT_TYPE, "application/json")
        .body(request_body(kind, model))
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => return (None, Err(Failure::Connection(chain(&e)))),
    };
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    let provider = response
        .headers()
        .get("x-retryctl-provider")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (attempts, rounds) = (header("x-retryctl-attempts"), header("x-retryctl-rounds"));
    let is_stream = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let body = match response.bytes().await {
        Ok(b) => b,
        Err(e) => {
            let detail = format!("body read failed: {}", chain(&e));
            return (
                Some(status),
                Err(Failure::Body {
                    status,
                    provider,
                    detail,
                }),
            );
        }
    };
    let result = match (kind, status) {
        (Kind::Unknown, 404) if error_code(&body).as_deref() == Some("model_not_found") => Ok(()),
        (Kind::Json, 200) => check_body(&body, crate::nginx::COMPLETION, false, status, provider),
        (Kind::Stream, 200) if is_stream => {
            check_body(&body, &crate::nginx::stream_text(), true, status, provider)
        }
        (Kind::Stream, 200) => Err(Failure::Body {
            status,
            provider,
            detail: "a stream answered without text/event-stream".into(),
        }),
        _ => Err(status_failure(status, &body, attempts, rounds)),
    };
    (Some(status), result)
}

/// A 2xx body must be the upstream's, byte for byte.
fn check_body(
    body: &[u8],
    expected: &str,
    stream: bool,
    status: u16,
    provider: Option<String>,
) -> Result<(), Failure> {
    if body == expected.as_bytes() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(body);
    let detail = if stream && !text.contains("data: [DONE]") {
        "stream ended without data: [DONE]"
    } else if stream {
        "stream differs from the upstream's"
    } else {
        "body differs from the upstream's"
    };
    Err(Failure::Body {
        status,
        provider,
        detail: detail.into(),
    })
}

fn error_code(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    Some(v.get("error")?.get("code")?.as_str()?.to_owned())
}

/// A non-2xx: the gateway's error body says why and which providers
/// failed how.
fn status_failure(status: u16, body: &[u8], attempts: String, rounds: String) -> Failure {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let error = v.get("error");
    let reason = error
        .and_then(|e| e.get("code").or_else(|| e.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("(no error body)")
        .to_owned();
    let failures = error
        .and_then(|e| e.get("failures"))
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .map(|f| {
                    let s = |k: &str| f.get(k).and_then(Value::as_str).unwrap_or("-").to_owned();
                    (s("provider"), s("cause"))
                })
                .collect()
        })
        .unwrap_or_default();
    Failure::Status {
        status,
        reason,
        failures,
        attempts,
        rounds,
    }
}

/// An error and its sources, for a connection error's label.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cur = inner.source();
    }
    text
}
