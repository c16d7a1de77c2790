//! Provider health: demotion after repeated failed requests, recovery by
//! probe.
//!
//! Two rules learnt in production shape this module:
//!
//! * **Count each provider at most once per client request.** With two
//!   rounds, a provider that fails in both is one bad request, not two;
//!   counting attempts demoted providers after 5 bad requests instead of 10.
//!   The pool enforces this with a per-request bit set; this type only
//!   counts what it is told.
//! * **Never remove a provider; probe it.** Most models have one provider.
//!   Taking it out of rotation turns a blip into minutes of certain failure.
//!   A demoted provider moves to the back of the order; after a cool-down
//!   one request tries it *first* (a probe, with the healthy providers still
//!   behind it); success restores it, failure doubles the cool-down up to a
//!   cap.
//!
//! Client errors, rate limits and "model not found" never count: the
//! provider answered correctly.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::{Moment, nanos};

use crate::policy::HealthPolicy;

/// What a health update changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HealthEvent {
    /// Nothing visible changed.
    Unchanged,
    /// The provider was demoted just now.
    Demoted,
    /// A demoted provider succeeded and is healthy again.
    Recovered,
    /// A probe failed; the cool-down grew.
    ProbeFailed,
}

/// The health of one provider for one model.
#[derive(Debug)]
pub(crate) struct ProviderHealth {
    origin: Moment,
    consecutive: AtomicU32,
    demoted: AtomicBool,
    probing: AtomicBool,
    /// When the next probe is due, in nanoseconds since `origin`.
    next_probe: AtomicU64,
    /// The current cool-down, in nanoseconds.
    cooldown: AtomicU64,
    demotions: AtomicU64,
    recoveries: AtomicU64,
}

/// A point-in-time view of a provider's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthSnapshot {
    /// Consecutive failed requests.
    pub consecutive_failures: u32,
    /// Whether the provider is demoted (tried after the healthy ones).
    pub demoted: bool,
    /// For a demoted provider: time until its next probe (zero when due).
    pub next_probe_in: Option<Duration>,
    /// Times demoted since the pool was built.
    pub demotions: u64,
    /// Times recovered since the pool was built.
    pub recoveries: u64,
}

impl ProviderHealth {
    pub(crate) fn new() -> Self {
        ProviderHealth {
            origin: Moment::now(),
            consecutive: AtomicU32::new(0),
            demoted: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            next_probe: AtomicU64::new(0),
            cooldown: AtomicU64::new(0),
            demotions: AtomicU64::new(0),
            recoveries: AtomicU64::new(0),
        }
    }

    fn since_origin(&self, now: Moment) -> u64 {
        now.nanos_since(self.origin)
    }

    pub(crate) fn is_demoted(&self) -> bool {
        self.demoted.load(Ordering::Acquire)
    }

    /// Records a failed request (the caller guarantees once per request).
    #[inline]
    pub(crate) fn on_failure(
        &self,
        now: Moment,
        policy: &HealthPolicy,
        was_probe: bool,
    ) -> HealthEvent {
        let n = self
            .consecutive
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        if self.is_demoted() {
            if was_probe {
                let grown = self
                    .cooldown
                    .load(Ordering::Acquire)
                    .saturating_mul(2)
                    .clamp(nanos(policy.cooldown), nanos(policy.max_cooldown));
                self.cooldown.store(grown, Ordering::Release);
                self.next_probe.store(
                    self.since_origin(now).saturating_add(grown),
                    Ordering::Release,
                );
                return HealthEvent::ProbeFailed;
            }
            return HealthEvent::Unchanged;
        }
        if n >= policy.demote_after {
            // Schedule the probe before the flag is visible, so nobody sees
            // a demoted provider with a stale probe time.
            let cooldown = nanos(policy.cooldown);
            self.cooldown.store(cooldown, Ordering::Release);
            self.next_probe.store(
                self.since_origin(now).saturating_add(cooldown),
                Ordering::Release,
            );
            if self
                .demoted
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.demotions.fetch_add(1, Ordering::Relaxed);
                return HealthEvent::Demoted;
            }
        }
        HealthEvent::Unchanged
    }

    /// Records a success: resets the count and restores a demoted provider.
    #[inline]
    pub(crate) fn on_success(&self) -> HealthEvent {
        // Read first: the common case writes nothing, keeping the cache
        // line shared between cores.
        if self.consecutive.load(Ordering::Acquire) != 0 {
            self.consecutive.store(0, Ordering::Release);
        }
        if self.demoted.load(Ordering::Acquire)
            && self
                .demoted
                .compare_exchange(true, false, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.recoveries.fetch_add(1, Ordering::Relaxed);
            return HealthEvent::Recovered;
        }
        HealthEvent::Unchanged
    }

    /// Claims the probe slot if the provider is demoted and its cool-down
    /// has passed. At most one probe is in flight per provider.
    pub(crate) fn try_start_probe(&self, now: Moment) -> bool {
        self.is_demoted()
            && self.since_origin(now) >= self.next_probe.load(Ordering::Acquire)
            && self
                .probing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Releases the probe slot.
    pub(crate) fn end_probe(&self) {
        self.probing.store(false, Ordering::Release);
    }

    pub(crate) fn snapshot(&self, now: Moment) -> HealthSnapshot {
        let demoted = self.is_demoted();
        let next_probe_in = demoted.then(|| {
            let due = self.next_probe.load(Ordering::Acquire);
            Duration::from_nanos(due.saturating_sub(self.since_origin(now)))
        });
        HealthSnapshot {
            consecutive_failures: self.consecutive.load(Ordering::Acquire),
            demoted,
            next_probe_in,
            demotions: self.demotions.load(Ordering::Relaxed),
            recoveries: self.recoveries.load(Ordering::Relaxed),
        }
    }

    #[cfg(test)]
    pub(crate) fn probing(&self) -> bool {
        self.probing.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> HealthPolicy {
        HealthPolicy {
            demote_after: 3,
            cooldown: Duration::from_secs(30),
            max_cooldown: Duration::from_secs(100),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn demotes_at_threshold_and_success_recovers() {
        let h = ProviderHealth::new();
        let p = policy();
        let now = Moment::now();
        assert_eq!(h.on_failure(now, &p, false), HealthEvent::Unchanged);
        assert_eq!(h.on_failure(now, &p, false), HealthEvent::Unchanged);
        assert_eq!(h.on_failure(now, &p, false), HealthEvent::Demoted);
        assert!(h.is_demoted());
        assert_eq!(h.on_failure(now, &p, false), HealthEvent::Unchanged);
        assert_eq!(h.snapshot(now).consecutive_failures, 4);
        assert_eq!(h.on_success(), HealthEvent::Recovered);
        let s = h.snapshot(now);
        assert!(!s.demoted);
        assert_eq!(
            (s.consecutive_failures, s.demotions, s.recoveries),
            (0, 1, 1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn probe_waits_for_cooldown_and_failed_probes_double_it() {
        let h = ProviderHealth::new();
        let p = policy();
        let t0 = Moment::now();
        for _ in 0..3 {
            h.on_failure(t0, &p, false);
        }
        assert!(!h.try_start_probe(t0 + Duration::from_secs(29)));
        let t1 = t0 + Duration::from_secs(30);
        assert!(h.try_start_probe(t1));
        assert!(!h.try_start_probe(t1), "one probe at a time");
        assert_eq!(h.on_failure(t1, &p, true), HealthEvent::ProbeFailed);
        h.end_probe();
        assert_eq!(h.snapshot(t1).next_probe_in, Some(Duration::from_secs(60)));
        assert!(!h.try_start_probe(t1 + Duration::from_secs(59)));
        let t2 = t1 + Duration::from_secs(60);
        assert!(h.try_start_probe(t2));
        h.on_failure(t2, &p, true);
        h.end_probe();
        // 120 s capped at 100 s
        assert_eq!(h.snapshot(t2).next_probe_in, Some(Duration::from_secs(100)));
    }
}
