//! The retry policy: what to retry, how long to wait, how much to spend.
//!
//! A [`Policy`] is plain data (serde, TOML-friendly) with production-tested
//! defaults. It is only ever put in force after [`Policy::validate`] has
//! accepted it, so the request path never meets an out-of-range value.
//!
//! # Why these defaults
//!
//! * `max_rounds = 2`, `delay = 500ms`: one more round after half a second
//!   absorbed almost all of ~9,500 daily "all providers failed" errors in the
//!   gateway this crate grew out of: refused connects on a listen backlog of
//!   1, nginx reloads and Docker bridge churn all last well under a second.
//! * `jitter = 0.2` (+/-20%, as gRPC): retries that arrive in the same burst
//!   as the failure they answer fail again; spreading them matters more than
//!   the count.
//! * `budget`: 20% of requests plus 10 retries/s over 10 s (Finagle, Linkerd,
//!   tower): without a budget a 4x retry amplification saturated backends
//!   during an outage.
//! * `health.demote_after = 10`, `cooldown = 30s` doubling to `5m`: Envoy's
//!   outlier ejection, but a demoted provider is moved to the back, never
//!   removed, because most models have a single provider.
//! * `timeouts`: connect 5 s, response headers 90 s, whole request 600 s.
//!   A completion that timed out after the upstream accepted it is not
//!   retried by default: retrying a 300 s generation doubles cost and
//!   latency. A connect timeout is always retried.
//! * `admission`: a request waits up to `max_wait = 10s` at the gate of an
//!   unreachable provider (a container restart takes 2-10 s, an nginx
//!   reload well under one), probed after `100ms` doubling to `1s`, with
//!   the limit halved (`decrease = 0.5`, as TCP) on each connection-level
//!   failure. Waiting there spends no retry budget: the budget meters
//!   retries of requests the upstream received.
//!
//! # Per-model overrides
//!
//! One gateway serves models with very different failure profiles: a
//! 120B model behind a single overloaded proxy needs a tighter budget and
//! longer waits than a small model with three providers. A
//! `[models."openai/gpt-oss-120b"]` table overrides any top-level field
//! (and any field of `classify`, `timeouts`, `budget`, `health`,
//! `adaptive`, `admission`) for that model only; everything it does not
//! name is inherited.
//!
//! ```
//! use retryctl::policy::Policy;
//!
//! let policy = Policy::from_toml(r#"
//!     max_rounds = 2
//!     [models."openai/gpt-oss-120b"]
//!     max_rounds = 3
//!     [models."openai/gpt-oss-120b".budget]
//!     ratio = 0.5
//! "#).unwrap();
//! let big = policy.resolve("openai/gpt-oss-120b");
//! assert_eq!((big.max_rounds, big.budget.ratio), (3, 0.5));
//! assert_eq!(big.delay, policy.delay); // inherited
//! assert_eq!(policy.resolve("other-model"), Policy { models: Default::default(), ..policy.clone() });
//! ```
//!
//! The override types are *generated* from one field list by a macro, so a
//! new policy field cannot be forgotten in the merge. Overrides are
//! validated as the policy they produce: each model's resolved policy must
//! pass [`Policy::validate`], and an error names the full path
//! (`models."openai/gpt-oss-120b".budget.ratio`) and where it is written.
//!
//! # Layout
//!
//! One file per table, each with its type, its defaults and the ranges it
//! allows (`classify.rs`, `timeouts.rs`, `budget.rs`, `health.rs`,
//! `adaptive.rs`, `admission.rs`; `delay.rs` for [`RetryDelay`]); the
//! top-level table, [`Policy`], in this file; `overrides.rs` for the
//! per-model override types and the merge; `validate.rs` for the whole
//! policy's validation, model by model; `error.rs` for [`PolicyError`] and
//! where it points in the file; `text.rs` for reading and writing TOML.

mod adaptive;
mod admission;
mod budget;
mod classify;
mod delay;
mod error;
mod health;
mod overrides;
mod text;
mod timeouts;
mod validate;

pub use self::adaptive::AdaptivePolicy;
pub use self::admission::AdmissionPolicy;
pub use self::budget::BudgetPolicy;
pub use self::classify::ClassifyPolicy;
pub use self::delay::RetryDelay;
pub use self::error::PolicyError;
pub use self::health::HealthPolicy;
pub use self::overrides::{
    AdaptiveOverride, AdmissionOverride, BudgetOverride, ClassifyOverride, HealthOverride,
    PolicyOverride, TimeoutsOverride,
};
pub use self::timeouts::Timeouts;
pub use crate::live::{ActivePolicy, LivePolicy, ModelPolicy};
pub use crate::pool::MAX_PROVIDERS_PER_MODEL;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The largest `max_rounds` a policy may ask for.
pub const MAX_ROUNDS_LIMIT: u32 = 10;

/// The most `[models."..."]` overrides one policy may have: each is
/// resolved and compiled when the policy is put in force.
pub const MAX_MODEL_OVERRIDES: usize = 4096;

/// Everything the pool needs to decide about retries.
///
/// Read from TOML with [`Policy::from_toml`]; every field has a default, so
/// an empty file is the default policy. Unknown keys are rejected.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// How many rounds over the providers a request may use, the first
    /// included: 1 disables retries, 2 is "one more round" (1..=10).
    pub max_rounds: u32,
    /// Wait before the first retry round of a transient failure: a
    /// duration, or `"auto"` to learn it per provider from how long its
    /// transient failures lasted (see [`RetryDelay::Auto`]).
    pub delay: RetryDelay,
    /// Multiplier applied to the wait for each further round (>= 1.0).
    pub backoff: f64,
    /// Upper bound of the (pre-jitter) wait for transient failures.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Relative jitter: each wait is drawn uniformly from
    /// `wait * (1 - jitter) ..= wait * (1 + jitter)` (0.0..=1.0).
    pub jitter: f64,
    /// Wait before retrying a rate-limited (429) provider, when it did not
    /// say how long itself; grows with `backoff` like `delay`.
    #[serde(with = "humantime_serde")]
    pub rate_limited_delay: Duration,
    /// The longest Retry-After honoured. A provider asking for more is not
    /// retried within this request (waiting that long helps nobody).
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
    /// How failed attempts are classified.
    pub classify: ClassifyPolicy,
    /// Per-attempt and per-request time limits.
    pub timeouts: Timeouts,
    /// How many retries the pool may spend, per model.
    pub budget: BudgetPolicy,
    /// When a provider is demoted and how it comes back.
    pub health: HealthPolicy,
    /// Decisions driven by each provider's observed latency.
    pub adaptive: AdaptivePolicy,
    /// The per-provider admission gate: waiting for an unreachable
    /// upstream instead of failing (see [`AdmissionPolicy`]).
    pub admission: AdmissionPolicy,
    /// A candidate policy evaluated on every live outcome without acting
    /// (`[shadow]`): the same keys as a model override, applied on top of
    /// each model's resolved policy. The pool counts what it would have
    /// done differently (see the shadow metrics in [`crate::telemetry`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow: Option<PolicyOverride>,
    /// Per-model overrides, by model name as requests name it. A model
    /// without an entry uses the top-level values.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub models: BTreeMap<String, PolicyOverride>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_rounds: 2,
            delay: RetryDelay::Fixed(Duration::from_millis(500)),
            backoff: 2.0,
            max_delay: Duration::from_secs(4),
            jitter: 0.2,
            rate_limited_delay: Duration::from_secs(1),
            max_retry_after: Duration::from_secs(60),
            classify: ClassifyPolicy::default(),
            timeouts: Timeouts::default(),
            budget: BudgetPolicy::default(),
            health: HealthPolicy::default(),
            adaptive: AdaptivePolicy::default(),
            admission: AdmissionPolicy::default(),
            shadow: None,
            models: BTreeMap::new(),
        }
    }
}

impl Policy {
    /// The wait a first transient retry starts from without a learned
    /// delay: `delay`, or with `delay = "auto"` its fallback.
    pub fn base_delay(&self) -> Duration {
        match self.delay {
            RetryDelay::Fixed(d) => d,
            RetryDelay::Auto => self.adaptive.delay_auto_fallback,
        }
    }
}
