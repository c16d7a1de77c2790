//! Metric values produced by the pool, read back from the real Prometheus
//! exporter's text output. Each test builds its pool under its own local
//! recorder (the pool resolves its handles at build time), so tests do not
//! share counters.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use retryctl::policy::{LivePolicy, Policy};
use retryctl::telemetry::MetricsHandle;
use retryctl::{Pool, telemetry};

/// Parses the exposition text into `series -> value` (series as written).
fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn value(map: &HashMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = map
        .iter()
        .filter(|(k, _)| {
            k.starts_with(name)
                && (k.len() == name.len() || k[name.len()..].starts_with('{'))
                && labels
                    .iter()
                    .all(|(l, v)| k.contains(&format!("{l}=\"{v}\"")))
        })
        .map(|(_, v)| *v)
        .collect();
    found.iter().sum()
}

/// A pool whose providers follow shared scripts: each call pops the next
/// outcome of its provider (true = success).
struct Fixture {
    handle: MetricsHandle,
    pool: Pool<Arc<Script>>,
}

struct Script {
    outcomes: Vec<bool>,
    next: AtomicUsize,
}

impl Script {
    fn new(outcomes: &[bool]) -> Arc<Self> {
        Arc::new(Script {
            outcomes: outcomes.to_vec(),
            next: AtomicUsize::new(0),
        })
    }

    fn next(&self) -> bool {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        *self
            .outcomes
            .get(i)
            .or(self.outcomes.last())
            .unwrap_or(&true)
    }
}

/// A pool under `policy` without the admission gate: these tests count
/// rounds of refused attempts (the gate's own metrics: tests/prometheus).
fn fixture(providers: &[(&str, Arc<Script>)], mut policy: Policy) -> Fixture {
    policy.admission.enabled = false;
    let recorder = telemetry::Recorder::new();
    let handle = recorder.handle();
    let pool = metrics::with_local_recorder(&recorder, || {
        let mut b = Pool::builder().policy(LivePolicy::new(policy).unwrap());
        for (name, s) in providers {
            b = b.provider("m", name, s.clone());
        }
        b.build().unwrap()
    });
    // The handles keep the recorder's storage alive.
    drop(recorder);
    Fixture { handle, pool }
}

async fn call(pool: &Pool<Arc<Script>>) -> bool {
    pool.call("m", |s: &Arc<Script>| {
        let ok = s.next();
        async move {
            if ok {
                Ok(())
            } else {
                Err(io::Error::from(io::ErrorKind::ConnectionRefused))
            }
        }
    })
    .await
    .is_ok()
}

fn fast() -> Policy {
    Policy {
        delay: Duration::ZERO.into(),
        ..Policy::default()
    }
}

#[tokio::test(start_paused = true)]
async fn outcomes_baseline_and_attempts_add_up() {
    // a: fails, ok, fails, fails, fails, fails ...; b: always fails.
    let a = Script::new(&[false, true, false]);
    let b = Script::new(&[false]);
    let f = fixture(&[("a", a), ("b", b)], fast());
    let mut ok = 0;
    let mut failed = 0;
    for _ in 0..4 {
        if call(&f.pool).await {
            ok += 1
        } else {
            failed += 1
        }
    }
    let m = parse(&f.handle.render());
    let requests = |outcome| {
        value(
            &m,
            "retryctl_requests_total",
            &[("model", "m"), ("outcome", outcome)],
        )
    };
    assert_eq!(
        requests("success_first_try") + requests("success_after_retry"),
        ok as f64
    );
    assert_eq!(
        requests("failed_after_retry") + requests("failed_without_retry"),
        failed as f64
    );
    assert_eq!(requests("success_after_retry"), 1.0);
    assert_eq!(requests("failed_after_retry"), 3.0);
    assert_eq!(
        value(
            &m,
            "retryctl_requests_total",
            &[
                ("outcome", "failed_after_retry"),
                ("reason", "rounds_exhausted")
            ]
        ),
        3.0
    );
    // every request's first round failed
    assert_eq!(
        value(&m, "retryctl_first_round_failures_total", &[("model", "m")]),
        4.0
    );
    // attempts: 2 providers x 2 rounds for failures; the success needed
    // round 1 (2 failures) and then a success
    let attempts = value(&m, "retryctl_attempts_total", &[("model", "m")]);
    let ok_attempts = value(&m, "retryctl_attempts_total", &[("result", "ok")]);
    let refused = value(
        &m,
        "retryctl_attempts_total",
        &[("result", "connect_refused")],
    );
    assert_eq!(ok_attempts, 1.0);
    assert_eq!(attempts, ok_attempts + refused);
    let retries = value(&m, "retryctl_retries_total", &[("model", "m")]);
    // request 1: a, b fail; a succeeds in round 2 (1 retry). Requests 2-4:
    // both fail in both rounds (2 retries each).
    assert_eq!(retries, 7.0);
    assert_eq!(attempts, 15.0);
    // the attempts-per-request histogram saw 4 requests
    assert_eq!(
        value(&m, "retryctl_attempts_per_request_count", &[("model", "m")]),
        4.0
    );
    assert_eq!(
        value(&m, "retryctl_attempts_per_request_bucket", &[("le", "1")]),
        0.0
    );
    assert_eq!(
        value(&m, "retryctl_request_duration_seconds_count", &[]),
        4.0
    );
    assert_eq!(
        value(&m, "retryctl_attempt_duration_seconds_count", &[]),
        attempts
    );
}

#[tokio::test(start_paused = true)]
async fn budget_refusals_and_first_try_successes_are_counted() {
    let policy = Policy {
        budget: retryctl::policy::BudgetPolicy {
            ratio: 0.0,
            min_per_second: 1,
            ..Default::default()
        },
        ..fast()
    };
    let a = Script::new(&[false]);
    let f = fixture(&[("a", a)], policy);
    for _ in 0..15 {
        assert!(!call(&f.pool).await);
    }
    let m = parse(&f.handle.render());
    // 10 retries in the reserve, then 5 refusals
    assert_eq!(value(&m, "retryctl_retries_total", &[]), 10.0);
    assert_eq!(
        value(
            &m,
            "retryctl_retries_skipped_total",
            &[("reason", "budget")]
        ),
        5.0
    );
    assert_eq!(
        value(
            &m,
            "retryctl_requests_total",
            &[
                ("outcome", "failed_without_retry"),
                ("reason", "budget_exhausted")
            ]
        ),
        5.0
    );
    let ok = Script::new(&[true]);
    let f = fixture(&[("ok", ok)], fast());
    for _ in 0..3 {
        assert!(call(&f.pool).await);
    }
    let m = parse(&f.handle.render());
    assert_eq!(
        value(
            &m,
            "retryctl_requests_total",
            &[("outcome", "success_first_try")]
        ),
        3.0
    );
    assert_eq!(value(&m, "retryctl_first_round_failures_total", &[]), 0.0);
    assert_eq!(
        value(&m, "retryctl_attempts_per_request_bucket", &[("le", "1")]),
        3.0
    );
}

#[tokio::test(start_paused = true)]
async fn demotion_and_recovery_show_in_gauge_and_counters() {
    let policy = Policy {
        health: retryctl::policy::HealthPolicy {
            demote_after: 2,
            ..Default::default()
        },
        max_rounds: 1,
        ..fast()
    };
    let a = Script::new(&[false, false, true]);
    let f = fixture(&[("a", a)], policy);
    call(&f.pool).await;
    call(&f.pool).await;
    let m = parse(&f.handle.render());
    assert_eq!(
        value(&m, "retryctl_provider_demoted", &[("provider", "a")]),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "retryctl_provider_demotions_total",
            &[("provider", "a")]
        ),
        1.0
    );
    assert!(call(&f.pool).await);
    let m = parse(&f.handle.render());
    assert_eq!(
        value(&m, "retryctl_provider_demoted", &[("provider", "a")]),
        0.0
    );
    assert_eq!(
        value(
            &m,
            "retryctl_provider_recoveries_total",
            &[("provider", "a")]
        ),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn unknown_models_create_no_series() {
    let a = Script::new(&[true]);
    let f = fixture(&[("a", a)], fast());
    let before = f.handle.render().lines().count();
    for i in 0..10_000 {
        let r = f
            .pool
            .call(&format!("unknown-{i}"), |_| async {
                Ok::<_, io::Error>(())
            })
            .await;
        assert!(r.is_err());
    }
    let text = f.handle.render();
    assert!(!text.contains("unknown-"));
    assert_eq!(text.lines().count(), before);
    assert_eq!(
        value(&parse(&text), "retryctl_unknown_model_requests_total", &[]),
        10_000.0
    );
}

#[tokio::test(start_paused = true)]
async fn stats_snapshot_reports_recent_latency_and_errors() {
    let a = Script::new(&[false, true]);
    let f = fixture(&[("a", a)], fast());
    assert!(call(&f.pool).await);
    let s = &f.pool.stats()[0];
    assert_eq!((s.recent.attempts, s.recent.successes), (2, 1));
    assert_eq!(
        s.recent.failures,
        vec![(retryctl::Cause::ConnectRefused, 1)]
    );
    assert_eq!(s.recent.error_rate(), 0.5);
    assert!(s.recent.p50.is_some());
    assert_eq!(s.health.consecutive_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn the_policy_in_force_is_an_info_gauge_from_the_start() {
    let a = Script::new(&[true]);
    let f = fixture(&[("a", a)], fast());
    let version = f.pool.policy().load().version();
    let m = parse(&f.handle.render());
    assert_eq!(
        value(
            &m,
            "retryctl_policy_info",
            &[("hash", &format!("{version:016x}"))]
        ),
        1.0
    );
}

/// A pool whose providers answer after the latency they hold.
fn latency_fixture(
    providers: &[(&str, Duration)],
    policy: Policy,
) -> (MetricsHandle, Arc<Pool<Duration>>) {
    let recorder = telemetry::Recorder::new();
    let handle = recorder.handle();
    let pool = metrics::with_local_recorder(&recorder, || {
        let mut b = Pool::builder().policy(LivePolicy::new(policy).unwrap());
        for (name, took) in providers {
            b = b.provider("m", name, *took);
        }
        b.build().unwrap()
    });
    drop(recorder);
    (handle, Arc::new(pool))
}

async fn call_after(pool: &Pool<Duration>) -> bool {
    pool.call("m", |took: &Duration| {
        let took = *took;
        async move {
            tokio::time::sleep(took).await;
            Ok::<_, io::Error>(())
        }
    })
    .await
    .is_ok()
}

#[tokio::test(start_paused = true)]
async fn order_decisions_are_counted_by_label() {
    let mut policy = fast();
    policy.adaptive.latency_order = true;
    let (handle, pool) = latency_fixture(
        &[
            ("slow", Duration::from_millis(800)),
            ("fast", Duration::from_millis(20)),
        ],
        policy,
    );
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let pool = pool.clone();
        set.spawn(async move { call_after(&pool).await });
    }
    while set.join_next().await.is_some() {}
    tokio::time::advance(retryctl::stats::REFRESH).await;
    for _ in 0..10 {
        assert!(call_after(&pool).await);
    }
    let m = parse(&handle.render());
    let decision = |d: &str| {
        value(
            &m,
            "retryctl_order_decisions_total",
            &[("model", "m"), ("decision", d)],
        )
    };
    assert_eq!(decision("round_robin"), 200.0, "no samples yet");
    assert_eq!(decision("slow_last"), 10.0);
    assert_eq!(decision("fastest_first"), 0.0);
    // the slow provider was moved, not demoted
    assert_eq!(
        value(&m, "retryctl_provider_demoted", &[("provider", "slow")]),
        0.0
    );
}

#[tokio::test(start_paused = true)]
async fn retry_delay_sources_and_the_learned_delay_are_exported() {
    let mut policy = Policy {
        delay: retryctl::policy::RetryDelay::Auto,
        jitter: 0.0,
        ..Policy::default()
    };
    policy.budget.enabled = false;
    // every request: refused, then served after the delay
    let flaky: Vec<bool> = (0..50).map(|i| i % 2 == 1).collect();
    let f = fixture(&[("a", Script::new(&flaky))], policy);
    for _ in 0..25 {
        assert!(call(&f.pool).await);
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    let m = parse(&f.handle.render());
    let source = |s: &str| {
        value(
            &m,
            "retryctl_retry_delay_decisions_total",
            &[("model", "m"), ("source", s)],
        )
    };
    // 20 recoveries (delay_auto_min_samples) before the delay is learned
    assert_eq!(source("fallback"), 20.0);
    assert_eq!(source("learned"), 5.0);
    assert_eq!(source("fixed"), 0.0);
    // each recovery took the 500 ms fallback wait: that is what is learned
    let learned = value(
        &m,
        "retryctl_learned_retry_delay_seconds",
        &[("provider", "a")],
    );
    assert!((0.5..=0.504).contains(&learned), "{learned}");
}

#[tokio::test(start_paused = true)]
async fn shadow_decisions_and_failures_are_exported() {
    // live: 2 rounds; shadow: 1 round. a: refused then ok (a retry saves
    // it: the shadow would have caused that failure), then ok.
    let policy = Policy::from_toml("delay = \"0s\"\n[shadow]\nmax_rounds = 1\n").unwrap();
    let f = fixture(&[("a", Script::new(&[false, true, true]))], policy);
    assert!(call(&f.pool).await);
    assert!(call(&f.pool).await);
    let m = parse(&f.handle.render());
    let decision = |d: &str| {
        value(
            &m,
            "retryctl_shadow_decisions_total",
            &[("model", "m"), ("decision", d)],
        )
    };
    let effect = |e: &str| {
        value(
            &m,
            "retryctl_shadow_failures_total",
            &[("model", "m"), ("effect", e)],
        )
    };
    assert_eq!((decision("would_not_retry"), decision("agree")), (1.0, 1.0));
    assert_eq!(
        (decision("would_retry"), decision("would_demote")),
        (0.0, 0.0)
    );
    assert_eq!((effect("caused"), effect("saved")), (1.0, 0.0));
}

/// A recorder that wraps this crate's and counts the counter increments
/// and histogram samples that pass through it, as a fan-out to a second
/// recorder would see them. Ours is its first field (`repr(C)`), so the
/// two share an address: only their sizes tell them apart.
#[repr(C)]
struct Wrapper {
    inner: telemetry::Recorder,
    seen: Arc<std::sync::atomic::AtomicU64>,
}

struct Seen<H> {
    inner: H,
    seen: Arc<std::sync::atomic::AtomicU64>,
}

impl metrics::CounterFn for Seen<metrics::Counter> {
    fn increment(&self, value: u64) {
        self.seen.fetch_add(1, Ordering::Relaxed);
        self.inner.increment(value);
    }
    fn absolute(&self, value: u64) {
        self.inner.absolute(value);
    }
}

impl metrics::HistogramFn for Seen<metrics::Histogram> {
    fn record(&self, value: f64) {
        self.seen.fetch_add(1, Ordering::Relaxed);
        self.inner.record(value);
    }
}

impl metrics::Recorder for Wrapper {
    fn describe_counter(
        &self,
        k: metrics::KeyName,
        u: Option<metrics::Unit>,
        d: metrics::SharedString,
    ) {
        self.inner.describe_counter(k, u, d)
    }
    fn describe_gauge(
        &self,
        k: metrics::KeyName,
        u: Option<metrics::Unit>,
        d: metrics::SharedString,
    ) {
        self.inner.describe_gauge(k, u, d)
    }
    fn describe_histogram(
        &self,
        k: metrics::KeyName,
        u: Option<metrics::Unit>,
        d: metrics::SharedString,
    ) {
        self.inner.describe_histogram(k, u, d)
    }
    fn register_counter(&self, key: &metrics::Key, m: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::from_arc(Arc::new(Seen {
            inner: self.inner.register_counter(key, m),
            seen: self.seen.clone(),
        }))
    }
    fn register_gauge(&self, key: &metrics::Key, m: &metrics::Metadata<'_>) -> metrics::Gauge {
        self.inner.register_gauge(key, m)
    }
    fn register_histogram(
        &self,
        key: &metrics::Key,
        m: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::from_arc(Arc::new(Seen {
            inner: self.inner.register_histogram(key, m),
            seen: self.seen.clone(),
        }))
    }
}

/// Four calls (a success after a retry, three failures) through a pool
/// built under `recorder`.
async fn scripted_calls(recorder: &dyn metrics::Recorder) {
    let a = Script::new(&[false, true, false]);
    let b = Script::new(&[false]);
    let mut policy = fast();
    policy.admission.enabled = false;
    let pool = metrics::with_local_recorder(recorder, || {
        Pool::builder()
            .policy(LivePolicy::new(policy).unwrap())
            .provider("m", "a", a)
            .provider("m", "b", b)
            .build()
            .unwrap()
    });
    for _ in 0..4 {
        call(&pool).await;
    }
    // Then three first-try successes of 30 ms each, from a second model.
    let pool = metrics::with_local_recorder(recorder, || {
        Pool::builder()
            .provider("slow", "c", Duration::from_millis(30))
            .build()
            .unwrap()
    });
    for _ in 0..3 {
        let served = pool
            .call("slow", |d: &Duration| {
                let d = *d;
                async move {
                    tokio::time::sleep(d).await;
                    Ok::<_, io::Error>(())
                }
            })
            .await;
        assert!(served.is_ok());
    }
}

#[tokio::test(start_paused = true)]
async fn a_recorder_wrapping_ours_sees_every_update_and_both_paths_export_the_same() {
    // Installed directly, the recorder takes the pool's updates without
    // the facade's dynamic calls ...
    let direct = telemetry::Recorder::new();
    let direct_handle = direct.handle();
    scripted_calls(&direct).await;
    // ... and wrapped in another, through the facade, so the wrapper sees
    // them: the pool must not bypass it.
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let wrapper = Wrapper {
        inner: telemetry::Recorder::new(),
        seen: seen.clone(),
    };
    let wrapped_handle = wrapper.inner.handle();
    scripted_calls(&wrapper).await;
    // 4 requests: 15 attempts (a counter and a sample each), 4 outcomes,
    // 7 retries, 4 first-round failures, and 4 x 2 request samples; then
    // 3 first-try successes, 5 updates each.
    let updates = seen.load(Ordering::Relaxed);
    assert!(updates >= 15 * 2 + 4 + 7 + 4 + 4 * 2 + 3 * 5, "{updates}");
    // The same series with the same values either way (durations are
    // zero under paused time).
    let direct = parse(&direct_handle.render());
    let wrapped = parse(&wrapped_handle.render());
    assert!(
        value(&direct, "retryctl_attempts_total", &[("model", "m")]) == 15.0,
        "{direct:?}"
    );
    // The first-try successes, recorded in one pass on the direct path.
    let slow = |name: &str, labels: &[(&str, &str)]| {
        let mut all = vec![("model", "slow")];
        all.extend_from_slice(labels);
        value(&direct, name, &all)
    };
    assert_eq!(slow("retryctl_attempts_total", &[("result", "ok")]), 3.0);
    assert_eq!(
        slow(
            "retryctl_requests_total",
            &[("outcome", "success_first_try")]
        ),
        3.0
    );
    for name in [
        "retryctl_attempt_duration_seconds",
        "retryctl_request_duration_seconds",
    ] {
        assert_eq!(slow(&format!("{name}_bucket"), &[("le", "0.025")]), 0.0);
        assert_eq!(slow(&format!("{name}_bucket"), &[("le", "0.05")]), 3.0);
        let sum = slow(&format!("{name}_sum"), &[]);
        assert!((sum - 0.09).abs() < 0.003, "{name} {sum}");
    }
    assert_eq!(
        slow("retryctl_attempts_per_request_bucket", &[("le", "1")]),
        3.0
    );
    assert_eq!(slow("retryctl_attempts_per_request_sum", &[]), 3.0);
    let mut a: Vec<_> = direct.iter().collect();
    let mut b: Vec<_> = wrapped.iter().collect();
    a.sort_by(|x, y| x.0.cmp(y.0));
    b.sort_by(|x, y| x.0.cmp(y.0));
    assert_eq!(a, b);
}

#[tokio::test(start_paused = true)]
async fn another_recorder_gets_no_trace_of_the_probe() {
    // The exporter's own recorder, as an application may install it.
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    scripted_calls(&recorder).await;
    let text = handle.render();
    assert!(text.contains("retryctl_attempts_total"), "{text}");
    assert!(!text.contains("recorder_probe"), "{text}");
}
