//! What the bench binaries share: the upstream operations, the pools (with
//! statistics and Prometheus metrics on, or metrics off), the peers
//! configured like the pool, and the timing loops.
//!
//! Every async variant of a group runs the same way: `iters` calls awaited
//! in a loop inside one `block_on` of a current-thread tokio runtime, timed
//! with `std::time::Instant` around the loop. The executor's own cost is
//! therefore outside every variant alike, and ratios compare the calls only.

// Each bench binary uses a different part of this module.
#![allow(dead_code)]

use std::future::{Future, Ready, ready};
use std::hint::black_box;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Barrier, OnceLock};
use std::time::Duration;

use retryctl::Pool;
use retryctl::policy::{BudgetPolicy, LivePolicy, Policy};
use retryctl::telemetry::MetricsHandle;
use retryctl::upstream;
use tokio::runtime::Runtime;
use tower::retry::budget::{Budget, TpsBudget};

/// The model every pool serves.
pub const MODEL: &str = "openai/gpt-oss-120b";

/// The upstream of the success path: returns at once.
pub async fn upstream() -> Result<u64, io::Error> {
    Ok(black_box(42))
}

/// The upstream of the retry path: attempt 0 is refused, later ones succeed.
pub async fn refused_once(attempt: u32) -> Result<u64, io::Error> {
    if attempt == 0 {
        Err(io::Error::from(io::ErrorKind::ConnectionRefused))
    } else {
        Ok(black_box(42))
    }
}

/// A current-thread runtime with the timer (the pool's attempt timeout).
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The process-wide Prometheus recorder with retryctl's buckets, installed
/// once (before any pool is built, as in production).
pub fn prometheus() -> &'static MetricsHandle {
    static HANDLE: OnceLock<MetricsHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        retryctl::telemetry::Recorder::new()
            .install()
            .expect("install the metrics recorder")
    })
}

/// Folds the buffered histogram samples into buckets, as the exporter's
/// upkeep task does every 5 s in production. Called between timed loops
/// (never inside one) so the sample buffers stay small.
pub fn upkeep() {
    prometheus().run_upkeep();
}

/// The default policy (budget 20% + 10/s, jittered 500 ms waits).
pub fn default_policy() -> Policy {
    Policy::default()
}

/// Zero-delay retries under a budget that never refuses: each request
/// deposits a whole retry, and the reserve is 10^7 retries.
///
/// Admission is off: with it, a refused connect is re-attempted when the
/// provider's gate admits it, and an upstream that refuses every other
/// attempt keeps its gate at the floor, so the re-attempt waits for the
/// gate's probe (100 ms and more: the gate doing its job). What these
/// cases measure is the bookkeeping of one blind retry.
pub fn zero_delay_policy() -> Policy {
    let mut admission = Policy::default().admission;
    admission.enabled = false;
    Policy {
        admission,
        delay: Duration::ZERO.into(),
        jitter: 0.0,
        budget: BudgetPolicy {
            enabled: true,
            ratio: 1.0,
            min_per_second: 1_000_000,
            ..BudgetPolicy::default()
        },
        ..Policy::default()
    }
}

fn builder(providers: usize, policy: Policy) -> retryctl::PoolBuilder<()> {
    let mut b = Pool::builder();
    for i in 0..providers {
        b = b.provider(MODEL, &format!("proxy-{i}"), ());
    }
    b.policy(LivePolicy::new(policy).expect("valid policy"))
}

/// A pool with statistics and Prometheus metrics on (the recorder is
/// installed first, so every handle the pool resolves records).
pub fn pool(providers: usize, policy: Policy) -> Pool<()> {
    prometheus();
    builder(providers, policy).build().expect("pool")
}

/// The same pool with metric handles resolved against a no-op recorder:
/// statistics, budget and health still run, Prometheus does not.
pub fn pool_without_metrics(providers: usize, policy: Policy) -> Pool<()> {
    metrics::with_local_recorder(&metrics::NoopRecorder, || {
        builder(providers, policy).build().expect("pool")
    })
}

/// One success-path call through the pool.
pub async fn pool_call(pool: &Pool<()>) -> u64 {
    match pool.call(MODEL, |_| upstream()).await {
        Ok(served) => served.value,
        Err(e) => panic!("{e}"),
    }
}

/// One retry-path call through the pool: the first attempt is refused.
pub async fn pool_call_refused_once(pool: &Pool<()>) -> u64 {
    let mut attempt = 0;
    let result = pool
        .call(MODEL, |_| {
            let n = attempt;
            attempt += 1;
            refused_once(n)
        })
        .await;
    match result {
        Ok(served) => served.value,
        Err(e) => panic!("{e}"),
    }
}

/// tower's retry policy with its `TpsBudget`, written the way tower's docs
/// write it: deposit on success, withdraw before a retry, no backoff. The
/// request is the attempt number.
#[derive(Clone)]
pub struct TowerPolicy {
    budget: Arc<TpsBudget>,
}

impl TowerPolicy {
    /// tower's defaults, the same numbers as the pool's (10 s, 10/s, 20%).
    pub fn default_budget() -> Self {
        TowerPolicy {
            budget: Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2)),
        }
    }

    /// A budget that never refuses, like [`zero_delay_policy`]'s.
    pub fn huge_budget() -> Self {
        TowerPolicy {
            budget: Arc::new(TpsBudget::new(Duration::from_secs(10), 1_000_000, 1.0)),
        }
    }
}

impl<Res, E> tower::retry::Policy<u32, Res, E> for TowerPolicy {
    type Future = Ready<()>;

    fn retry(&mut self, attempt: &mut u32, result: &mut Result<Res, E>) -> Option<Self::Future> {
        match result {
            Ok(_) => {
                self.budget.deposit();
                None
            }
            Err(_) if self.budget.withdraw() => {
                *attempt += 1;
                Some(ready(()))
            }
            Err(_) => None,
        }
    }

    fn clone_request(&mut self, attempt: &u32) -> Option<u32> {
        Some(*attempt)
    }
}

/// Awaits `call()` `iters` times and returns the time the loop took.
pub async fn timed<F, Fut>(iters: u64, mut call: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future,
{
    let start = std::time::Instant::now();
    for _ in 0..iters {
        black_box(call().await);
    }
    start.elapsed()
}

/// Runs `work(runtime, iters)` on 2 threads at once, each with its own
/// current-thread runtime built before the start line, and returns the
/// slower thread's time: the per-call time each thread saw, with 2 threads.
pub fn on_two_threads<W>(iters: u64, work: Arc<W>) -> Duration
where
    W: Fn(&Runtime, u64) -> Duration + Send + Sync + 'static,
{
    let start = Arc::new(Barrier::new(2));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let work = work.clone();
            let start = start.clone();
            std::thread::spawn(move || {
                let rt = runtime();
                start.wait();
                work(&rt, iters)
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("bench thread"))
        .max()
        .unwrap_or_default()
}

// Loopback HTTP (benches/http.rs and benches/alloc.rs).

/// The request body every HTTP variant posts.
pub const REQUEST: &str =
    r#"{"model":"openai/gpt-oss-120b","messages":[{"role":"user","content":"hi"}]}"#;
/// The upstream's response body.
pub const RESPONSE: &str = r#"{"id":"bench","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}]}"#;

/// Starts a minimal chat-completions upstream (axum, 127.0.0.1:0) on its
/// own thread and runtime; returns its address.
pub fn start_server() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("local addr");
    std::thread::spawn(move || {
        let rt = runtime();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let app = axum::Router::new().route(
                "/v1/chat/completions",
                axum::routing::post(|| async {
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        RESPONSE,
                    )
                }),
            );
            axum::serve(listener, app).await.expect("server");
        });
    });
    addr
}

/// What the pool hands each HTTP attempt.
#[derive(Clone)]
pub struct HttpProvider {
    pub client: reqwest::Client,
    pub url: String,
}

/// A pool with one provider, `loopback`, reaching `url` with `client`,
/// under the default policy (statistics and metrics on).
pub fn loopback_pool(client: &reqwest::Client, url: &str) -> Pool<HttpProvider> {
    Pool::builder()
        .provider(
            MODEL,
            "loopback",
            HttpProvider {
                client: client.clone(),
                url: url.to_owned(),
            },
        )
        .policy(LivePolicy::default())
        .build()
        .expect("pool")
}

/// One request with plain reqwest: send, check the status, read the body.
pub async fn http_plain(client: &reqwest::Client, url: &str) -> usize {
    let response = client.post(url).body(REQUEST).send().await.expect("sent");
    let response = upstream::check(response).await.expect("2xx");
    response.bytes().await.expect("body").len()
}

/// [`http_plain`] with a per-request timeout, as a production client sets
/// one: the default policy's `timeouts.attempt`, which the pool applies to
/// each attempt. reqwest arms a tokio timer for it, as the pool does; this
/// is the baseline for what the pool adds beyond the timer.
pub async fn http_plain_timeout(client: &reqwest::Client, url: &str) -> usize {
    let timeout = retryctl::policy::Policy::default().timeouts.attempt;
    let response = client
        .post(url)
        .timeout(timeout)
        .body(REQUEST)
        .send()
        .await
        .expect("sent");
    let response = upstream::check(response).await.expect("2xx");
    response.bytes().await.expect("body").len()
}

/// [`http_pool`] with the operation written as an async block around the
/// send and the check, as `upstream::checked` does in one future: what
/// that block costs (a state machine of its own, whose states are moved
/// into place).
pub async fn http_pool_block(pool: &Pool<HttpProvider>) -> usize {
    let served = pool
        .call(MODEL, |p: &HttpProvider| {
            let request = p.client.post(&p.url).body(REQUEST);
            async move { upstream::check(request.send().await?).await }
        })
        .await;
    let response = match served {
        Ok(served) => served.value,
        Err(e) => panic!("{e}"),
    };
    response.bytes().await.expect("body").len()
}

/// The same request through the pool (the body is read after it returns).
pub async fn http_pool(pool: &Pool<HttpProvider>) -> usize {
    let served = pool
        .call(MODEL, |p: &HttpProvider| {
            upstream::checked(p.client.post(&p.url).body(REQUEST).send())
        })
        .await;
    let response = match served {
        Ok(served) => served.value,
        Err(e) => panic!("{e}"),
    };
    response.bytes().await.expect("body").len()
}
