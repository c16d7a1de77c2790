//! The order in which one request tries a model's providers.
//!
//! Healthy providers first, rotated round-robin across requests so load
//! spreads; demoted providers after them in configured order (never
//! dropped: when all are demoted they are all still tried). A demoted
//! provider whose cool-down has passed is moved to the front for exactly
//! one request at a time: that request is its probe, with every healthy
//! provider still behind it if the probe fails.

use std::sync::atomic::{AtomicUsize, Ordering};

use smallvec::SmallVec;
use tokio::time::Instant;

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

/// Plans the order for one request.
pub(super) fn plan<'a>(
    healths: impl ExactSizeIterator<Item = &'a ProviderHealth> + Clone,
    rr: &AtomicUsize,
    now: Instant,
) -> (Order, Option<ProbeGuard<'a>>) {
    let n = healths.len();
    let mut order = Order::new();
    if n == 1 {
        let probe = healths
            .clone()
            .next()
            .filter(|h| h.try_start_probe(now))
            .map(|health| ProbeGuard { index: 0, health });
        order.push(0);
        return (order, probe);
    }
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
    (order, probe)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::HealthPolicy;
    use std::time::Duration;

    fn demote(h: &ProviderHealth, now: Instant) {
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
        let now = Instant::now();
        let orders: Vec<Vec<u8>> = (0..3)
            .map(|_| plan(hs.iter(), &rr, now).0.to_vec())
            .collect();
        assert_eq!(orders, vec![vec![0, 1, 2], vec![1, 2, 0], vec![2, 0, 1]]);
        demote(&hs[0], now);
        let orders: Vec<Vec<u8>> = (0..2)
            .map(|_| plan(hs.iter(), &rr, now).0.to_vec())
            .collect();
        assert!(orders.contains(&vec![1, 2, 0]) && orders.contains(&vec![2, 1, 0]));
    }

    #[tokio::test(start_paused = true)]
    async fn due_probe_goes_first_once() {
        let hs: Vec<_> = (0..2).map(|_| ProviderHealth::new()).collect();
        let rr = AtomicUsize::new(0);
        let now = Instant::now();
        demote(&hs[1], now);
        let (order, probe) = plan(hs.iter(), &rr, now);
        assert_eq!(order.to_vec(), vec![0, 1]);
        assert!(probe.is_none());
        let later = now + Duration::from_secs(30);
        let (order, probe) = plan(hs.iter(), &rr, later);
        assert_eq!(order.to_vec(), vec![1, 0]);
        assert_eq!(probe.as_ref().map(|p| p.index), Some(1));
        // while the probe is out, nobody else probes
        let (order2, probe2) = plan(hs.iter(), &rr, later);
        assert_eq!(order2.to_vec(), vec![0, 1]);
        assert!(probe2.is_none());
        drop(probe);
        assert!(!hs[1].probing());
    }

    #[tokio::test(start_paused = true)]
    async fn all_demoted_are_still_tried() {
        let hs: Vec<_> = (0..3).map(|_| ProviderHealth::new()).collect();
        let rr = AtomicUsize::new(0);
        let now = Instant::now();
        for h in &hs {
            demote(h, now);
        }
        let (order, _) = plan(hs.iter(), &rr, now);
        assert_eq!(order.to_vec(), vec![0, 1, 2]);
    }
}
