//! The order in which one request tries a model's providers.
//!
//! Healthy providers first, rotated round-robin across requests so load
//! spreads; demoted providers after them in configured order (never
//! dropped: when all are demoted they are all still tried). A demoted
//! provider whose cool-down has passed is moved to the front for exactly
//! one request at a time: that request is its probe, with every healthy
//! provider still behind it if the probe fails.
//!
//! With `adaptive.latency_order`, the healthy providers are ordered by
//! their recent median latency instead ([`by_latency`]): a persistently
//! slow one goes behind the others, and the first is drawn with a
//! probability inversely proportional to its median. Drawing, rather than
//! always taking the fastest, is deliberate: with latency alone (no count
//! of requests in flight) power-of-two-choices over two providers always
//! picks the same one, and two providers at 20 ms and 22 ms would not
//! share the load at all. A weight of 1/p50 sends 52% and 48% there, and
//! 91% to a 20 ms provider next to a 200 ms one (next to an 800 ms one,
//! 100%: that one is slow, and goes last).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::clock::Moment;
use smallvec::SmallVec;

use crate::health::ProviderHealth;

/// Provider indices in the order to try them; inline up to 8 providers.
pub(super) type Order = SmallVec<[u8; 8]>;

/// A claimed probe slot, released when the request ends or is dropped.
#[derive(Debug)]
pub(super) struct ProbeGuard<'a> {
    pub(super) index: u8,
    health: &'a ProviderHealth,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        self.health.end_probe();
    }
}

/// What latency did to one request's order, as a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OrderDecision {
    /// Too few samples, or latency kept the round-robin choice.
    RoundRobin = 0,
    /// A faster provider than the round-robin one goes first.
    FastestFirst = 1,
    /// A persistently slow provider was moved behind the others.
    SlowLast = 2,
}

impl OrderDecision {
    /// Every decision, in label order.
    pub(crate) const LABELS: [&'static str; 3] = ["round_robin", "fastest_first", "slow_last"];
}

/// How latency orders the healthy providers (`adaptive.latency_order`).
pub(super) struct LatencyRule<'r> {
    /// A provider's recent median, if it has enough samples.
    pub(super) p50: &'r dyn Fn(u8) -> Option<Duration>,
    /// `adaptive.slow_factor`.
    pub(super) slow_factor: f64,
    /// `adaptive.slow_min`.
    pub(super) slow_min: Duration,
}

/// Orders `order` (healthy providers, already rotated round-robin) by
/// latency: providers whose median is over `slow_factor` x the fastest's
/// and over `slow_min` go last (fastest of them first); when every other
/// provider has a median, the first is drawn with weight 1/p50 and the
/// rest keep their round-robin order. Providers without enough samples
/// are never called slow, and keep the round-robin choice of the first.
pub(super) fn by_latency(order: &mut Order, rule: &LatencyRule<'_>) -> OrderDecision {
    if order.len() < 2 {
        return OrderDecision::RoundRobin;
    }
    let p50s: SmallVec<[Option<Duration>; 8]> = order.iter().map(|&i| (rule.p50)(i)).collect();
    let Some(fastest) = p50s.iter().flatten().min().copied() else {
        return OrderDecision::RoundRobin;
    };
    let threshold = fastest.mul_f64(rule.slow_factor).max(rule.slow_min);
    let mut fast: SmallVec<[(u8, Option<Duration>); 8]> = SmallVec::new();
    let mut slow: SmallVec<[(u8, Duration); 8]> = SmallVec::new();
    for (&i, &p50) in order.iter().zip(&p50s) {
        match p50 {
            Some(d) if d > threshold => slow.push((i, d)),
            _ => fast.push((i, p50)),
        }
    }
    slow.sort_by_key(|&(_, d)| d);
    let mut decision = if slow.is_empty() {
        OrderDecision::RoundRobin
    } else {
        OrderDecision::SlowLast
    };
    if fast.len() > 1 && fast.iter().all(|(_, p)| p.is_some()) {
        let weight = |p: Option<Duration>| 1.0 / p.map_or(1e-6, |d| d.as_secs_f64().max(1e-6));
        let total: f64 = fast.iter().map(|&(_, p)| weight(p)).sum();
        let mut draw = fastrand::f64() * total;
        let mut chosen = fast.len() - 1;
        for (k, &(_, p)) in fast.iter().enumerate() {
            draw -= weight(p);
            if draw < 0.0 {
                chosen = k;
                break;
            }
        }
        if chosen > 0 {
            let faster = fast[chosen].1 < fast[0].1;
            fast[..=chosen].rotate_right(1);
            if faster && decision == OrderDecision::RoundRobin {
                decision = OrderDecision::FastestFirst;
            }
        }
    }
    order.clear();
    order.extend(fast.iter().map(|&(i, _)| i));
    order.extend(slow.iter().map(|&(i, _)| i));
    decision
}

/// The order of a model with one provider is that provider: a request
/// only takes its health probe, when it is demoted and the probe is due.
#[inline]
pub(super) fn probe_alone(health: &ProviderHealth, now: Moment) -> Option<ProbeGuard<'_>> {
    // Built only when taken: a guard gives the probe slot back when
    // dropped, even the one it did not take.
    health
        .try_start_probe(now)
        .then(|| ProbeGuard { index: 0, health })
}

/// Plans the order for one request; with a latency rule, the healthy
/// providers are ordered by [`by_latency`] (`None` as the decision: the
/// rule was not given, or there was nothing to order).
pub(super) fn plan<'a>(
    healths: impl ExactSizeIterator<Item = &'a ProviderHealth> + Clone,
    rr: &AtomicUsize,
    now: Moment,
    latency: Option<&LatencyRule<'_>>,
) -> (Order, Option<ProbeGuard<'a>>, Option<OrderDecision>) {
    let mut order = Order::new();
    order.extend(
        healths
            .clone()
            .enumerate()
            .filter(|(_, h)| !h.is_demoted())
            .map(|(i, _)| i as u8),
    );
    if order.len() > 1 {
        let start = rr.fetch_add(1, Ordering::Relaxed) % order.len();
        order.rotate_left(start);
    }
    let decision = latency
        .filter(|_| order.len() > 1)
        .map(|rule| by_latency(&mut order, rule));
    let mut probe = None;
    for (i, h) in healths.enumerate() {
        if order.contains(&(i as u8)) {
            continue;
        }
        if probe.is_none() && h.try_start_probe(now) {
            probe = Some(ProbeGuard {
                index: i as u8,
                health: h,
            });
            order.insert(0, i as u8);
        } else {
            order.push(i as u8);
        }
    }
    (order, probe, decision)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::HealthPolicy;

    fn demote(h: &ProviderHealth, now: Moment) {
        let p = HealthPolicy {
            demote_after: 1,
            ..HealthPolicy::default()
        };
        h.on_failure(now, &p, false);
        assert!(h.is_demoted());
    }

    #[tokio::test(start_paused = true)]
    async fn rotates_healthy_and_puts_demoted_last() {
        let hs: Vec<_> = (0..3).map(|_| ProviderHealth::new()).collect();
        let rr = AtomicUsize::new(0);
        let now = Moment::now();
        let orders: Vec<Vec<u8>> = (0..3)
            .map(|_| plan(hs.iter(), &rr, now, None).0.to_vec())
            .collect();
        assert_eq!(orders, vec![vec![0, 1, 2], vec![1, 2, 0], vec![2, 0, 1]]);
        demote(&hs[0], now);
        let orders: Vec<Vec<u8>> = (0..2)
            .map(|_| plan(hs.iter(), &rr, now, None).0.to_vec())
            .collect();
        assert!(orders.contains(&vec![1, 2, 0]) && orders.contains(&vec![2, 1, 0]));
    }

    #[tokio::test(start_paused = true)]
    async fn due_probe_goes_first_once() {
        let hs: Vec<_> = (0..2).map(|_| ProviderHealth::new()).collect();
        let rr = AtomicUsize::new(0);
        let now = Moment::now();
        demote(&hs[1], now);
        let (order, probe, _) = plan(hs.iter(), &rr, now, None);
        assert_eq!(order.to_vec(), vec![0, 1]);
        assert!(probe.is_none());
        let later = now + Duration::from_secs(30);
        let (order, probe, _) = plan(hs.iter(), &rr, later, None);
        assert_eq!(order.to_vec(), vec![1, 0]);
        assert_eq!(probe.as_ref().map(|p| p.index), Some(1));
        // while the probe is out, nobody else probes
        let (order2, probe2, _) = plan(hs.iter(), &rr, later, None);
        assert_eq!(order2.to_vec(), vec![0, 1]);
        assert!(probe2.is_none());
        drop(probe);
        assert!(!hs[1].probing());
    }

    #[tokio::test(start_paused = true)]
    async fn all_demoted_are_still_tried() {
        let hs: Vec<_> = (0..3).map(|_| ProviderHealth::new()).collect();
        let rr = AtomicUsize::new(0);
        let now = Moment::now();
        for h in &hs {
            demote(h, now);
        }
        let (order, _, _) = plan(hs.iter(), &rr, now, None);
        assert_eq!(order.to_vec(), vec![0, 1, 2]);
    }

    fn rule(p50s: &[Option<u64>]) -> impl Fn(u8) -> Option<Duration> + '_ {
        move |i| p50s[i as usize].map(Duration::from_millis)
    }

    fn ordered(p50s: &[Option<u64>]) -> (Vec<u8>, OrderDecision) {
        let f = rule(p50s);
        let r = LatencyRule {
            p50: &f,
            slow_factor: 2.0,
            slow_min: Duration::from_millis(500),
        };
        let mut order: Order = (0..p50s.len() as u8).collect();
        let d = by_latency(&mut order, &r);
        (order.to_vec(), d)
    }

    #[test]
    fn a_persistently_slow_provider_goes_last() {
        // 800 ms > 2 x 20 ms and > 500 ms: behind the others, every time
        for _ in 0..100 {
            let (order, d) = ordered(&[Some(800), Some(20)]);
            assert_eq!((order, d), (vec![1, 0], OrderDecision::SlowLast));
        }
        // slow ones keep their own latency order, behind the fast ones
        let (order, _) = ordered(&[Some(3000), Some(900), Some(20), None]);
        assert_eq!(&order[2..], &[1, 0]);
        // 300 ms is over 2 x 20 ms but under slow_min: not slow
        let (order, d) = ordered(&[Some(300), Some(20)]);
        assert!(order.len() == 2 && d != OrderDecision::SlowLast);
        // 900 ms next to 600 ms: over slow_min, under 2x: not slow
        assert_ne!(ordered(&[Some(900), Some(600)]).1, OrderDecision::SlowLast);
    }

    #[test]
    fn without_data_the_round_robin_order_stays() {
        assert_eq!(
            ordered(&[None, None, None]),
            (vec![0, 1, 2], OrderDecision::RoundRobin)
        );
        // one provider without samples: the first stays the round-robin one
        for _ in 0..100 {
            assert_eq!(ordered(&[None, Some(10), Some(40)]).0, vec![0, 1, 2]);
        }
    }

    #[test]
    fn the_first_is_drawn_inversely_to_its_median() {
        // 10 ms and 40 ms: weights 0.1 and 0.025, so 80% start with the first
        let n = 4000;
        let mut first = [0u32; 2];
        for _ in 0..n {
            let (order, d) = ordered(&[Some(40), Some(10)]);
            first[order[0] as usize] += 1;
            assert_eq!(
                d,
                if order[0] == 1 {
                    OrderDecision::FastestFirst
                } else {
                    OrderDecision::RoundRobin
                }
            );
        }
        let share = f64::from(first[1]) / f64::from(n);
        assert!((0.75..=0.85).contains(&share), "{share}");
    }

    #[tokio::test(start_paused = true)]
    async fn latency_orders_healthy_providers_only() {
        let hs: Vec<_> = (0..3).map(|_| ProviderHealth::new()).collect();
        let rr = AtomicUsize::new(0);
        let now = Moment::now();
        demote(&hs[1], now);
        // provider 0 is slow, 1 demoted (and fastest), 2 fast
        let f = rule(&[Some(900), Some(1), Some(20)]);
        let r = LatencyRule {
            p50: &f,
            slow_factor: 2.0,
            slow_min: Duration::from_millis(500),
        };
        let (order, _, d) = plan(hs.iter(), &rr, now, Some(&r));
        assert_eq!(order.to_vec(), vec![2, 0, 1]);
        assert_eq!(d, Some(OrderDecision::SlowLast));
    }
}
