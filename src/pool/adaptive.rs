//! The adaptive decisions that need a model's or a route's state: the
//! latency-aware order and the learned retry delay, each with its metric
//! label.
//!
//! Kept out of `call.rs` so the request loop reads as the fixed rules with
//! one call per adaptive decision.

use std::time::Duration;

use crate::clock::Moment;
use crate::live::ModelPolicy;
use metrics::{Counter, Gauge};

use super::order::{self, LatencyRule, Order, OrderDecision, ProbeGuard};
use super::shadow::ShadowRoute;
use super::{Model, Route};
use crate::classify::Classification;
use crate::policy::{AdaptivePolicy, Policy, RetryDelay};
use crate::recovery::RecoveryStats;

/// Where a transient retry's delay came from, as a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DelaySource {
    /// `delay` is a duration.
    Fixed = 0,
    /// `delay = "auto"`, from the provider's recent recoveries.
    Learned = 1,
    /// `delay = "auto"` with too few recoveries: `delay_auto_fallback`.
    Fallback = 2,
}

const DELAY_SOURCES: [&str; 3] = ["fixed", "learned", "fallback"];

/// Metric handles of the adaptive decisions of one model, resolved once.
#[derive(Debug)]
pub(crate) struct AdaptiveMetrics {
    /// `order_decisions_total{decision}`, by [`OrderDecision`].
    order: [Counter; OrderDecision::LABELS.len()],
    /// `retry_delay_decisions_total{source}`, by [`DelaySource`].
    delay_source: [Counter; DELAY_SOURCES.len()],
}

impl AdaptiveMetrics {
    pub(crate) fn new(prefix: &str, model: &str) -> Self {
        let name = format!("{prefix}order_decisions_total");
        let delay = format!("{prefix}retry_delay_decisions_total");
        AdaptiveMetrics {
            order: OrderDecision::LABELS.map(
                |d| metrics::counter!(name.clone(), "model" => model.to_owned(), "decision" => d),
            ),
            delay_source: DELAY_SOURCES.map(
                |s| metrics::counter!(delay.clone(), "model" => model.to_owned(), "source" => s),
            ),
        }
    }
}

/// A route's adaptive state: its recoveries (for `delay = "auto"`) and the
/// gauge of the delay learned from them.
#[derive(Debug)]
pub(crate) struct RouteAdaptive {
    recovery: RecoveryStats,
    learned_delay: Gauge,
    /// The shadow policy's view of this route.
    pub(super) shadow: ShadowRoute,
}

impl RouteAdaptive {
    pub(crate) fn new(prefix: &str, model: &str, provider: &str) -> Self {
        let learned_delay = metrics::gauge!(format!("{prefix}learned_retry_delay_seconds"), "model" => model.to_owned(), "provider" => provider.to_owned());
        learned_delay.set(0.0);
        RouteAdaptive {
            recovery: RecoveryStats::new(),
            learned_delay,
            shadow: ShadowRoute::default(),
        }
    }
}

impl<P> Route<P> {
    /// Records a finished attempt for the learned delay: `class` is `None`
    /// for a success. Nothing is recorded unless `delay = "auto"`.
    pub(super) fn record_recovery(
        &self,
        policy: &Policy,
        now: Moment,
        class: Option<Classification>,
    ) {
        if policy.delay != RetryDelay::Auto {
            return;
        }
        match class {
            None => self.adaptive.recovery.on_success(now),
            Some(Classification::Transient) => self.adaptive.recovery.on_failure(now),
            Some(_) => {}
        }
    }
}

/// Registers the HELP texts of the adaptive decisions' metrics.
pub(crate) fn describe(prefix: &str) {
    metrics::describe_counter!(
        format!("{prefix}order_decisions_total"),
        metrics::Unit::Count,
        "Requests ordered by adaptive.latency_order, by decision: round_robin (too few samples, or latency kept the round-robin choice), fastest_first (a faster provider went first), slow_last (a persistently slow provider was moved behind the others; not a demotion)."
    );
    metrics::describe_counter!(
        format!("{prefix}retry_delay_decisions_total"),
        metrics::Unit::Count,
        "Transient retries planned, by the source of their delay: fixed (delay is a duration), learned (delay = \"auto\": the provider's recent recoveries), fallback (delay = \"auto\" with too few recoveries: adaptive.delay_auto_fallback)."
    );
    metrics::describe_gauge!(
        format!("{prefix}learned_retry_delay_seconds"),
        metrics::Unit::Seconds,
        "The retry delay last learned for the provider with delay = \"auto\" (a quantile of its recent times to recovery, clamped); 0 until learned."
    );
}

impl<P> Model<P> {
    /// Deposits a new request into the retry budget: the full ratio, or
    /// with `adaptive.budget` the ratio scaled by how well retries do.
    pub(super) fn deposit(&self, now: Moment, resolved: &ModelPolicy) {
        let policy = resolved.policy();
        let adaptive = &policy.adaptive;
        if adaptive.budget {
            let scale = self.budget.scale(
                now,
                &policy.budget,
                adaptive.budget_min_success,
                adaptive.budget_min_retries,
            );
            self.budget.deposit_scaled(now, &policy.budget, scale);
            self.metrics.budget_scale(scale);
        } else {
            self.budget.deposit_planned(now, resolved.deposit_plan());
        }
    }

    /// The order of one request's providers: health and probes first (see
    /// [`order`]), then, with `adaptive.latency_order`, latency.
    pub(super) fn plan(
        &self,
        now: Moment,
        adaptive: &AdaptivePolicy,
    ) -> (Order, Option<ProbeGuard<'_>>) {
        let healths = self.routes.iter().map(|r| &r.health);
        if !adaptive.latency_order {
            let (order, probe, _) = order::plan(healths, &self.rr, now, None);
            return (order, probe);
        }
        let p50 = |i: u8| {
            self.routes
                .get(usize::from(i))?
                .stats
                .recent_latency(now, adaptive.min_samples)
                .map(|(p50, _)| p50)
        };
        let rule = LatencyRule {
            p50: &p50,
            slow_factor: adaptive.slow_factor,
            slow_min: adaptive.slow_min,
        };
        let (order, probe, decision) = order::plan(healths, &self.rr, now, Some(&rule));
        if let Some(d) = decision {
            self.adaptive.order[d as usize].increment(1);
        }
        (order, probe)
    }
}

impl<P> Model<P> {
    /// With `delay = "auto"`, the learned delay of a transient retry of
    /// provider `i` (`None`: use the fixed delay or the fallback, see
    /// [`Policy::base_delay`]). Counts the delay's source either way.
    pub(super) fn learned_delay(&self, i: u8, policy: &Policy, now: Moment) -> Option<Duration> {
        let a = &policy.adaptive;
        let learned = match policy.delay {
            RetryDelay::Fixed(_) => None,
            RetryDelay::Auto => self.routes.get(usize::from(i)).and_then(|r| {
                let d = r
                    .adaptive
                    .recovery
                    .quantile(now, a.delay_auto_quantile, a.delay_auto_min_samples)?
                    .clamp(a.delay_auto_min, a.delay_auto_max);
                r.adaptive.learned_delay.set(d.as_secs_f64());
                Some(d)
            }),
        };
        let source = match (policy.delay, learned) {
            (RetryDelay::Fixed(_), _) => DelaySource::Fixed,
            (RetryDelay::Auto, Some(_)) => DelaySource::Learned,
            (RetryDelay::Auto, None) => DelaySource::Fallback,
        };
        self.adaptive.delay_source[source as usize].increment(1);
        learned
    }
}
