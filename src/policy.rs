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

pub use crate::live::{ActivePolicy, LivePolicy, ModelPolicy};
pub use crate::pool::MAX_PROVIDERS_PER_MODEL;
use crate::toml_error::{Seg, display_path, line_col, locate, path_at};
use std::collections::BTreeMap;
use std::fmt;
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

/// Decisions driven by each provider's recent latency (the windowed
/// histograms of [`stats`](crate::stats)). Each is off by default until the
/// demo shows it better than the fixed rule; see the README.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptivePolicy {
    /// Skip a retry when the time left is less than its wait plus the
    /// provider's recent median attempt latency: it could not finish. With
    /// too few samples, the fixed rule (the wait alone) applies.
    pub deadline_aware: bool,
    /// Cut an attempt that has no response headers after
    /// `attempt_timeout_factor` x the provider's recent p99 (within
    /// `attempt_timeout_min..=attempt_timeout_max`, and never beyond
    /// `timeouts.attempt`), and treat the cut as transient: a stalled
    /// connection is retried early while a slow model keeps its p99.
    pub attempt_timeout: bool,
    /// Multiple of the recent p99 (1.0..=100.0).
    pub attempt_timeout_factor: f64,
    /// Lower bound of the adaptive limit.
    #[serde(with = "humantime_serde")]
    pub attempt_timeout_min: Duration,
    /// Upper bound of the adaptive limit.
    #[serde(with = "humantime_serde")]
    pub attempt_timeout_max: Duration,
    /// Successful attempts in the window needed before latency is trusted.
    pub min_samples: u32,
    /// Shrink the retry budget toward its floor when retries stop helping
    /// (a full outage): new requests deposit `budget.ratio` scaled by the
    /// window's retry success rate / `budget_min_success` (at most 1).
    pub budget: bool,
    /// The retry success rate at and above which the full ratio applies
    /// (0.0..=1.0).
    pub budget_min_success: f64,
    /// Retries in the window needed before their success rate is judged.
    pub budget_min_retries: u32,
    /// Order healthy providers by recent latency instead of plain
    /// round-robin: the first one is drawn with a probability inversely
    /// proportional to its recent median (so the faster one is preferred
    /// and near-equals still share the load), and a persistently slow one
    /// (see `slow_factor`, `slow_min`) goes behind the others. Not a
    /// demotion: a slow provider still answers when the others fail. With
    /// fewer than `min_samples` successes per provider, round-robin.
    pub latency_order: bool,
    /// A provider is slow when its recent median exceeds this multiple of
    /// the fastest healthy provider's (1.0..=100.0)...
    pub slow_factor: f64,
    /// ...and exceeds this: a 2 ms provider next to a 0.5 ms one is not
    /// worth avoiding.
    #[serde(with = "humantime_serde")]
    pub slow_min: Duration,
    /// With `delay = "auto"`: the quantile of a provider's recent times to
    /// recovery used as its retry delay (0.01..=1.0).
    pub delay_auto_quantile: f64,
    /// With `delay = "auto"`: the learned delay is at least this...
    #[serde(with = "humantime_serde")]
    pub delay_auto_min: Duration,
    /// ...and at most this (then `backoff` and `max_delay` apply as usual).
    #[serde(with = "humantime_serde")]
    pub delay_auto_max: Duration,
    /// With `delay = "auto"`: the delay of a provider with fewer than
    /// `delay_auto_min_samples` recorded failures (what `delay` would be).
    #[serde(with = "humantime_serde")]
    pub delay_auto_fallback: Duration,
    /// Transient failures recorded (with the recovery that ended them) in
    /// the window before a provider's learned delay is used.
    pub delay_auto_min_samples: u32,
}

/// The per-provider admission gate (`[admission]`).
///
/// Every attempt passes its provider's gate, first attempts included. The
/// gate is driven by *connection-level* outcomes only (the upstream was
/// not reached or refused the work: connect refused, connect timeout, a
/// request handed back unsent): such a
/// failure shrinks the provider's in-flight limit to `decrease` x the
/// attempts in flight (at least `min_limit`); successes grow it back (slow
/// start, then additive) until it no longer limits and the gate opens.
/// Latency never shrinks it. A failure at the floor marks the provider
/// down: one attempt at a time probes it (after `probe_delay`, doubling up
/// to `probe_max_delay`) while the other requests wait, in order, for the
/// probe's outcome. A request waits at most `max_wait` in total.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionPolicy {
    /// `true` (the default) puts the gate in front of every attempt;
    /// `false` removes it: attempts are never held, and connection-level
    /// failures are retried in rounds like any other.
    pub enabled: bool,
    /// The longest a request waits at gates in total before it fails with
    /// `admission_timeout` (0s: never wait, fail at once).
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Requests that may wait at one provider's gate; more fail at once
    /// with `admission_queue_full` (linkerd's queue capacity).
    pub max_waiting: u32,
    /// On a connection-level failure, the limit becomes this fraction of
    /// the attempts in flight (0.1..=0.9).
    pub decrease: f64,
    /// The floor of the limit (1..=10000).
    pub min_limit: u32,
    /// The wait before the first probe of a down provider...
    #[serde(with = "humantime_serde")]
    pub probe_delay: Duration,
    /// ...doubling after each failed probe, up to this.
    #[serde(with = "humantime_serde")]
    pub probe_max_delay: Duration,
    /// After a successful probe, reopen with slow start (the limit starts
    /// at `min_limit` and doubles per round trip) rather than at once.
    pub slow_start: bool,
}

/// The wait before the first retry round of a transient failure.
///
/// In TOML, a duration (`"500ms"`) or `"auto"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryDelay {
    /// The same wait for every provider.
    Fixed(Duration),
    /// Per provider, the `adaptive.delay_auto_quantile` of its recent times
    /// to recovery (from a transient failure to the provider's next
    /// success), within `adaptive.delay_auto_min..=delay_auto_max`; with too
    /// few samples, `adaptive.delay_auto_fallback`. A wait shorter than the
    /// failure retries into it; a longer one makes the client wait for
    /// nothing: the time the provider actually took to recover is the
    /// wait that would have worked.
    Auto,
}

impl From<Duration> for RetryDelay {
    fn from(d: Duration) -> Self {
        RetryDelay::Fixed(d)
    }
}

impl fmt::Display for RetryDelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetryDelay::Fixed(d) => write!(f, "{}", humantime::format_duration(*d)),
            RetryDelay::Auto => f.write_str("auto"),
        }
    }
}

impl Serialize for RetryDelay {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RetryDelay {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RetryDelay;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"500ms\", or \"auto\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RetryDelay, E> {
                if v == "auto" {
                    return Ok(RetryDelay::Auto);
                }
                humantime::parse_duration(v)
                    .map(RetryDelay::Fixed)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// Rules for turning a failed attempt into a
/// [`Classification`](crate::Classification).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClassifyPolicy {
    /// Substrings that mark an *opaque* error text as transient, matched
    /// ASCII-case-insensitively on the raw error chain. Only consulted when
    /// the error carries no kind (io kind, reqwest flag, HTTP status), and
    /// after reqwest's own message forms
    /// ([`Rules::text`](crate::Rules::text)).
    pub transient_keywords: Vec<String>,
    /// Substrings that mean "this provider does not serve this model": the
    /// next provider is tried, this one is not retried.
    pub next_provider_keywords: Vec<String>,
    /// Substrings that mark an error as the client's own fault even under a
    /// 5xx status (e.g. an image URL the upstream could not fetch): never
    /// retried, never held against the provider.
    pub client_error_keywords: Vec<String>,
    /// Statuses outside 5xx that are transient (e.g. 408 Request Timeout).
    pub retryable_statuses: Vec<u16>,
    /// 5xx statuses that must never be retried (returned at once).
    pub permanent_statuses: Vec<u16>,
    /// Statuses that move on to the next provider without retrying this one.
    pub next_provider_statuses: Vec<u16>,
    /// Retry an attempt that timed out *after* the upstream accepted it
    /// (waiting for response headers). Off by default: it doubles the cost
    /// of a long generation.
    pub retry_response_timeout: bool,
}

/// Time limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// TCP connect limit for HTTP clients built by
    /// [`upstream::client_builder`](crate::upstream::client_builder). It must
    /// be set below `attempt`: without it, a stalled connect is
    /// indistinguishable from a slow response and is not retried.
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// Limit for one attempt: until the operation returns (response headers).
    #[serde(with = "humantime_serde")]
    pub attempt: Duration,
    /// Default deadline of a whole request, all rounds and waits included.
    #[serde(with = "humantime_serde")]
    pub request: Duration,
}

/// Retry budget: retries allowed = `ratio` x requests + `min_per_second` x
/// `window`, counted over a sliding `window`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetPolicy {
    /// `false` removes the budget (retries limited by rounds only).
    pub enabled: bool,
    /// Retries allowed per request over the window (0.0..=1.0).
    pub ratio: f64,
    /// Retries always allowed per second, whatever the traffic.
    pub min_per_second: u32,
    /// The sliding window (1s..=300s).
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

/// Demotion and recovery of providers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthPolicy {
    /// Consecutive failed *requests* (not attempts) that demote a provider.
    pub demote_after: u32,
    /// Time before a demoted provider gets its first probe.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// The cool-down doubles after each failed probe, up to this.
    #[serde(with = "humantime_serde")]
    pub max_cooldown: Duration,
}

/// Generates the override type of a policy table: every field of `$base`
/// as an `Option` ("absent = inherited"), every sub-table as its own
/// override type, and `apply_to`, which writes the fields that are set into
/// a base value. One list per table, so the merge cannot miss a field.
macro_rules! policy_override {
    (
        $(#[$meta:meta])*
        pub struct $name:ident for $base:ident {
            $( $(#[$fmeta:meta])* $field:ident : $ty:ty, )*
        }
        $( tables { $( $sub:ident : $subty:ty, )* } )?
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name {
            $(
                #[doc = concat!("Replaces [`", stringify!($base), "::", stringify!($field), "`] when set.")]
                $(#[$fmeta])*
                #[serde(skip_serializing_if = "Option::is_none")]
                pub $field: Option<$ty>,
            )*
            $($(
                #[doc = concat!("Overrides within [`", stringify!($base), "::", stringify!($sub), "`].")]
                #[serde(skip_serializing_if = "is_default")]
                pub $sub: $subty,
            )*)?
        }

        impl $name {
            /// Whether this overrides nothing.
            pub fn is_empty(&self) -> bool {
                true $( && self.$field.is_none() )* $($( && self.$sub.is_empty() )*)?
            }

            /// Writes every field that is set into `base`.
            pub fn apply_to(&self, base: &mut $base) {
                $( if let Some(value) = &self.$field { base.$field = value.clone(); } )*
                $($( self.$sub.apply_to(&mut base.$sub); )*)?
            }
        }
    };
}

/// Whether a value is its type's default (an override that overrides
/// nothing is left out of the rendered TOML).
fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

policy_override! {
    /// One model's overrides of the top-level [`Policy`]
    /// (`[models."name"]` in the policy file). Unknown keys are rejected.
    pub struct PolicyOverride for Policy {
        max_rounds: u32,
        delay: RetryDelay,
        backoff: f64,
        #[serde(with = "humantime_serde")]
        max_delay: Duration,
        jitter: f64,
        #[serde(with = "humantime_serde")]
        rate_limited_delay: Duration,
        #[serde(with = "humantime_serde")]
        max_retry_after: Duration,
    }
    tables {
        classify: ClassifyOverride,
        timeouts: TimeoutsOverride,
        budget: BudgetOverride,
        health: HealthOverride,
        adaptive: AdaptiveOverride,
        admission: AdmissionOverride,
    }
}

policy_override! {
    /// Overrides of [`AdmissionPolicy`] (`[models."name".admission]`).
    pub struct AdmissionOverride for AdmissionPolicy {
        enabled: bool,
        #[serde(with = "humantime_serde")]
        max_wait: Duration,
        max_waiting: u32,
        decrease: f64,
        min_limit: u32,
        #[serde(with = "humantime_serde")]
        probe_delay: Duration,
        #[serde(with = "humantime_serde")]
        probe_max_delay: Duration,
        slow_start: bool,
    }
}

policy_override! {
    /// Overrides of [`ClassifyPolicy`] (`[models."name".classify]`). A list
    /// replaces the inherited list; it is not appended to.
    pub struct ClassifyOverride for ClassifyPolicy {
        transient_keywords: Vec<String>,
        next_provider_keywords: Vec<String>,
        client_error_keywords: Vec<String>,
        retryable_statuses: Vec<u16>,
        permanent_statuses: Vec<u16>,
        next_provider_statuses: Vec<u16>,
        retry_response_timeout: bool,
    }
}

policy_override! {
    /// Overrides of [`Timeouts`] (`[models."name".timeouts]`).
    pub struct TimeoutsOverride for Timeouts {
        #[serde(with = "humantime_serde")]
        connect: Duration,
        #[serde(with = "humantime_serde")]
        attempt: Duration,
        #[serde(with = "humantime_serde")]
        request: Duration,
    }
}

policy_override! {
    /// Overrides of [`BudgetPolicy`] (`[models."name".budget]`).
    pub struct BudgetOverride for BudgetPolicy {
        enabled: bool,
        ratio: f64,
        min_per_second: u32,
        #[serde(with = "humantime_serde")]
        window: Duration,
    }
}

policy_override! {
    /// Overrides of [`AdaptivePolicy`] (`[models."name".adaptive]`).
    pub struct AdaptiveOverride for AdaptivePolicy {
        deadline_aware: bool,
        attempt_timeout: bool,
        attempt_timeout_factor: f64,
        #[serde(with = "humantime_serde")]
        attempt_timeout_min: Duration,
        #[serde(with = "humantime_serde")]
        attempt_timeout_max: Duration,
        min_samples: u32,
        budget: bool,
        budget_min_success: f64,
        budget_min_retries: u32,
        latency_order: bool,
        slow_factor: f64,
        #[serde(with = "humantime_serde")]
        slow_min: Duration,
        delay_auto_quantile: f64,
        #[serde(with = "humantime_serde")]
        delay_auto_min: Duration,
        #[serde(with = "humantime_serde")]
        delay_auto_max: Duration,
        #[serde(with = "humantime_serde")]
        delay_auto_fallback: Duration,
        delay_auto_min_samples: u32,
    }
}

policy_override! {
    /// Overrides of [`HealthPolicy`] (`[models."name".health]`).
    pub struct HealthOverride for HealthPolicy {
        demote_after: u32,
        #[serde(with = "humantime_serde")]
        cooldown: Duration,
        #[serde(with = "humantime_serde")]
        max_cooldown: Duration,
    }
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

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

impl Default for ClassifyPolicy {
    fn default() -> Self {
        ClassifyPolicy {
            // Phrases, not the bare word "connection": it is in parameter
            // names ("invalid value for 'connection_id'") as often as in
            // transport failures.
            transient_keywords: strings(&[
                "connection refused",
                "connection reset",
                "connection aborted",
                "connection closed",
                "connection error",
                "connection failed",
                "tcp connect error",
                "timeout",
                "timed out",
                "deadline has elapsed",
                "reset",
                "broken pipe",
                "body error",
                "unexpected eof",
                "temporarily unavailable",
            ]),
            next_provider_keywords: strings(&[
                "model not found",
                "model_not_found",
                "no such model",
                "unknown model",
            ]),
            client_error_keywords: strings(&[
                "failed to fetch image",
                "could not fetch image",
                "invalid image url",
                "context length exceeded",
                "maximum context length",
            ]),
            retryable_statuses: vec![408],
            permanent_statuses: vec![501, 505],
            next_provider_statuses: vec![404],
            retry_response_timeout: false,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            attempt: Duration::from_secs(90),
            request: Duration::from_secs(600),
        }
    }
}

impl Default for BudgetPolicy {
    fn default() -> Self {
        BudgetPolicy {
            enabled: true,
            ratio: 0.2,
            min_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}

impl Default for AdaptivePolicy {
    fn default() -> Self {
        AdaptivePolicy {
            deadline_aware: false,
            attempt_timeout: false,
            attempt_timeout_factor: 3.0,
            attempt_timeout_min: Duration::from_secs(1),
            attempt_timeout_max: Duration::from_secs(30),
            min_samples: 50,
            budget: false,
            budget_min_success: 0.2,
            budget_min_retries: 20,
            latency_order: false,
            slow_factor: 2.0,
            slow_min: Duration::from_millis(500),
            delay_auto_quantile: 0.9,
            delay_auto_min: Duration::from_millis(50),
            delay_auto_max: Duration::from_secs(4),
            delay_auto_fallback: Duration::from_millis(500),
            delay_auto_min_samples: 20,
        }
    }
}

impl Default for AdmissionPolicy {
    fn default() -> Self {
        AdmissionPolicy {
            enabled: true,
            max_wait: Duration::from_secs(10),
            max_waiting: 1024,
            decrease: 0.5,
            min_limit: 1,
            probe_delay: Duration::from_millis(100),
            probe_max_delay: Duration::from_secs(1),
            slow_start: true,
        }
    }
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            demote_after: 10,
            cooldown: Duration::from_secs(30),
            max_cooldown: Duration::from_secs(300),
        }
    }
}

/// Why a policy was refused: which field, what value, what is allowed, and
/// where in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    /// Dotted path of the field (`budget.ratio`,
    /// `models."openai/gpt-oss-120b".budget.ratio`), empty for syntax
    /// errors and bytes that are not text.
    pub field: String,
    /// The offending value, empty when the parser refused it (wrong type,
    /// unknown key: `allowed` then holds the parser's message).
    pub value: String,
    /// What would have been accepted, or the parser's message.
    pub allowed: String,
    /// 1-based line and column in the source text, when known.
    pub location: Option<(usize, usize)>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some((line, col)) = self.location {
            write!(f, "line {line}, column {col}: ")?;
        }
        match (self.field.is_empty(), self.value.is_empty()) {
            (true, _) => write!(f, "{}", self.allowed),
            (false, true) => write!(f, "`{}`: {}", self.field, self.allowed),
            (false, false) => write!(
                f,
                "`{}` = {} is invalid: {}",
                self.field, self.value, self.allowed
            ),
        }
    }
}

impl std::error::Error for PolicyError {}

impl PolicyError {
    fn field(field: &str, value: impl fmt::Display, allowed: impl Into<String>) -> Self {
        PolicyError {
            field: field.to_owned(),
            value: value.to_string(),
            allowed: allowed.into(),
            location: None,
        }
    }
}

fn secs(d: Duration) -> String {
    format!("\"{}\"", humantime::format_duration(d))
}

impl Policy {
    /// Parses and validates a TOML policy. Errors carry the line and column,
    /// and the dotted path of the field whenever the text parsed as TOML.
    pub fn from_toml(text: &str) -> Result<Policy, PolicyError> {
        let policy: Policy = toml::from_str(text).map_err(|e| {
            let offset = e.span().map(|s| s.start);
            PolicyError {
                field: offset
                    .and_then(|o| path_at(text, o))
                    .map(|path| display_path(&path))
                    .unwrap_or_default(),
                value: String::new(),
                allowed: e.message().trim().to_owned(),
                location: offset.map(|o| line_col(text, o)),
            }
        })?;
        policy.check().map_err(|e| e.located(text))?;
        Ok(policy)
    }

    /// Parses and validates a policy file's raw bytes: like
    /// [`Policy::from_toml`], but bytes that are not UTF-8 (a binary file,
    /// a Latin-1 editor) are an error naming the line and column of the
    /// first invalid byte. A leading UTF-8 byte order mark is skipped.
    pub fn from_bytes(bytes: &[u8]) -> Result<Policy, PolicyError> {
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        match std::str::from_utf8(bytes) {
            Ok(text) => Policy::from_toml(text),
            Err(e) => {
                let at = e.valid_up_to();
                let valid = bytes
                    .get(..at)
                    .and_then(|b| std::str::from_utf8(b).ok())
                    .unwrap_or("");
                let byte = bytes.get(at).copied().unwrap_or(0);
                Err(PolicyError {
                    field: String::new(),
                    value: String::new(),
                    allowed: format!(
                        "not UTF-8 text (invalid byte 0x{byte:02x} at offset {at}): a policy file is TOML"
                    ),
                    location: Some(line_col(valid, valid.len())),
                })
            }
        }
    }

    /// The wait a first transient retry starts from without a learned
    /// delay: `delay`, or with `delay = "auto"` its fallback.
    pub fn base_delay(&self) -> Duration {
        match self.delay {
            RetryDelay::Fixed(d) => d,
            RetryDelay::Auto => self.adaptive.delay_auto_fallback,
        }
    }

    /// Renders the policy as TOML with every field (defaults filled in).
    /// Model overrides are rendered as written: only the fields they set.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render policy: {e}\n"))
    }

    /// The policy a request for `model` runs under: the top-level values
    /// with the model's override applied, and no `models` of its own. A
    /// model without an override gets the top-level values.
    pub fn resolve(&self, model: &str) -> Policy {
        let mut resolved = self.without_models();
        if let Some(o) = self.models.get(model) {
            o.apply_to(&mut resolved);
        }
        resolved
    }

    /// The top-level values alone. Destructured field by field (not
    /// `..self.clone()`), so the model map is never copied and a new field
    /// cannot be forgotten.
    fn without_models(&self) -> Policy {
        let Policy {
            max_rounds,
            delay,
            backoff,
            max_delay,
            jitter,
            rate_limited_delay,
            max_retry_after,
            classify,
            timeouts,
            budget,
            health,
            adaptive,
            admission,
            shadow,
            models: _,
        } = self;
        Policy {
            max_rounds: *max_rounds,
            delay: *delay,
            backoff: *backoff,
            max_delay: *max_delay,
            jitter: *jitter,
            rate_limited_delay: *rate_limited_delay,
            max_retry_after: *max_retry_after,
            classify: classify.clone(),
            timeouts: timeouts.clone(),
            budget: budget.clone(),
            health: health.clone(),
            adaptive: adaptive.clone(),
            admission: admission.clone(),
            shadow: shadow.clone(),
            models: BTreeMap::new(),
        }
    }

    /// The shadow candidate of this (resolved) policy: the policy with the
    /// `[shadow]` table applied, if there is one.
    pub fn shadow_candidate(&self) -> Option<Policy> {
        let o = self.shadow.as_ref()?;
        let mut candidate = self.without_models();
        candidate.shadow = None;
        o.apply_to(&mut candidate);
        Some(candidate)
    }

    /// Checks every value against its allowed range: the top-level values
    /// first, then each model's *resolved* policy (an override is valid
    /// when the policy it produces is). A model error names the full path,
    /// e.g. `models."openai/gpt-oss-120b".budget.ratio`.
    pub fn validate(&self) -> Result<(), PolicyError> {
        self.check().map_err(Invalid::into_error)
    }

    fn check(&self) -> Result<(), Invalid<'_>> {
        self.validate_values().map_err(|error| Invalid {
            scope: Vec::new(),
            error,
        })?;
        if self.models.len() > MAX_MODEL_OVERRIDES {
            return Err(Invalid {
                scope: Vec::new(),
                error: PolicyError::field(
                    "models",
                    format!("{} models", self.models.len()),
                    format!("at most {MAX_MODEL_OVERRIDES} model overrides"),
                ),
            });
        }
        let base = self.without_models();
        // The shadow candidate must be valid on top of every policy it is
        // compared with: the top level and each model's.
        let shadow_of = |resolved: &Policy, model: Option<&str>| -> Result<(), Invalid<'static>> {
            let Some(candidate) = resolved.shadow_candidate() else {
                return Ok(());
            };
            candidate.validate_values().map_err(|mut error| {
                if let Some(model) = model {
                    error
                        .allowed
                        .push_str(&format!(" (with the override of model {model:?})"));
                }
                Invalid {
                    scope: vec!["shadow"],
                    error,
                }
            })
        };
        shadow_of(&base, None)?;
        for (name, o) in &self.models {
            let model = vec!["models", name.as_str()];
            if name.trim().is_empty() || name.len() > 256 {
                return Err(Invalid {
                    scope: model,
                    error: PolicyError::field(
                        "",
                        format!("{name:?}"),
                        "a non-blank model name of at most 256 bytes",
                    ),
                });
            }
            let mut resolved = base.clone();
            o.apply_to(&mut resolved);
            resolved.validate_values().map_err(|error| Invalid {
                scope: model,
                error,
            })?;
            shadow_of(&resolved, Some(name))?;
        }
        Ok(())
    }

    /// Checks the top-level values (not the model overrides).
    fn validate_values(&self) -> Result<(), PolicyError> {
        if !(1..=MAX_ROUNDS_LIMIT).contains(&self.max_rounds) {
            return Err(PolicyError::field(
                "max_rounds",
                self.max_rounds,
                format!("an integer within 1..={MAX_ROUNDS_LIMIT} (1 disables retries)"),
            ));
        }
        if let RetryDelay::Fixed(delay) = self.delay {
            check_duration("delay", delay, Duration::ZERO, Duration::from_secs(60)).map_err(
                |e| PolicyError {
                    allowed: format!("{}, or \"auto\"", e.allowed),
                    ..e
                },
            )?;
        }
        if !(self.backoff.is_finite() && (1.0..=10.0).contains(&self.backoff)) {
            return Err(PolicyError::field(
                "backoff",
                format!("{:?}", self.backoff),
                "a number within 1.0..=10.0",
            ));
        }
        check_duration(
            "max_delay",
            self.max_delay,
            self.base_delay(),
            Duration::from_secs(300),
        )
        .map_err(|e| PolicyError {
            allowed: format!(
                "{} and at least `delay` (with \"auto\": `adaptive.delay_auto_fallback`)",
                e.allowed
            ),
            ..e
        })?;
        check_fraction("jitter", self.jitter)?;
        check_duration(
            "rate_limited_delay",
            self.rate_limited_delay,
            Duration::ZERO,
            Duration::from_secs(300),
        )?;
        check_duration(
            "max_retry_after",
            self.max_retry_after,
            Duration::ZERO,
            Duration::from_secs(3600),
        )?;
        self.classify.validate()?;
        let t = &self.timeouts;
        check_duration(
            "timeouts.connect",
            t.connect,
            Duration::from_millis(1),
            Duration::from_secs(300),
        )?;
        check_duration(
            "timeouts.attempt",
            t.attempt,
            Duration::from_millis(1),
            Duration::from_secs(86_400),
        )?;
        check_duration(
            "timeouts.request",
            t.request,
            Duration::from_millis(1),
            Duration::from_secs(86_400),
        )?;
        if t.connect >= t.attempt {
            return Err(PolicyError::field(
                "timeouts.connect",
                secs(t.connect),
                format!(
                    "less than timeouts.attempt ({}), or a stalled connect looks like a slow response",
                    secs(t.attempt)
                ),
            ));
        }
        let b = &self.budget;
        check_fraction("budget.ratio", b.ratio)?;
        if b.min_per_second > 1_000_000 {
            return Err(PolicyError::field(
                "budget.min_per_second",
                b.min_per_second,
                "an integer within 0..=1000000",
            ));
        }
        check_duration(
            "budget.window",
            b.window,
            Duration::from_secs(1),
            Duration::from_secs(300),
        )?;
        let h = &self.health;
        if !(1..=1_000_000).contains(&h.demote_after) {
            return Err(PolicyError::field(
                "health.demote_after",
                h.demote_after,
                "an integer within 1..=1000000",
            ));
        }
        check_duration(
            "health.cooldown",
            h.cooldown,
            Duration::from_millis(1),
            Duration::from_secs(86_400),
        )?;
        check_duration(
            "health.max_cooldown",
            h.max_cooldown,
            h.cooldown,
            Duration::from_secs(86_400),
        )
        .map_err(|e| PolicyError {
            allowed: format!("{} and at least `health.cooldown`", e.allowed),
            ..e
        })?;
        let a = &self.adaptive;
        if !(a.attempt_timeout_factor.is_finite()
            && (1.0..=100.0).contains(&a.attempt_timeout_factor))
        {
            return Err(PolicyError::field(
                "adaptive.attempt_timeout_factor",
                a.attempt_timeout_factor,
                "a number within 1.0..=100.0",
            ));
        }
        check_duration(
            "adaptive.attempt_timeout_min",
            a.attempt_timeout_min,
            Duration::from_millis(1),
            Duration::from_secs(86_400),
        )?;
        check_duration(
            "adaptive.attempt_timeout_max",
            a.attempt_timeout_max,
            a.attempt_timeout_min,
            Duration::from_secs(86_400),
        )
        .map_err(|e| PolicyError {
            allowed: format!("{} and at least `adaptive.attempt_timeout_min`", e.allowed),
            ..e
        })?;
        if !(1..=1_000_000).contains(&a.min_samples) {
            return Err(PolicyError::field(
                "adaptive.min_samples",
                a.min_samples,
                "an integer within 1..=1000000",
            ));
        }
        check_fraction("adaptive.budget_min_success", a.budget_min_success)?;
        if !(1..=1_000_000).contains(&a.budget_min_retries) {
            return Err(PolicyError::field(
                "adaptive.budget_min_retries",
                a.budget_min_retries,
                "an integer within 1..=1000000",
            ));
        }
        if !(a.slow_factor.is_finite() && (1.0..=100.0).contains(&a.slow_factor)) {
            return Err(PolicyError::field(
                "adaptive.slow_factor",
                a.slow_factor,
                "a number within 1.0..=100.0",
            ));
        }
        check_duration(
            "adaptive.slow_min",
            a.slow_min,
            Duration::ZERO,
            Duration::from_secs(86_400),
        )?;
        if !(a.delay_auto_quantile.is_finite() && (0.01..=1.0).contains(&a.delay_auto_quantile)) {
            return Err(PolicyError::field(
                "adaptive.delay_auto_quantile",
                a.delay_auto_quantile,
                "a number within 0.01..=1.0",
            ));
        }
        check_duration(
            "adaptive.delay_auto_min",
            a.delay_auto_min,
            Duration::ZERO,
            Duration::from_secs(60),
        )?;
        check_duration(
            "adaptive.delay_auto_max",
            a.delay_auto_max,
            a.delay_auto_min,
            Duration::from_secs(300),
        )
        .map_err(|e| PolicyError {
            allowed: format!("{} and at least `adaptive.delay_auto_min`", e.allowed),
            ..e
        })?;
        check_duration(
            "adaptive.delay_auto_fallback",
            a.delay_auto_fallback,
            Duration::ZERO,
            Duration::from_secs(60),
        )?;
        if !(1..=1_000_000).contains(&a.delay_auto_min_samples) {
            return Err(PolicyError::field(
                "adaptive.delay_auto_min_samples",
                a.delay_auto_min_samples,
                "an integer within 1..=1000000",
            ));
        }
        let g = &self.admission;
        check_duration(
            "admission.max_wait",
            g.max_wait,
            Duration::ZERO,
            Duration::from_secs(600),
        )
        .map_err(|e| PolicyError {
            allowed: format!("{} (\"0s\": never wait, fail at once)", e.allowed),
            ..e
        })?;
        if !(1..=1_000_000).contains(&g.max_waiting) {
            return Err(PolicyError::field(
                "admission.max_waiting",
                g.max_waiting,
                "an integer within 1..=1000000",
            ));
        }
        if !(g.decrease.is_finite() && (0.1..=0.9).contains(&g.decrease)) {
            return Err(PolicyError::field(
                "admission.decrease",
                format!("{:?}", g.decrease),
                "a number within 0.1..=0.9",
            ));
        }
        if !(1..=10_000).contains(&g.min_limit) {
            return Err(PolicyError::field(
                "admission.min_limit",
                g.min_limit,
                "an integer within 1..=10000",
            ));
        }
        check_duration(
            "admission.probe_delay",
            g.probe_delay,
            Duration::from_millis(1),
            Duration::from_secs(60),
        )?;
        check_duration(
            "admission.probe_max_delay",
            g.probe_max_delay,
            g.probe_delay,
            Duration::from_secs(300),
        )
        .map_err(|e| PolicyError {
            allowed: format!("{} and at least `admission.probe_delay`", e.allowed),
            ..e
        })?;
        Ok(())
    }
}

impl ClassifyPolicy {
    fn validate(&self) -> Result<(), PolicyError> {
        for (field, words) in [
            ("classify.transient_keywords", &self.transient_keywords),
            (
                "classify.next_provider_keywords",
                &self.next_provider_keywords,
            ),
            (
                "classify.client_error_keywords",
                &self.client_error_keywords,
            ),
        ] {
            if words.len() > 256 {
                return Err(PolicyError::field(
                    field,
                    format!("{} keywords", words.len()),
                    "at most 256 keywords",
                ));
            }
            for w in words {
                if w.trim().is_empty() || w.len() > 256 {
                    return Err(PolicyError::field(
                        field,
                        format!("{w:?}"),
                        "non-blank keywords of at most 256 bytes",
                    ));
                }
            }
        }
        for &code in &self.retryable_statuses {
            if !(400..=599).contains(&code) || code == 429 {
                return Err(PolicyError::field(
                    "classify.retryable_statuses",
                    code,
                    "status codes within 400..=599 other than 429 (429 is always rate-limited)",
                ));
            }
        }
        for &code in &self.permanent_statuses {
            if !(500..=599).contains(&code) {
                return Err(PolicyError::field(
                    "classify.permanent_statuses",
                    code,
                    "status codes within 500..=599 (4xx are permanent already)",
                ));
            }
        }
        for &code in &self.next_provider_statuses {
            if !(400..=599).contains(&code) || code == 429 {
                return Err(PolicyError::field(
                    "classify.next_provider_statuses",
                    code,
                    "status codes within 400..=599 other than 429",
                ));
            }
        }
        Ok(())
    }
}

fn check_duration(
    field: &str,
    value: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), PolicyError> {
    if value < min || value > max {
        return Err(PolicyError::field(
            field,
            secs(value),
            format!("a duration within {}..={}", secs(min), secs(max)),
        ));
    }
    Ok(())
}

fn check_fraction(field: &str, value: f64) -> Result<(), PolicyError> {
    if !(value.is_finite() && (0.0..=1.0).contains(&value)) {
        return Err(PolicyError::field(
            field,
            format!("{value:?}"),
            "a number within 0.0..=1.0",
        ));
    }
    Ok(())
}

/// A validation error and the override whose resulting policy failed, if
/// any: `scope` is the override table's path (`["models", name]`,
/// `["shadow"]`, empty for the top level), and `error.field` is relative
/// to it.
struct Invalid<'a> {
    scope: Vec<&'a str>,
    error: PolicyError,
}

impl Invalid<'_> {
    /// The error with the field's full path.
    fn into_error(self) -> PolicyError {
        if self.scope.is_empty() {
            return self.error;
        }
        PolicyError {
            field: display_path(&self.segments()),
            ..self.error
        }
    }

    /// The full path: the scope, then the field's dotted path.
    fn segments(&self) -> Vec<Seg> {
        let scope = self.scope.iter().copied();
        let field = self.error.field.split('.').filter(|s| !s.is_empty());
        scope.chain(field).map(Seg::key).collect()
    }

    /// The error with its full path and where the value is written. An
    /// override's value that it does not set is inherited: the error then
    /// points at the override's nearest enclosing table and says so.
    fn located(self, text: &str) -> PolicyError {
        let segments = self.segments();
        let (location, inherited) = match locate(text, &segments) {
            Some(at) => (Some(at), false),
            None if !self.scope.is_empty() => {
                let enclosing = (self.scope.len()..segments.len())
                    .rev()
                    .find_map(|n| locate(text, segments.get(..n).unwrap_or_default()));
                (enclosing, true)
            }
            None => (None, false),
        };
        let mut e = self.into_error();
        e.location = location;
        if inherited {
            e.allowed
                .push_str(" (the override does not set this value: it is inherited)");
        }
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_text_is_the_default_policy() {
        assert_eq!(Policy::from_toml("").unwrap(), Policy::default());
        Policy::default().validate().unwrap();
    }

    #[test]
    fn rendered_defaults_parse_back_identically() {
        let text = Policy::default().to_toml();
        assert_eq!(Policy::from_toml(&text).unwrap(), Policy::default());
    }

    #[test]
    fn durations_are_humane() {
        let p = Policy::from_toml("delay = \"250ms\"\n[health]\ncooldown = \"1m\"\n").unwrap();
        assert_eq!(p.delay, RetryDelay::Fixed(Duration::from_millis(250)));
        assert_eq!(p.health.cooldown, Duration::from_secs(60));
    }

    #[test]
    fn parser_errors_inside_arrays_name_the_element() {
        let e = Policy::from_toml("[classify]\nretryable_statuses = [500, \"x\"]\n").unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.location),
            ("classify.retryable_statuses[1]", Some((2, 28))),
            "{e}"
        );
    }

    #[test]
    fn delay_is_a_duration_or_auto() {
        let p = Policy::from_toml("delay = \"auto\"\n").unwrap();
        assert_eq!(p.delay, RetryDelay::Auto);
        assert_eq!(p.base_delay(), p.adaptive.delay_auto_fallback);
        assert_eq!(Policy::from_toml(&p.to_toml()).unwrap(), p);
        assert!(p.to_toml().contains("delay = \"auto\""), "{}", p.to_toml());
        let o = Policy::from_toml("[models.x]\ndelay = \"auto\"\n").unwrap();
        assert_eq!(o.resolve("x").delay, RetryDelay::Auto);
        // anything else is refused with the field, the line and what is allowed
        let e = Policy::from_toml("max_rounds = 2\ndelay = \"sometimes\"\n").unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.location),
            ("delay", Some((2, 9))),
            "{e}"
        );
        assert!(e.allowed.contains("\"auto\""), "{e}");
        let e = Policy::from_toml("delay = \"2m\"\n").unwrap_err();
        assert_eq!(e.field, "delay");
        assert!(e.allowed.contains("\"auto\""), "{e}");
        let e = Policy::from_toml("delay = 5\n").unwrap_err();
        assert_eq!(e.field, "delay");
        let e = Policy::from_toml("[models.x]\ndelay = \"Auto\"\n").unwrap_err();
        assert_eq!(e.field, "models.\"x\".delay", "{e}");
        let e = Policy::from_toml("[adaptive]\ndelay_auto_min = \"2s\"\ndelay_auto_max = \"1s\"\n")
            .unwrap_err();
        assert_eq!(e.field, "adaptive.delay_auto_max");
        assert_eq!(e.location, Some((3, 18)));
    }

    #[test]
    fn a_shadow_policy_is_an_override_validated_like_one() {
        let p = Policy::from_toml(
            "max_rounds = 2\n[shadow]\nmax_rounds = 3\n[shadow.budget]\nratio = 0.5\n",
        )
        .unwrap();
        let c = p.shadow_candidate().unwrap();
        assert_eq!((c.max_rounds, c.budget.ratio), (3, 0.5));
        assert_eq!((c.delay, c.shadow.as_ref()), (p.delay, None), "inherited");
        assert_eq!(Policy::from_toml(&p.to_toml()).unwrap(), p);
        assert_eq!(Policy::default().shadow_candidate(), None);
        // a model's resolved policy keeps the shadow, applied on top of it
        let p =
            Policy::from_toml("[shadow]\nmax_rounds = 3\n[models.x]\ndelay = \"1s\"\n").unwrap();
        let c = p.resolve("x").shadow_candidate().unwrap();
        assert_eq!((c.max_rounds, c.delay), (3, Duration::from_secs(1).into()));
        // errors name the shadow's path, the line, and what is allowed
        let e = Policy::from_toml("[shadow]\nmax_rounds = 30\n").unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.location),
            ("shadow.max_rounds", Some((2, 14)))
        );
        assert!(e.allowed.contains("1..=10"), "{e}");
        let e = Policy::from_toml("[shadow]\nmax_round = 3\n").unwrap_err();
        assert_eq!(e.field, "shadow.max_round");
        let e = Policy::from_toml("[shadow.budget]\nratio = 2.0\n").unwrap_err();
        assert_eq!(e.field, "shadow.budget.ratio");
        // valid alone, invalid with what it inherits: points at [shadow]
        let e = Policy::from_toml("[shadow]\ndelay = \"5s\"\n").unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.location),
            ("shadow.max_delay", Some((1, 1)))
        );
        assert!(e.allowed.contains("inherited"), "{e}");
        // ...or with a model's override
        let e = Policy::from_toml("[shadow]\ndelay = \"3s\"\n[models.x]\nmax_delay = \"2s\"\n")
            .unwrap_err();
        assert_eq!(e.field, "shadow.max_delay");
        assert!(e.allowed.contains("model \"x\""), "{e}");
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let e = Policy::from_toml("delay = \"1s\"\nmax_round = 3\n").unwrap_err();
        assert_eq!(e.location.map(|l| l.0), Some(2), "{e}");
        assert!(e.to_string().contains("max_round"), "{e}");
        assert!(
            e.to_string().contains("max_rounds"),
            "lists allowed keys: {e}"
        );
    }

    #[test]
    fn out_of_range_names_field_value_allowed_and_line() {
        let e = Policy::from_toml("jitter = 0.1\n\n[budget]\nratio = 1.5\n").unwrap_err();
        assert_eq!(e.field, "budget.ratio");
        assert_eq!(e.value, "1.5");
        assert!(e.allowed.contains("0.0..=1.0"));
        assert_eq!(e.location, Some((4, 9)));
        let e = Policy::from_toml("max_rounds = 1000").unwrap_err();
        assert_eq!(e.field, "max_rounds");
        assert_eq!(e.location, Some((1, 14)));
        assert!(e.to_string().contains("1..=10"), "{e}");
    }

    #[test]
    fn wrong_type_and_negative_values_are_refused() {
        let e = Policy::from_toml("max_rounds = \"two\"").unwrap_err();
        assert_eq!(e.location.map(|l| l.0), Some(1));
        let e = Policy::from_toml("max_rounds = -1").unwrap_err();
        assert_eq!(e.location.map(|l| l.0), Some(1));
        let e = Policy::from_toml("delay = \"-5ms\"").unwrap_err();
        assert_eq!(e.location.map(|l| l.0), Some(1));
    }

    #[test]
    fn cross_field_rules_hold() {
        let e = Policy::from_toml("[timeouts]\nconnect = \"10s\"\nattempt = \"5s\"\n").unwrap_err();
        assert_eq!(e.field, "timeouts.connect");
        assert_eq!(e.location, Some((2, 11)));
        let e =
            Policy::from_toml("[health]\ncooldown = \"10m\"\nmax_cooldown = \"1m\"\n").unwrap_err();
        assert_eq!(e.field, "health.max_cooldown");
        let e = Policy::from_toml("[classify]\nretryable_statuses = [429]\n").unwrap_err();
        assert_eq!(e.field, "classify.retryable_statuses");
        let e = Policy::from_toml("[classify]\ntransient_keywords = [\"  \"]\n").unwrap_err();
        assert_eq!(e.field, "classify.transient_keywords");
    }

    const BIG: &str = "openai/gpt-oss-120b";

    #[test]
    fn model_override_replaces_what_it_names_and_inherits_the_rest() {
        let p = Policy::from_toml(
            "delay = \"250ms\"\n\
             [models.\"openai/gpt-oss-120b\"]\n\
             max_rounds = 3\n\
             [models.\"openai/gpt-oss-120b\".budget]\n\
             ratio = 0.5\n\
             [models.\"openai/gpt-oss-120b\".classify]\n\
             retryable_statuses = [408, 425]\n",
        )
        .unwrap();
        let big = p.resolve(BIG);
        assert_eq!((big.max_rounds, big.budget.ratio), (3, 0.5));
        assert_eq!(big.classify.retryable_statuses, vec![408, 425]);
        assert_eq!(big.delay, Duration::from_millis(250).into(), "inherited");
        assert_eq!(big.budget.window, p.budget.window, "inherited");
        assert!(big.models.is_empty());
        let other = p.resolve("other");
        assert_eq!(
            other,
            Policy {
                models: BTreeMap::new(),
                ..p.clone()
            }
        );
    }

    #[test]
    fn overrides_round_trip_through_to_toml() {
        let mut p = Policy::default();
        let mut o = PolicyOverride {
            max_rounds: Some(3),
            delay: Some(Duration::from_millis(100).into()),
            ..PolicyOverride::default()
        };
        o.budget.ratio = Some(0.5);
        o.timeouts.attempt = Some(Duration::from_secs(30));
        o.classify.transient_keywords = Some(vec!["overloaded".into()]);
        p.models.insert(BIG.into(), o);
        p.models.insert("gpt-4.1".into(), PolicyOverride::default());
        let text = p.to_toml();
        assert!(
            text.contains("[models.\"openai/gpt-oss-120b\".budget]"),
            "{text}"
        );
        assert_eq!(Policy::from_toml(&text).unwrap(), p);
        assert!(!Policy::default().to_toml().contains("models"));
    }

    #[test]
    fn override_errors_name_the_full_path_and_where_it_is_written() {
        let e = Policy::from_toml("[models.\"gpt-4.1\".budget]\nratio = 1.5\n").unwrap_err();
        assert_eq!(e.field, "models.\"gpt-4.1\".budget.ratio");
        assert_eq!((e.value.as_str(), e.location), ("1.5", Some((2, 9))));
        let e = Policy::from_toml("[models.x]\njitter = 0.1\n[models.x.budget]\nratioo = 1\n")
            .unwrap_err();
        assert_eq!(e.field, "models.\"x\".budget.ratioo");
        assert_eq!(e.location, Some((4, 1)));
        assert!(e.allowed.contains("unknown field `ratioo`"), "{e}");
        let e = Policy::from_toml("[models.x]\nmax_rounds = \"two\"\n").unwrap_err();
        assert_eq!(e.field, "models.\"x\".max_rounds");
        assert_eq!(e.location, Some((2, 14)));
        let e = Policy::from_toml("[models]\n\"gpt-4.1\" = { jitter = 2.0 }\n").unwrap_err();
        assert_eq!(e.field, "models.\"gpt-4.1\".jitter");
        assert_eq!((e.value.as_str(), e.location), ("2.0", Some((2, 24))));
        assert!(
            e.to_string()
                .starts_with("line 2, column 24: `models.\"gpt-4.1\".jitter` = 2.0 is invalid"),
            "{e}"
        );
    }

    #[test]
    fn resolved_model_policy_is_what_is_validated() {
        // The override sets `attempt` below the inherited `connect`: the
        // error names the inherited field and points at the override.
        let e =
            Policy::from_toml("jitter = 0.1\n[models.x.timeouts]\nattempt = \"1s\"\n").unwrap_err();
        assert_eq!(e.field, "models.\"x\".timeouts.connect");
        assert_eq!(e.location, Some((2, 1)));
        assert!(e.allowed.contains("inherited"), "{e}");
        // Valid on its own, valid with the base: accepted.
        Policy::from_toml("[timeouts]\nconnect = \"1s\"\n[models.x.timeouts]\nattempt = \"2s\"\n")
            .unwrap();
        let e = Policy::from_toml("[models.\" \"]\njitter = 0.1\n").unwrap_err();
        assert_eq!(e.field, "models.\" \"");
        // Built in code, not parsed: the same path, no location.
        let mut p = Policy::default();
        let mut o = PolicyOverride::default();
        o.health.demote_after = Some(0);
        p.models.insert(BIG.into(), o);
        let e = p.validate().unwrap_err();
        assert_eq!(
            e.field,
            "models.\"openai/gpt-oss-120b\".health.demote_after"
        );
        assert_eq!(e.location, None);
    }

    #[test]
    fn bytes_that_are_not_text_name_the_line() {
        let e = Policy::from_bytes(b"max_rounds = 2\n\xff\xfe\x00").unwrap_err();
        assert_eq!(e.location, Some((2, 1)));
        assert!(e.allowed.contains("not UTF-8"), "{e}");
        let e = Policy::from_bytes(b"max_rounds = 2\n\x00\x01\x02").unwrap_err();
        assert_eq!(e.location.map(|l| l.0), Some(2), "{e}");
        assert_eq!(Policy::from_bytes(b"").unwrap(), Policy::default());
        let bom = Policy::from_bytes(b"\xEF\xBB\xBFmax_rounds = 3\n").unwrap();
        assert_eq!(bom.max_rounds, 3);
    }

    proptest::proptest! {
        /// Whatever is on disk, parsing returns: no panic, no hang.
        #[test]
        fn any_bytes_are_a_policy_or_an_error(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            if let Err(e) = Policy::from_bytes(&bytes) {
                let _ = e.to_string();
            }
        }

        /// TOML-shaped noise around model tables and keys: errors are
        /// located and rendered without panicking.
        #[test]
        fn toml_like_noise_never_panics(text in "(\\[models\\.\"[a-z./ ]{0,6}\"(\\.budget|\\.timeouts)?\\]\n|[a-z_]{1,12} = (\"[0-9a-z]{0,4}\"|-?[0-9.]{1,4}|\\[\\]|\\{\\})\n|\\[[a-z]{0,8}\\]\n){0,6}") {
            if let Err(e) = Policy::from_toml(&text) {
                let _ = e.to_string();
            }
        }
    }

    #[test]
    fn admission_defaults() {
        let a = AdmissionPolicy::default();
        assert!(a.enabled && a.slow_start);
        assert_eq!(a.max_wait, Duration::from_secs(10));
        assert_eq!((a.max_waiting, a.decrease, a.min_limit), (1024, 0.5, 1));
        assert_eq!(a.probe_delay, Duration::from_millis(100));
        assert_eq!(a.probe_max_delay, Duration::from_secs(1));
        assert_eq!(Policy::default().admission, a);
        assert_eq!(
            Policy::from_toml("[admission]\n").unwrap(),
            Policy::default()
        );
        let text = Policy::default().to_toml();
        assert!(
            text.contains("[admission]\nenabled = true\nmax_wait = \"10s\"\n"),
            "{text}"
        );
    }

    #[test]
    fn an_admission_table_parses() {
        let p = Policy::from_toml(
            "[admission]\n\
             enabled = false\n\
             max_wait = \"0s\"\n\
             max_waiting = 16\n\
             decrease = 0.7\n\
             min_limit = 4\n\
             probe_delay = \"250ms\"\n\
             probe_max_delay = \"250ms\"\n\
             slow_start = false\n",
        )
        .unwrap();
        assert_eq!(
            p.admission,
            AdmissionPolicy {
                enabled: false,
                max_wait: Duration::ZERO,
                max_waiting: 16,
                decrease: 0.7,
                min_limit: 4,
                probe_delay: Duration::from_millis(250),
                probe_max_delay: Duration::from_millis(250),
                slow_start: false,
            }
        );
        assert_eq!(Policy::from_toml(&p.to_toml()).unwrap(), p);
        // the bounds are allowed
        for text in [
            "max_wait = \"10m\"",
            "max_waiting = 1",
            "max_waiting = 1000000",
            "decrease = 0.1",
            "decrease = 0.9",
            "min_limit = 10000",
            "probe_delay = \"1ms\"",
            "probe_delay = \"60s\"\nprobe_max_delay = \"60s\"",
            "probe_max_delay = \"5m\"",
        ] {
            Policy::from_toml(&format!("[admission]\n{text}\n"))
                .unwrap_or_else(|e| panic!("{text}: {e}"));
        }
        let e = Policy::from_toml("[admission]\nmax_wiat = \"1s\"\n").unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.location),
            ("admission.max_wiat", Some((2, 1)))
        );
    }

    #[test]
    fn admission_values_out_of_range_name_the_field_value_range_and_line() {
        // (key, value written, value reported, what is allowed)
        let cases = [
            (
                "max_wait",
                "\"11m\"",
                "\"11m\"",
                "a duration within \"0s\"..=\"10m\"",
            ),
            ("max_waiting", "0", "0", "an integer within 1..=1000000"),
            (
                "max_waiting",
                "1000001",
                "1000001",
                "an integer within 1..=1000000",
            ),
            ("decrease", "0.05", "0.05", "a number within 0.1..=0.9"),
            ("decrease", "1.0", "1.0", "a number within 0.1..=0.9"),
            ("decrease", "nan", "NaN", "a number within 0.1..=0.9"),
            ("min_limit", "0", "0", "an integer within 1..=10000"),
            ("min_limit", "10001", "10001", "an integer within 1..=10000"),
            (
                "probe_delay",
                "\"0s\"",
                "\"0s\"",
                "a duration within \"1ms\"..=\"1m\"",
            ),
            (
                "probe_delay",
                "\"2m\"",
                "\"2m\"",
                "a duration within \"1ms\"..=\"1m\"",
            ),
            (
                "probe_max_delay",
                "\"6m\"",
                "\"6m\"",
                "a duration within \"100ms\"..=\"5m\" and at least `admission.probe_delay`",
            ),
        ];
        for (key, written, value, allowed) in cases {
            let text = format!("max_rounds = 2\n[admission]\n{key} = {written}\n");
            let e = Policy::from_toml(&text).unwrap_err();
            let field = format!("admission.{key}");
            assert_eq!(e.field, field, "{text}: {e}");
            assert_eq!(e.value, value, "{text}: {e}");
            assert!(e.allowed.starts_with(allowed), "{text}: {e}");
            assert_eq!(e.location, Some((3, key.len() + 4)), "{text}: {e}");
            assert!(
                e.to_string().starts_with(&format!(
                    "line 3, column {}: `{field}` = {value} is invalid: {allowed}",
                    key.len() + 4
                )),
                "{e}"
            );
        }
        let e = Policy::from_toml("[admission]\nmax_wait = \"1h\"\n").unwrap_err();
        assert!(
            e.allowed.contains("\"0s\": never wait, fail at once"),
            "{e}"
        );
        // built in code, not parsed: the same field, no location
        let mut p = Policy::default();
        p.admission.decrease = f64::INFINITY;
        let e = p.validate().unwrap_err();
        assert_eq!((e.field.as_str(), e.location), ("admission.decrease", None));
    }

    #[test]
    fn admission_probe_max_delay_is_at_least_probe_delay() {
        let e =
            Policy::from_toml("[admission]\nprobe_delay = \"2s\"\nprobe_max_delay = \"500ms\"\n")
                .unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.value.as_str(), e.location),
            ("admission.probe_max_delay", "\"500ms\"", Some((3, 19)))
        );
        assert!(e.allowed.contains("\"2s\"..=\"5m\""), "{e}");
        assert!(
            e.allowed.contains("at least `admission.probe_delay`"),
            "{e}"
        );
        // a longer probe_delay alone is refused against the inherited maximum
        let e = Policy::from_toml("[admission]\nprobe_delay = \"2s\"\n").unwrap_err();
        assert_eq!(e.field, "admission.probe_max_delay");
        // equal is allowed
        let p = Policy::from_toml("[admission]\nprobe_delay = \"2s\"\nprobe_max_delay = \"2s\"\n")
            .unwrap();
        assert_eq!(p.admission.probe_max_delay, p.admission.probe_delay);
    }

    #[test]
    fn admission_model_override_applies_to_that_model_only() {
        let p = Policy::from_toml("[models.\"m\".admission]\nmax_wait = \"2s\"\n").unwrap();
        let m = p.resolve("m");
        assert_eq!(m.admission.max_wait, Duration::from_secs(2));
        assert_eq!(
            m.admission,
            AdmissionPolicy {
                max_wait: Duration::from_secs(2),
                ..AdmissionPolicy::default()
            },
            "the rest is inherited"
        );
        assert_eq!(p.admission, AdmissionPolicy::default());
        assert_eq!(p.resolve("other").admission, AdmissionPolicy::default());
        assert_eq!(Policy::from_toml(&p.to_toml()).unwrap(), p);
        assert!(
            p.to_toml()
                .contains("[models.m.admission]\nmax_wait = \"2s\"\n"),
            "{}",
            p.to_toml()
        );
        // errors name the full path and where the value is written
        let e = Policy::from_toml("[models.\"x\".admission]\nmax_wait = \"1h\"\n").unwrap_err();
        assert_eq!(e.field, "models.\"x\".admission.max_wait");
        assert_eq!((e.value.as_str(), e.location), ("\"1h\"", Some((2, 12))));
        let e = Policy::from_toml("[models.x.admission]\ndecrease = 0.95\n").unwrap_err();
        assert_eq!(e.field, "models.\"x\".admission.decrease");
        assert_eq!(e.location, Some((2, 12)));
        // valid alone, invalid with what it inherits: points at the override
        let e = Policy::from_toml("jitter = 0.1\n[models.x.admission]\nprobe_delay = \"5s\"\n")
            .unwrap_err();
        assert_eq!(e.field, "models.\"x\".admission.probe_max_delay");
        assert_eq!(e.location, Some((2, 1)));
        assert!(e.allowed.contains("inherited"), "{e}");
    }

    #[test]
    fn a_shadow_admission_table_is_accepted_and_validated() {
        let p = Policy::from_toml("[shadow.admission]\nmax_wait = \"0s\"\nslow_start = false\n")
            .unwrap();
        let c = p.shadow_candidate().unwrap();
        assert_eq!(
            (c.admission.max_wait, c.admission.slow_start),
            (Duration::ZERO, false)
        );
        assert_eq!(c.admission.max_waiting, 1024, "inherited");
        assert_eq!(p.admission, AdmissionPolicy::default(), "live unchanged");
        assert_eq!(Policy::from_toml(&p.to_toml()).unwrap(), p);
        let e = Policy::from_toml("[shadow.admission]\ndecrease = 2.0\n").unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.value.as_str(), e.location),
            ("shadow.admission.decrease", "2.0", Some((2, 12)))
        );
        assert!(e.allowed.contains("0.1..=0.9"), "{e}");
        let e = Policy::from_toml("[shadow.admission]\nmax_waiting = 0\n").unwrap_err();
        assert_eq!(e.field, "shadow.admission.max_waiting");
        let e = Policy::from_toml("[shadow.admission]\nmin_limitt = 2\n").unwrap_err();
        assert_eq!(e.field, "shadow.admission.min_limitt");
        // with a model's override it conflicts with
        let e = Policy::from_toml(
            "[shadow.admission]\nprobe_max_delay = \"2s\"\n[models.x.admission]\nprobe_delay = \"3s\"\nprobe_max_delay = \"3s\"\n",
        )
        .unwrap_err();
        assert_eq!(e.field, "shadow.admission.probe_max_delay");
        assert!(e.allowed.contains("model \"x\""), "{e}");
    }
}
