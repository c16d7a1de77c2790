//! Prometheus metrics: names, per-route handles, and (feature `prometheus`)
//! the recorder that renders them.
//!
//! Metrics go through the [`metrics`] facade. The pool resolves every handle
//! it will ever touch when it is built (per model and per provider, for
//! every outcome and every cause), so the request path increments ready
//! handles: no string formatting, no allocation, no label lookup. Label
//! values come only from configuration (model and provider names) and fixed
//! enums; a request for an unknown model increments one unlabelled counter
//! and creates no series.
//!
//! Install a recorder (this crate's [`Recorder`], or any `metrics`
//! recorder the embedding application uses) **before** building the pool:
//! handles resolved with no recorder installed record nothing. Serving
//! `/metrics` is the application's job: mount [`MetricsHandle::render`] on
//! a route of its own server (the reference gateway's is in
//! `retryctl-gateway`).
//!
//! When the recorder installed is this crate's [`Recorder`] itself, the
//! pool registers the counters and histograms its requests update straight
//! with it, and updates them with direct, inlined calls instead of the
//! facade's dynamic ones (one recorder's own series, the same text either
//! way). A recorder that wraps this crate's (a fan-out, a layer) is left
//! in the path: it may want to see every update.
//!
//! Histograms are bucketed (`_bucket` / `_sum` / `_count`) with explicit
//! buckets: summaries cannot be aggregated across gateway replicas. The
//! [`Recorder`] keeps them in fixed-bucket atomics of its own (a sample
//! costs two relaxed atomic updates) and Prometheus's recorder keeps the
//! counters and gauges.
//!
//! The names below are under the default prefix, `retryctl_`;
//! [`PoolBuilder::metrics_prefix`](crate::pool::PoolBuilder::metrics_prefix)
//! replaces it in every one (and
//! [`ReloadOptions::metrics_prefix`](crate::reload::ReloadOptions::metrics_prefix)
//! in the reload metrics, see [`prefixed`]).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `retryctl_requests_total` | counter | model, outcome, reason |
//! | `retryctl_first_round_failures_total` | counter | model |
//! | `retryctl_fallbacks_total` | counter | model |
//! | `retryctl_attempts_total` | counter | model, provider, result |
//! | `retryctl_retries_total` | counter | model |
//! | `retryctl_retries_skipped_total` | counter | model, reason |
//! | `retryctl_provider_demotions_total` | counter | model, provider |
//! | `retryctl_provider_recoveries_total` | counter | model, provider |
//! | `retryctl_unknown_model_requests_total` | counter | |
//! | `retryctl_provider_demoted` | gauge | model, provider |
//! | `retryctl_retry_budget_scale` | gauge | model |
//! | `retryctl_policy_info` | gauge | hash |
//! | `retryctl_attempt_duration_seconds` | histogram | model, provider |
//! | `retryctl_request_duration_seconds` | histogram | model |
//! | `retryctl_attempts_per_request` | histogram | model |
//! | `retryctl_retry_delay_seconds` | histogram | model |
//!
//! The adaptive decisions' metrics are resolved by the pool, next to the
//! decisions they label (`pool/adaptive.rs`, `pool/shadow.rs`):
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `retryctl_order_decisions_total` | counter | model, decision |
//! | `retryctl_retry_delay_decisions_total` | counter | model, source |
//! | `retryctl_learned_retry_delay_seconds` | gauge | model, provider |
//! | `retryctl_shadow_decisions_total` | counter | model, decision |
//! | `retryctl_shadow_failures_total` | counter | model, effect |
//!
//! And the admission gate's (`pool/admission.rs`):
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `retryctl_admission_limit` | gauge | model, provider |
//! | `retryctl_admission_down` | gauge | model, provider |
//! | `retryctl_admission_in_flight` | gauge | model, provider |
//! | `retryctl_admission_waiting` | gauge | model, provider |
//! | `retryctl_admission_wait_seconds` | histogram | model, provider |
//! | `retryctl_admission_total` | counter | model, provider, outcome |
//! | `retryctl_admission_transitions_total` | counter | model, provider, event |
//! | `retryctl_admission_max_wait_seconds` | gauge | model |

use std::time::Duration;

#[cfg(feature = "prometheus")]
use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata};

use crate::classify::Cause;
use crate::stats;

#[cfg(feature = "prometheus")]
mod recorder;

#[cfg(feature = "prometheus")]
pub use self::recorder::{MetricsHandle, Recorder};

/// Where a pool registers the counters and histograms its requests
/// update: straight into this crate's [`Recorder`] when that is the
/// recorder installed, else through the `metrics` facade. A facade handle
/// is an optional `Arc<dyn ...>`: every update is a check and a dynamic
/// call that nothing can inline, five of them per request. The pool's
/// other metrics (gauges, the adaptive decisions', the admission gate's)
/// always go through the facade.
#[derive(Clone, Debug, Default)]
pub(crate) struct Sink {
    #[cfg(feature = "prometheus")]
    native: Option<Arc<recorder::Registry>>,
}

/// What the `metrics` macros say of a metric registered here.
static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

impl Sink {
    /// Where the recorder installed now (this thread's local one, or the
    /// global one) takes the pool's metrics: this crate's recorder
    /// directly only when it is that recorder itself (not one wrapped in
    /// another, say a fan-out, which must see every update).
    pub(crate) fn detect() -> Sink {
        Sink {
            #[cfg(feature = "prometheus")]
            native: recorder::installed_registry(),
        }
    }

    pub(crate) fn counter(&self, name: String, labels: Vec<Label>) -> CounterHandle {
        let key = Key::from_parts(name, labels);
        #[cfg(feature = "prometheus")]
        if let Some(registry) = &self.native {
            return CounterHandle::Native(registry.counter(&key));
        }
        CounterHandle::Facade(metrics::with_recorder(|r| {
            r.register_counter(&key, &METADATA)
        }))
    }

    pub(crate) fn histogram(&self, name: String, labels: Vec<Label>) -> HistogramHandle {
        let key = Key::from_parts(name, labels);
        #[cfg(feature = "prometheus")]
        if let (Some(registry), Some(bounds)) = (&self.native, buckets_for(key.name())) {
            return HistogramHandle::Native(registry.histogram(&key, bounds));
        }
        HistogramHandle::Facade(metrics::with_recorder(|r| {
            r.register_histogram(&key, &METADATA)
        }))
    }
}

/// A counter of the request path (see [`Sink`]).
#[derive(Debug)]
pub(crate) enum CounterHandle {
    Facade(Counter),
    #[cfg(feature = "prometheus")]
    Native(Arc<recorder::StripedCounter>),
}

impl CounterHandle {
    #[inline]
    pub(crate) fn increment(&self, value: u64) {
        match self {
            CounterHandle::Facade(c) => c.increment(value),
            #[cfg(feature = "prometheus")]
            CounterHandle::Native(c) => metrics::CounterFn::increment(&**c, value),
        }
    }
}

/// A histogram of the request path (see [`Sink`]).
#[derive(Debug)]
pub(crate) enum HistogramHandle {
    Facade(Histogram),
    #[cfg(feature = "prometheus")]
    Native(Arc<recorder::BucketHistogram>),
}

impl HistogramHandle {
    #[inline]
    pub(crate) fn record(&self, value: f64) {
        match self {
            HistogramHandle::Facade(h) => h.record(value),
            #[cfg(feature = "prometheus")]
            HistogramHandle::Native(h) => metrics::HistogramFn::record(&**h, value),
        }
    }
}

/// The default metric name prefix.
pub const DEFAULT_PREFIX: &str = "retryctl_";

/// Buckets of the `_seconds` histograms: 1 ms (a loopback attempt) to
/// 10 min (a long generation).
pub(crate) const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

/// Buckets of `attempts_per_request` (gRPC's 1..5, and one for more).
pub(crate) const ATTEMPTS_BUCKETS: &[f64] = &[1.0, 2.0, 3.0, 4.0, 5.0, 10.0];

/// Buckets of `retry_delay_seconds`.
pub(crate) const DELAY_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 60.0,
];

/// The bucket bounds retryctl uses for a histogram named `name`, if any:
/// `*retry_delay_seconds` and `*attempts_per_request` have their own,
/// every other `*_seconds` the latency buckets. An application that
/// installs its own recorder sets these to keep the dashboards' bucket
/// queries right (this crate's [`Recorder`] does).
pub fn buckets_for(name: &str) -> Option<&'static [f64]> {
    if name.ends_with("retry_delay_seconds") {
        Some(DELAY_BUCKETS)
    } else if name.ends_with("attempts_per_request") {
        Some(ATTEMPTS_BUCKETS)
    } else if name.ends_with("_seconds") {
        Some(SECONDS_BUCKETS)
    } else {
        None
    }
}

/// Request outcome label values.
pub(crate) const OUTCOMES: [&str; 4] = [
    "success_first_try",
    "success_after_retry",
    "failed_after_retry",
    "failed_without_retry",
];

/// Failure reason label values (`none` for successes).
const REASONS: [&str; 9] = [
    "permanent",
    "not_retryable",
    "rounds_exhausted",
    "budget_exhausted",
    "deadline_exceeded",
    "retry_after_too_long",
    "retry_cannot_finish",
    "admission_timeout",
    "admission_queue_full",
];

/// Why a retry was not made, as a label value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Skip {
    Budget = 0,
    Deadline = 1,
    RetryAfter = 2,
    /// `adaptive.deadline_aware` predicted the retry could not finish.
    DeadlinePredicted = 3,
}

const SKIPS: [&str; 4] = ["budget", "deadline", "retry_after", "deadline_predicted"];

/// The index of a failure reason label (see `FailReason::as_str`); an
/// unknown label counts as `not_retryable`.
fn reason_index(reason: &str) -> usize {
    REASONS.iter().position(|r| *r == reason).unwrap_or(1)
}

/// Handles for one model, resolved once.
#[derive(Debug)]
pub(crate) struct ModelMetrics {
    success_first_try: CounterHandle,
    success_after_retry: CounterHandle,
    /// [after retry, without retry] x reason.
    failed: [[CounterHandle; REASONS.len()]; 2],
    first_round_failures: CounterHandle,
    fallbacks: CounterHandle,
    retries: CounterHandle,
    skipped: [CounterHandle; SKIPS.len()],
    request_duration: HistogramHandle,
    attempts_per_request: HistogramHandle,
    retry_delay: HistogramHandle,
    budget_scale: Gauge,
    admission_max_wait: Gauge,
}

/// Handles for one route (model x provider), resolved once.
#[derive(Debug)]
pub(crate) struct RouteMetrics {
    /// Indexed by [`stats::result_index`]: `ok`, then every cause.
    attempts: [CounterHandle; 1 + Cause::ALL.len()],
    attempt_duration: HistogramHandle,
    demoted: Gauge,
    demotions: CounterHandle,
    recoveries: CounterHandle,
    /// Requests served at once, when every series they update is in this
    /// crate's recorder.
    #[cfg(feature = "prometheus")]
    at_once: Option<recorder::AtOnce>,
}

impl ModelMetrics {
    pub(crate) fn new(sink: &Sink, prefix: &str, model: &str) -> Self {
        let name = |n: &str| format!("{prefix}{n}");
        let m = || Label::new("model", model.to_owned());
        let counter = |n: &str, more: &[(&'static str, &'static str)]| {
            let labels = std::iter::once(m())
                .chain(more.iter().map(|&(k, v)| Label::new(k, v)))
                .collect();
            sink.counter(name(n), labels)
        };
        let requests = |outcome: &'static str, reason: &'static str| {
            counter(
                "requests_total",
                &[("outcome", outcome), ("reason", reason)],
            )
        };
        ModelMetrics {
            success_first_try: requests(OUTCOMES[0], "none"),
            success_after_retry: requests(OUTCOMES[1], "none"),
            failed: [
                REASONS.map(|r| requests(OUTCOMES[2], r)),
                REASONS.map(|r| requests(OUTCOMES[3], r)),
            ],
            first_round_failures: counter("first_round_failures_total", &[]),
            fallbacks: counter("fallbacks_total", &[]),
            retries: counter("retries_total", &[]),
            skipped: SKIPS.map(|r| counter("retries_skipped_total", &[("reason", r)])),
            request_duration: sink.histogram(name("request_duration_seconds"), vec![m()]),
            attempts_per_request: sink.histogram(name("attempts_per_request"), vec![m()]),
            retry_delay: sink.histogram(name("retry_delay_seconds"), vec![m()]),
            budget_scale: {
                let g = metrics::gauge!(name("retry_budget_scale"), "model" => model.to_owned());
                g.set(1.0);
                g
            },
            admission_max_wait: metrics::gauge!(name("admission_max_wait_seconds"), "model" => model.to_owned()),
        }
    }

    /// A served request (`retried`: it re-attempted a provider).
    #[inline]
    pub(crate) fn served(&self, retried: bool, attempts: u32, elapsed: Duration, fell_back: bool) {
        if !retried {
            self.success_first_try.increment(1);
        } else {
            self.success_after_retry.increment(1);
            self.first_round_failures.increment(1);
        }
        if fell_back {
            self.fallbacks.increment(1);
        }
        self.request_duration.record(elapsed.as_secs_f64());
        self.attempts_per_request.record(f64::from(attempts));
    }

    /// A request served by its first attempt after `elapsed` nanoseconds
    /// (one attempt, no time at a gate, so the attempt's duration is the
    /// request's): what `route.attempt(None, elapsed)` and
    /// `self.served(false, 1, elapsed, fell_back)` record, as one
    /// histogram sample when this crate's recorder takes the route's and
    /// the model's metrics ([`recorder::AtOnce`]).
    #[inline]
    pub(crate) fn served_at_once(&self, route: &RouteMetrics, elapsed: u64, fell_back: bool) {
        #[cfg(feature = "prometheus")]
        if let Some(at_once) = &route.at_once {
            if fell_back {
                self.fallbacks.increment(1);
            }
            at_once.record(elapsed);
            return;
        }
        let elapsed = Duration::from_nanos(elapsed);
        route.attempt(None, elapsed);
        self.served(false, 1, elapsed, fell_back);
    }

    /// A failed request.
    pub(crate) fn failed(&self, reason: &str, retried: bool, attempts: u32, elapsed: Duration) {
        self.failed[usize::from(!retried)][reason_index(reason)].increment(1);
        self.first_round_failures.increment(1);
        self.request_duration.record(elapsed.as_secs_f64());
        self.attempts_per_request.record(f64::from(attempts));
    }

    #[inline]
    pub(crate) fn retry(&self) {
        self.retries.increment(1);
    }

    pub(crate) fn retry_delay(&self, wait: Duration) {
        self.retry_delay.record(wait.as_secs_f64());
    }

    /// The share of `budget.ratio` new requests deposit (adaptive budget).
    pub(crate) fn budget_scale(&self, scale: f64) {
        self.budget_scale.set(scale);
    }

    /// The model's `admission.max_wait`, when a policy is put in force.
    pub(crate) fn admission_max_wait(&self, max_wait: Duration) {
        self.admission_max_wait.set(max_wait.as_secs_f64());
    }

    pub(crate) fn skipped(&self, why: Skip) {
        self.skipped[why as usize].increment(1);
    }
}

impl RouteMetrics {
    pub(crate) fn new(
        sink: &Sink,
        prefix: &str,
        model: &str,
        provider: &str,
        of_model: &ModelMetrics,
    ) -> Self {
        let name = |n: &str| format!("{prefix}{n}");
        let labels = |more: Option<(&'static str, &'static str)>| {
            let mut labels = vec![
                Label::new("model", model.to_owned()),
                Label::new("provider", provider.to_owned()),
            ];
            labels.extend(more.map(|(k, v)| Label::new(k, v)));
            labels
        };
        let attempts = std::array::from_fn(|i| {
            let result = if i == 0 {
                "ok"
            } else {
                Cause::ALL[i - 1].as_str()
            };
            sink.counter(name("attempts_total"), labels(Some(("result", result))))
        });
        let demoted = metrics::gauge!(name("provider_demoted"), "model" => model.to_owned(), "provider" => provider.to_owned());
        demoted.set(0.0);
        let attempt_duration = sink.histogram(name("attempt_duration_seconds"), labels(None));
        #[cfg(feature = "prometheus")]
        let at_once = match (
            &attempts[stats::result_index(None)],
            &attempt_duration,
            &of_model.success_first_try,
            &of_model.request_duration,
            &of_model.attempts_per_request,
        ) {
            (
                CounterHandle::Native(ok),
                HistogramHandle::Native(attempt),
                CounterHandle::Native(first_try),
                HistogramHandle::Native(request),
                HistogramHandle::Native(attempts),
            ) => recorder::AtOnce::link(ok, attempt, first_try, request, attempts),
            _ => None,
        };
        #[cfg(not(feature = "prometheus"))]
        let _ = of_model;
        RouteMetrics {
            attempts,
            attempt_duration,
            demoted,
            demotions: sink.counter(name("provider_demotions_total"), labels(None)),
            recoveries: sink.counter(name("provider_recoveries_total"), labels(None)),
            #[cfg(feature = "prometheus")]
            at_once,
        }
    }

    /// One finished attempt (`None`: success).
    #[inline]
    pub(crate) fn attempt(&self, cause: Option<Cause>, elapsed: Duration) {
        self.attempts[stats::result_index(cause)].increment(1);
        self.attempt_duration.record(elapsed.as_secs_f64());
    }

    pub(crate) fn demoted(&self) {
        self.demotions.increment(1);
        self.demoted.set(1.0);
    }

    pub(crate) fn recovered(&self) {
        self.recoveries.increment(1);
        self.demoted.set(0.0);
    }
}

/// Registers the HELP text and unit of every pool metric with the current
/// recorder (Prometheus requires help text; `promtool check metrics` lints
/// its absence).
pub(crate) fn describe(prefix: &str) {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    let n = |name: &str| format!("{prefix}{name}");
    describe_counter!(
        n("requests_total"),
        Unit::Count,
        "Logical requests by model, outcome (success_first_try, success_after_retry, failed_after_retry, failed_without_retry) and failure reason."
    );
    describe_counter!(
        n("first_round_failures_total"),
        Unit::Count,
        "Requests whose first round failed: what would have failed without retries."
    );
    describe_counter!(
        n("fallbacks_total"),
        Unit::Count,
        "Requests served by a provider other than the first one tried."
    );
    describe_counter!(
        n("attempts_total"),
        Unit::Count,
        "Upstream attempts by model, provider and result (ok or the failure cause)."
    );
    describe_counter!(
        n("retries_total"),
        Unit::Count,
        "Retry attempts: attempts in rounds after the first."
    );
    describe_counter!(
        n("retries_skipped_total"),
        Unit::Count,
        "Retries not made, by reason: budget, deadline, retry_after, deadline_predicted."
    );
    describe_counter!(
        n("provider_demotions_total"),
        Unit::Count,
        "Times a provider was demoted after consecutive failed requests."
    );
    describe_counter!(
        n("provider_recoveries_total"),
        Unit::Count,
        "Times a demoted provider succeeded and was restored."
    );
    describe_counter!(
        n("unknown_model_requests_total"),
        Unit::Count,
        "Requests for a model the pool does not know (no model label by design)."
    );
    describe_gauge!(
        n("retry_budget_scale"),
        "Share of budget.ratio new requests deposit: below 1 while the adaptive budget sees retries failing."
    );
    describe_gauge!(
        n("provider_demoted"),
        "1 while the provider is demoted (tried after the healthy ones), else 0."
    );
    describe_histogram!(
        n("attempt_duration_seconds"),
        Unit::Seconds,
        "Duration of one upstream attempt, until the operation returned (response headers)."
    );
    describe_histogram!(
        n("request_duration_seconds"),
        Unit::Seconds,
        "Duration of a logical request, all rounds and waits included."
    );
    describe_histogram!(
        n("attempts_per_request"),
        Unit::Count,
        "Upstream attempts per logical request."
    );
    describe_histogram!(
        n("retry_delay_seconds"),
        Unit::Seconds,
        "Time waited before a retry."
    );
}

/// The info gauge naming the policy in force: `hash` is its version in 16
/// hex digits; 1 for the active one, 0 for the one it replaced. The name
/// with the default prefix (see [`prefixed`]).
pub const POLICY_INFO: &str = "retryctl_policy_info";

/// The name a metric named `default_name` (under [`DEFAULT_PREFIX`], as
/// the name constants are written) has under `prefix`:
/// `prefixed("acme_", POLICY_INFO)` is `acme_policy_info`. Every metric
/// retryctl exports takes the prefix the same way.
pub fn prefixed(prefix: &str, default_name: &str) -> String {
    let base = default_name
        .strip_prefix(DEFAULT_PREFIX)
        .unwrap_or(default_name);
    format!("{prefix}{base}")
}

/// A policy version as the `hash` label writes it.
pub(crate) fn policy_hash(version: u64) -> String {
    format!("{version:016x}")
}

/// Reports that `new` replaced `old` as the policy in force, in the info
/// gauge under `prefix`.
pub(crate) fn policy_in_force(prefix: &str, old: Option<u64>, new: u64) {
    let name = prefixed(prefix, POLICY_INFO);
    if let Some(old) = old.filter(|&o| o != new) {
        metrics::gauge!(name.clone(), "hash" => policy_hash(old)).set(0.0);
    }
    metrics::gauge!(name, "hash" => policy_hash(new)).set(1.0);
}

/// The counter of requests for models the pool does not know (no model
/// label: outside input must not create series).
pub(crate) fn unknown_model(prefix: &str) -> Counter {
    metrics::counter!(format!("{prefix}unknown_model_requests_total"))
}

#[cfg(all(test, feature = "prometheus"))]
mod tests {
    use super::*;

    #[test]
    fn only_our_own_recorder_installed_as_it_is_is_written_directly() {
        let ours = Recorder::new();
        let handle = ours.handle();
        let sink = metrics::with_local_recorder(&ours, Sink::detect);
        assert!(sink.native.is_some());
        // and a counter from it is the registry's own
        let c = sink.counter("x_total".into(), vec![Label::new("model", "m")]);
        assert!(matches!(c, CounterHandle::Native(_)));
        c.increment(2);
        assert!(handle.render().contains("x_total{model=\"m\"} 2"));
        // Foreign, or none: the facade (a wrapper around ours:
        // tests/metrics, `a_recorder_wrapping_ours_sees_every_update...`).
        let foreign = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        assert!(
            metrics::with_local_recorder(&foreign, Sink::detect)
                .native
                .is_none()
        );
        assert!(
            metrics::with_local_recorder(&metrics::NoopRecorder, Sink::detect)
                .native
                .is_none()
        );
        let h = metrics::with_local_recorder(&foreign, || {
            Sink::detect().histogram("x_seconds".into(), vec![])
        });
        assert!(matches!(h, HistogramHandle::Facade(_)));
    }
}
