//! The provider pool: per model, an ordered set of providers, tried in
//! rounds under one policy snapshot per request.
//!
//! # The path of one request
//!
//! [`Pool::call`] reads the clock, looks up the model (an unknown model is
//! a typed error and touches no state), loads **one** policy snapshot,
//! deposits into the model's retry budget and plans the order (healthy
//! providers round-robin, demoted ones last, a due probe first). Round 1
//! tries every provider once with no wait between them. Each failure is
//! classified; a permanent one ends the call at once. When the round fails
//! and some provider's *own* error was retryable, the next round retries
//! just those providers after the policy's jittered delay (or the
//! provider's Retry-After), if the budget and the deadline allow.
//!
//! Health is updated as attempts finish, but each provider is counted at
//! most once per request, and only for failures that are its fault.
//!
//! # Waiting instead of failing: admission
//!
//! Every attempt passes its provider's admission gate (`[admission]`, on
//! by default; see `admission.rs`): open, it costs one atomic add. A
//! failure at *connection level* (refused, connect timeout, unsent) limits
//! the provider's attempts in flight;
//! a failure at the floor marks it down, and then only one probe at a
//! time reaches it while the other requests wait in line. A request whose
//! attempt the upstream never received (refused, connect timeout, unsent)
//! is attempted again when the gate admits it, in the same round: that
//! re-send costs the upstream nothing, so it spends no retry budget and no
//! round, and is bounded by `admission.max_wait` (over the whole request)
//! and the deadline instead. Another provider that can take the request
//! now is tried first, without waiting. Retries of requests the upstream
//! did receive keep their rounds, delay and budget.
//!
//! # What is retried, and what is not
//!
//! The pool retries until the operation *returns*. For an HTTP upstream
//! that is the response headers (or, for streaming, the first event: see
//! the gateway). The body or stream that follows belongs to the caller and
//! is never replayed by the pool: once a byte has reached the client, a
//! retry would duplicate it.
//!
//! # Cancellation
//!
//! Dropping the future returned by [`Pool::call`] cancels the wait or the
//! attempt in progress. Health only ever moves on a finished attempt, a
//! probe slot is released by a guard, and a budget token is spent just
//! before the retry it pays for, so every counter stays consistent.

mod adaptive;
mod admission;
mod call;
mod names;
mod order;
mod outcome;
mod schedule;
mod shadow;
mod timer;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::clock::Moment;

use crate::budget::RetryBudget;
use crate::classifier::DefaultClassifier;
use crate::clock::Clock;
use crate::health::{HealthSnapshot, ProviderHealth};
use crate::live::{ActivePolicy, LivePolicy};
use crate::stats::{RouteStats, WindowStats};
use crate::telemetry::{self, ModelMetrics, RouteMetrics};

pub use self::admission::GateSnapshot;
pub use self::call::CallOptions;
pub use self::outcome::{AttemptError, FailReason, FailedAttempt, PoolError, Report, Served};
pub use self::shadow::ShadowCounts;

/// The most providers one model may have (per-request state is a 64-bit
/// set).
pub const MAX_PROVIDERS_PER_MODEL: usize = 64;

/// A provider serving one model, with its health for that model.
///
/// Health is per route (model x provider): a backend that lost one model
/// must not demote the provider for the models it still serves.
#[derive(Debug)]
struct Route<P> {
    name: &'static str,
    provider: P,
    health: ProviderHealth,
    stats: RouteStats,
    metrics: RouteMetrics,
    /// State and metric handles of the adaptive decisions.
    adaptive: adaptive::RouteAdaptive,
    /// The admission gate every attempt passes.
    gate: admission::Gate,
    /// When this provider's client has its own connect timeout: the end of
    /// its attempts' connect phase (`None`: the policy's
    /// `timeouts.connect`).
    connect: Option<Duration>,
}

#[derive(Debug)]
struct Model<P> {
    name: &'static str,
    routes: Box<[Route<P>]>,
    rr: AtomicUsize,
    budget: RetryBudget,
    metrics: ModelMetrics,
    /// Handles of the adaptive decisions' metrics.
    adaptive: adaptive::AdaptiveMetrics,
    /// What the shadow policy would have done.
    shadow: shadow::ShadowModel,
    /// Where the model's calls read the time (see [`crate::clock`]).
    clock: Clock,
}

/// Up to this many models, [`Pool::model`] scans instead of hashing.
const SCAN_MODELS: usize = 8;

/// Routes requests for each model across its providers, retrying transient
/// failures under a [`LivePolicy`].
///
/// `P` is whatever the operation needs to reach one provider (a client and
/// a base URL, say); the pool hands the operation a `&P` per attempt.
///
/// ```
/// use retryctl::Pool;
/// use retryctl::policy::LivePolicy;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = Pool::builder()
///     .provider("gpt-oss-120b", "proxy-a", "http://10.0.0.1")
///     .provider("gpt-oss-120b", "proxy-b", "http://10.0.0.2")
///     .policy(LivePolicy::default())
///     .build()?;
/// let served = pool
///     .call("gpt-oss-120b", |base_url: &&str| {
///         let url = format!("{base_url}/v1/chat/completions");
///         async move { Ok::<_, std::io::Error>(url) }
///     })
///     .await?;
/// assert_eq!(served.value, "http://10.0.0.1/v1/chat/completions");
/// assert_eq!((served.attempts(), served.rounds(), served.fell_back), (1, 1, false));
/// # Ok(()) }
/// ```
///
/// **Time.** A call reads the clock when it starts and when each attempt
/// ends. The pool reads the CPU's time-stamp counter where it has an
/// invariant one (about 10 ns against 27 ns for `clock_gettime` on a
/// virtual machine), anchored to tokio's clock so that deadlines and
/// waits stay tokio timers, and keeps its readings as integer nanoseconds
/// (a `u64` difference is one instruction, an `Instant` difference about
/// thirty). A pool built while tokio's
/// clock is paused (`#[tokio::test(start_paused = true)]`,
/// `tokio::time::pause()`) keeps tokio's clock for its whole life: build a
/// pool that a test drives with paused time after pausing it.
pub struct Pool<P, C = DefaultClassifier> {
    models: Vec<Model<P>>,
    /// How failed attempts are classified.
    pub(super) classifier: C,
    /// Model name to index, looked up on every request. foldhash rather
    /// than SipHash: about 5x fewer instructions per lookup, and still
    /// seeded per map, so request-chosen names cannot aim collisions.
    index: HashMap<&'static str, usize, foldhash::fast::RandomState>,
    policy: LivePolicy,
    unknown_model: metrics::Counter,
    /// The metric name prefix (for the policy info gauge).
    prefix: Arc<str>,
    /// The policy version last reported as in force.
    policy_seen: AtomicU64,
    /// Where calls read the time: every model's clock (see
    /// [`crate::clock`]), read first thing in a call.
    clock: Clock,
}

impl<P, C> fmt::Debug for Pool<P, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("models", &self.index.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// A model's providers, by name, in the order they were added.
type Providers<P> = Vec<(Arc<str>, P)>;

/// Builds a [`Pool`].
pub struct PoolBuilder<P, C = DefaultClassifier> {
    models: Vec<(Arc<str>, Providers<P>)>,
    classifier: C,
    policy: Option<LivePolicy>,
    prefix: Option<String>,
    connect: Vec<(Arc<str>, Duration)>,
}

impl<P, C> fmt::Debug for PoolBuilder<P, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolBuilder").finish_non_exhaustive()
    }
}

/// A pool that cannot be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// No provider was added.
    #[error("the pool has no providers")]
    Empty,
    /// A model or provider name is empty.
    #[error("model and provider names must not be empty")]
    EmptyName,
    /// The same provider name was added twice for one model.
    #[error("provider {provider:?} is listed twice for model {model:?}")]
    DuplicateProvider {
        /// The model.
        model: String,
        /// The provider.
        provider: String,
    },
    /// A model has more than [`MAX_PROVIDERS_PER_MODEL`] providers.
    #[error("model {model:?} has {count} providers; at most {MAX_PROVIDERS_PER_MODEL} are allowed")]
    TooManyProviders {
        /// The model.
        model: String,
        /// How many it has.
        count: usize,
    },
}

impl<P> Default for PoolBuilder<P> {
    fn default() -> Self {
        PoolBuilder {
            models: Vec::new(),
            classifier: DefaultClassifier,
            policy: None,
            prefix: None,
            connect: Vec::new(),
        }
    }
}

impl<P, C> PoolBuilder<P, C> {
    /// Adds `provider`, named `name`, to the end of `model`'s order.
    pub fn provider(mut self, model: &str, name: &str, provider: P) -> Self {
        let entry = match self.models.iter_mut().position(|(m, _)| &**m == model) {
            Some(i) => &mut self.models[i].1,
            None => {
                self.models.push((Arc::from(model), Vec::new()));
                &mut self.models.last_mut().expect("just pushed").1
            }
        };
        entry.push((Arc::from(name), provider));
        self
    }

    /// The connect timeout of `provider`'s client, when it is not the
    /// policy's `timeouts.connect` (for every model it serves). The
    /// admission gate holds a slot for an attempt through its connect
    /// phase only, and takes an attempt that is still running when the
    /// phase is over as connected: the phase must end when the client's
    /// connect timeout does.
    pub fn connect_timeout(mut self, provider: &str, timeout: Duration) -> Self {
        self.connect.retain(|(p, _)| &**p != provider);
        self.connect.push((Arc::from(provider), timeout));
        self
    }

    /// The policy handle (default: [`LivePolicy::default`]).
    pub fn policy(mut self, policy: LivePolicy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// The metric name prefix (default `retryctl_`) of every metric the
    /// pool exports, the policy info gauge included. Give a
    /// [`PolicyWatcher`](crate::reload::PolicyWatcher) following the same policy
    /// the same prefix ([`ReloadOptions::metrics_prefix`](crate::reload::ReloadOptions::metrics_prefix)).
    pub fn metrics_prefix(mut self, prefix: &str) -> Self {
        self.prefix = Some(prefix.to_owned());
        self
    }

    /// How the pool classifies failed attempts (default: the error type's
    /// own [`Classify`](crate::Classify) impl). A function
    /// `Fn(&E, &Rules) -> Verdict` will do, so an error type from another
    /// crate needs no newtype; see [`Classifier`](crate::Classifier).
    pub fn classifier<C2>(self, classifier: C2) -> PoolBuilder<P, C2> {
        PoolBuilder {
            models: self.models,
            classifier,
            policy: self.policy,
            prefix: self.prefix,
            connect: self.connect,
        }
    }

    /// Checks the routes and builds the pool, resolving every metric handle
    /// (install the metrics recorder before this).
    pub fn build(self) -> Result<Pool<P, C>, BuildError> {
        let prefix: Arc<str> = self
            .prefix
            .as_deref()
            .unwrap_or(telemetry::DEFAULT_PREFIX)
            .into();
        telemetry::describe(&prefix);
        adaptive::describe(&prefix);
        shadow::describe(&prefix);
        admission::describe(&prefix);
        if self.models.is_empty() {
            return Err(BuildError::Empty);
        }
        let sink = telemetry::Sink::detect();
        // Read once: whether this runtime's clock is paused (tests) decides
        // where every call of the pool reads the time.
        let clock = Clock::detect();
        let mut models = Vec::with_capacity(self.models.len());
        let mut index = HashMap::with_capacity_and_hasher(
            self.models.len(),
            foldhash::fast::RandomState::default(),
        );
        for (name, providers) in self.models {
            if name.is_empty() || providers.iter().any(|(p, _)| p.is_empty()) {
                return Err(BuildError::EmptyName);
            }
            if providers.len() > MAX_PROVIDERS_PER_MODEL {
                return Err(BuildError::TooManyProviders {
                    model: name.to_string(),
                    count: providers.len(),
                });
            }
            for (i, (p, _)) in providers.iter().enumerate() {
                if providers[..i].iter().any(|(q, _)| q == p) {
                    return Err(BuildError::DuplicateProvider {
                        model: name.to_string(),
                        provider: p.to_string(),
                    });
                }
            }
            let name = names::intern(&name);
            let model_metrics = ModelMetrics::new(&sink, &prefix, name);
            let routes = providers
                .into_iter()
                .map(|(provider_name, provider)| {
                    let connect = self
                        .connect
                        .iter()
                        .find(|(p, _)| *p == provider_name)
                        .map(|(_, t)| *t);
                    let provider_name = names::intern(&provider_name);
                    Route {
                        metrics: RouteMetrics::new(
                            &sink,
                            &prefix,
                            name,
                            provider_name,
                            &model_metrics,
                        ),
                        adaptive: adaptive::RouteAdaptive::new(&prefix, name, provider_name),
                        gate: admission::Gate::new(
                            admission::GateMetrics::new(&prefix, name, provider_name),
                            name,
                            provider_name,
                        ),
                        name: provider_name,
                        provider,
                        health: ProviderHealth::new(),
                        stats: RouteStats::new(),
                        connect,
                    }
                })
                .collect();
            index.insert(name, models.len());
            models.push(Model {
                metrics: model_metrics,
                adaptive: adaptive::AdaptiveMetrics::new(&prefix, name),
                shadow: shadow::ShadowModel::new(&prefix, name),
                name,
                routes,
                rr: AtomicUsize::new(0),
                budget: RetryBudget::new(),
                clock,
            });
        }
        let policy = self.policy.unwrap_or_default();
        let active = policy.load();
        telemetry::policy_in_force(&prefix, None, active.version());
        for m in &models {
            m.metrics
                .admission_max_wait(active.for_model(m.name).policy().admission.max_wait);
        }
        Ok(Pool {
            classifier: self.classifier,
            models,
            index,
            unknown_model: telemetry::unknown_model(&prefix),
            prefix,
            policy_seen: AtomicU64::new(active.version()),
            policy,
            clock,
        })
    }
}

/// The state of one provider for one model.
#[derive(Clone, Debug, PartialEq)]
pub struct ProviderStats {
    /// The model.
    pub model: &'static str,
    /// The provider.
    pub provider: &'static str,
    /// Its health.
    pub health: HealthSnapshot,
    /// Its attempts over the last [`stats::WINDOW`](crate::stats::WINDOW).
    pub recent: WindowStats,
    /// Its admission gate.
    pub admission: GateSnapshot,
}

impl<P> Pool<P> {
    /// Starts building a pool.
    pub fn builder() -> PoolBuilder<P> {
        PoolBuilder::default()
    }
}

impl<P, C> Pool<P, C> {
    /// The policy handle: store a new policy here to change behaviour live.
    pub fn policy(&self) -> &LivePolicy {
        &self.policy
    }

    /// The prefix of every metric the pool exports (`retryctl_` unless
    /// [`PoolBuilder::metrics_prefix`] set another), for an application's
    /// own metrics beside them.
    pub fn metrics_prefix(&self) -> &str {
        &self.prefix
    }

    /// The configured model names, in the order they were added.
    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.models.iter().map(|m| m.name)
    }

    /// Health and recent statistics of every provider of every model, in
    /// configuration order. Takes each route's recording locks briefly.
    pub fn stats(&self) -> Vec<ProviderStats> {
        let now = Moment::now();
        self.models
            .iter()
            .flat_map(|m| {
                m.routes.iter().map(move |r| ProviderStats {
                    model: m.name,
                    provider: r.name,
                    health: r.health.snapshot(now),
                    recent: r.stats.snapshot(now),
                    admission: r.gate.snapshot(),
                })
            })
            .collect()
    }

    /// Retries the model's budget could pay for right now.
    pub fn budget_available(&self, model: &str) -> Option<f64> {
        let m = self.model(model)?;
        let active = self.policy.load();
        Some(
            m.budget
                .available_at(Moment::now(), &active.for_model(model).policy().budget),
        )
    }

    /// Reports a policy version change seen by a request (rare: one
    /// relaxed load otherwise, inlined into the request path).
    #[inline]
    fn note_version(&self, active: &ActivePolicy) {
        let version = active.version();
        if self.policy_seen.load(Ordering::Relaxed) != version {
            self.version_changed(active, version);
        }
    }

    /// [`Pool::note_version`] when the version is new to this pool.
    #[cold]
    #[inline(never)]
    fn version_changed(&self, active: &ActivePolicy, version: u64) {
        let old = self.policy_seen.swap(version, Ordering::Relaxed);
        if old != version {
            telemetry::policy_in_force(&self.prefix, Some(old), version);
            for m in &self.models {
                m.metrics
                    .admission_max_wait(active.for_model(m.name).policy().admission.max_wait);
            }
        }
    }

    /// The model named `name`. A gateway serves a handful of models: up
    /// to [`SCAN_MODELS`] of them, comparing lengths, then bytes, of each
    /// name beats hashing the request's name (about 30 instructions for
    /// one model instead of 130); beyond that, the map.
    #[inline]
    fn model(&self, name: &str) -> Option<&Model<P>> {
        if self.models.len() <= SCAN_MODELS {
            return self.models.iter().find(|m| m.name == name);
        }
        self.index.get(name).map(|&i| &self.models[i])
    }
}
