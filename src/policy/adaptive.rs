//! `[adaptive]`: decisions driven by each provider's observed latency and
//! recovery times ([`AdaptivePolicy`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::PolicyError;
use super::validate::{check_duration, check_fraction};

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

impl AdaptivePolicy {
    /// Checks every factor, bound and sample count.
    pub(super) fn validate(&self) -> Result<(), PolicyError> {
        if !(self.attempt_timeout_factor.is_finite()
            && (1.0..=100.0).contains(&self.attempt_timeout_factor))
        {
            return Err(PolicyError::field(
                "adaptive.attempt_timeout_factor",
                self.attempt_timeout_factor,
                "a number within 1.0..=100.0",
            ));
        }
        check_duration(
            "adaptive.attempt_timeout_min",
            self.attempt_timeout_min,
            Duration::from_millis(1),
            Duration::from_secs(86_400),
        )?;
        check_duration(
            "adaptive.attempt_timeout_max",
            self.attempt_timeout_max,
            self.attempt_timeout_min,
            Duration::from_secs(86_400),
        )
        .map_err(|e| PolicyError {
            allowed: format!("{} and at least `adaptive.attempt_timeout_min`", e.allowed),
            ..e
        })?;
        if !(1..=1_000_000).contains(&self.min_samples) {
            return Err(PolicyError::field(
                "adaptive.min_samples",
                self.min_samples,
                "an integer within 1..=1000000",
            ));
        }
        check_fraction("adaptive.budget_min_success", self.budget_min_success)?;
        if !(1..=1_000_000).contains(&self.budget_min_retries) {
            return Err(PolicyError::field(
                "adaptive.budget_min_retries",
                self.budget_min_retries,
                "an integer within 1..=1000000",
            ));
        }
        if !(self.slow_factor.is_finite() && (1.0..=100.0).contains(&self.slow_factor)) {
            return Err(PolicyError::field(
                "adaptive.slow_factor",
                self.slow_factor,
                "a number within 1.0..=100.0",
            ));
        }
        check_duration(
            "adaptive.slow_min",
            self.slow_min,
            Duration::ZERO,
            Duration::from_secs(86_400),
        )?;
        if !(self.delay_auto_quantile.is_finite()
            && (0.01..=1.0).contains(&self.delay_auto_quantile))
        {
            return Err(PolicyError::field(
                "adaptive.delay_auto_quantile",
                self.delay_auto_quantile,
                "a number within 0.01..=1.0",
            ));
        }
        check_duration(
            "adaptive.delay_auto_min",
            self.delay_auto_min,
            Duration::ZERO,
            Duration::from_secs(60),
        )?;
        check_duration(
            "adaptive.delay_auto_max",
            self.delay_auto_max,
            self.delay_auto_min,
            Duration::from_secs(300),
        )
        .map_err(|e| PolicyError {
            allowed: format!("{} and at least `adaptive.delay_auto_min`", e.allowed),
            ..e
        })?;
        check_duration(
            "adaptive.delay_auto_fallback",
            self.delay_auto_fallback,
            Duration::ZERO,
            Duration::from_secs(60),
        )?;
        if !(1..=1_000_000).contains(&self.delay_auto_min_samples) {
            return Err(PolicyError::field(
                "adaptive.delay_auto_min_samples",
                self.delay_auto_min_samples,
                "an integer within 1..=1000000",
            ));
        }
        Ok(())
    }
}
