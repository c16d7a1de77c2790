//! The adaptive decisions that need a model's state: the latency-aware
//! order (and, per decision, its metric label).
//!
//! Kept out of `call.rs` so the request loop reads as the fixed rules with
//! one call per adaptive decision.

use metrics::Counter;
use tokio::time::Instant;

use super::Model;
use super::order::{self, LatencyRule, Order, OrderDecision, ProbeGuard};
use crate::policy::AdaptivePolicy;

/// Metric handles of the adaptive decisions of one model, resolved once.
#[derive(Debug)]
pub(crate) struct AdaptiveMetrics {
    /// `order_decisions_total{decision}`, by [`OrderDecision`].
    order: [Counter; OrderDecision::LABELS.len()],
}

impl AdaptiveMetrics {
    pub(crate) fn new(prefix: &str, model: &str) -> Self {
        let name = format!("{prefix}order_decisions_total");
        AdaptiveMetrics {
            order: OrderDecision::LABELS.map(
                |d| metrics::counter!(name.clone(), "model" => model.to_owned(), "decision" => d),
            ),
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
}

impl<P> Model<P> {
    /// The order of one request's providers: health and probes first (see
    /// [`order`]), then, with `adaptive.latency_order`, latency.
    pub(super) fn plan(
        &self,
        now: Instant,
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
