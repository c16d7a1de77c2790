//! How long a provider's transient failures last: the data behind
//! `delay = "auto"`.
//!
//! A *recovery* starts at a route's first transient failure after a
//! success and ends at its next success, whichever request either belongs
//! to. Its length is recorded once, weighted by the transient failures it
//! contained: a quantile of these is "a wait that would have covered the
//! failures of 90% of the failed attempts". Weighting matters: under load,
//! one-off 502s end at the next request (a few ms) while a reload or a
//! restart fails hundreds of attempts over a second or more; counted per
//! recovery, the one-offs would outvote the outages that retries are for.
//!
//! The length is measured from the first failure, so it covers the failure
//! that needed the longest wait: the learned delay is conservative for
//! attempts that failed late in a recovery. Traffic measures recoveries:
//! with only a retry after each failure (low traffic), a recovery ends no
//! sooner than the retry that saw it end, so the learned delay stays at
//! the delay in use until other traffic shows a faster recovery; it never
//! grows without failed retries.
//!
//! Memory is bounded: five one-minute slots of one histogram each (1 ms ..=
//! 10 min, two significant digits: 1,792 `u32` counters, 7 KiB), 35 KiB
//! per provider and model, allocated when the route is built. The
//! quantile read on the retry path is cached for [`REFRESH`].

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::Moment;
use hdrhistogram::Histogram;

use crate::stats::REFRESH;

/// Slots in the window.
const SLOTS: usize = 5;
/// Length of one slot: recoveries are rare, so the window is five minutes.
const SLOT: Duration = Duration::from_secs(60);
/// Longest recovery recorded, in milliseconds; longer is clamped.
const MAX_MILLIS: u64 = 600_000;

/// The window of recoveries a learned delay is computed from.
#[cfg(test)]
const WINDOW: Duration = Duration::from_secs(SLOTS as u64 * SLOT.as_secs());

#[derive(Debug)]
struct Slot {
    epoch: u64,
    millis: Histogram<u32>,
}

/// Recent recoveries of one route.
#[derive(Debug)]
pub(crate) struct RecoveryStats {
    origin: Moment,
    /// When the current recovery started (nanoseconds since `origin`, plus
    /// one); 0 while the route is not failing.
    failing_since: AtomicU64,
    /// Transient failures in the current recovery.
    failures: AtomicU64,
    slots: Mutex<[Slot; SLOTS]>,
    /// Cached quantile (microseconds), its sample count, the quantile it
    /// is for (`f64` bits), and when it was computed (nanoseconds since
    /// `origin`; `u64::MAX`: never).
    cached_value: AtomicU64,
    cached_samples: AtomicU64,
    cached_q: AtomicU64,
    cached_at: AtomicU64,
}

impl RecoveryStats {
    pub(crate) fn new() -> Self {
        RecoveryStats {
            origin: Moment::now(),
            failing_since: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            slots: Mutex::new(std::array::from_fn(|_| Slot {
                epoch: u64::MAX,
                millis: Histogram::new_with_bounds(1, MAX_MILLIS, 2)
                    .unwrap_or_else(|e| unreachable!("constant histogram bounds are valid: {e}")),
            })),
            cached_value: AtomicU64::new(0),
            cached_samples: AtomicU64::new(0),
            cached_q: AtomicU64::new(0),
            cached_at: AtomicU64::new(u64::MAX),
        }
    }

    fn nanos(&self, now: Moment) -> u64 {
        now.nanos_since(self.origin)
    }

    /// A transient failure ended at `now`.
    pub(crate) fn on_failure(&self, now: Moment) {
        let at = self.nanos(now).saturating_add(1);
        let _ = self
            .failing_since
            .compare_exchange(0, at, Ordering::AcqRel, Ordering::Relaxed);
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// A success ended at `now`: ends the recovery in progress, if any.
    pub(crate) fn on_success(&self, now: Moment) {
        if self.failing_since.load(Ordering::Relaxed) == 0 {
            return;
        }
        let since = self.failing_since.swap(0, Ordering::AcqRel);
        if since == 0 {
            return;
        }
        let failures =
            u32::try_from(self.failures.swap(0, Ordering::Relaxed).max(1)).unwrap_or(u32::MAX);
        let at = self.nanos(now);
        let millis = (at.saturating_sub(since - 1) / 1_000_000).clamp(1, MAX_MILLIS);
        let epoch = at / SLOT.as_nanos() as u64;
        let mut slots = match self.slots.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let slot = &mut slots[(epoch % SLOTS as u64) as usize];
        if slot.epoch != epoch {
            slot.epoch = epoch;
            slot.millis.reset();
        }
        slot.millis.saturating_record_n(millis, failures);
    }

    /// The `q` quantile of the recoveries in the window, weighted by their
    /// failures, if at least `min_samples` failures were recorded.
    /// Recomputed at most once per [`REFRESH`] (or when `q` changes).
    pub(crate) fn quantile(&self, now: Moment, q: f64, min_samples: u32) -> Option<Duration> {
        let at = self.nanos(now);
        let last = self.cached_at.load(Ordering::Acquire);
        let stale = last == u64::MAX
            || at.saturating_sub(last) >= REFRESH.as_nanos() as u64
            || self.cached_q.load(Ordering::Acquire) != q.to_bits();
        if stale
            && self
                .cached_at
                .compare_exchange(last, at, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            let (value, samples) = self.compute(at, q);
            self.cached_value.store(value, Ordering::Release);
            self.cached_samples.store(samples, Ordering::Release);
            self.cached_q.store(q.to_bits(), Ordering::Release);
        }
        if self.cached_samples.load(Ordering::Acquire) < u64::from(min_samples) {
            return None;
        }
        Some(Duration::from_micros(
            self.cached_value.load(Ordering::Acquire),
        ))
    }

    /// (quantile in microseconds, samples) over the live slots.
    fn compute(&self, at: u64, q: f64) -> (u64, u64) {
        let epoch = at / SLOT.as_nanos() as u64;
        let mut merged = match Histogram::<u32>::new_with_bounds(1, MAX_MILLIS, 2) {
            Ok(h) => h,
            Err(_) => return (0, 0),
        };
        let slots = match self.slots.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        for slot in slots.iter() {
            if slot.epoch <= epoch && epoch - slot.epoch < SLOTS as u64 {
                // Same bounds on both sides: adding cannot fail.
                let _ = merged.add(&slot.millis);
            }
        }
        if merged.is_empty() {
            return (0, 0);
        }
        (
            merged.value_at_quantile(q).saturating_mul(1000),
            merged.len(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn recoveries_are_weighted_by_their_failures() {
        let r = RecoveryStats::new();
        let t0 = Moment::now();
        // ten one-off failures that end 5 ms later
        for k in 0..10u64 {
            let t = t0 + Duration::from_secs(k);
            r.on_failure(t);
            r.on_success(t + Duration::from_millis(5));
        }
        // one outage of 1.5 s with 30 failed attempts
        let t = t0 + Duration::from_secs(20);
        for k in 0..30u64 {
            r.on_failure(t + Duration::from_millis(50 * k));
        }
        r.on_success(t + Duration::from_millis(1500));
        let now = t + Duration::from_secs(2);
        assert_eq!(r.quantile(now, 0.9, 41), None, "40 failures recorded");
        let p90 = r.quantile(now, 0.9, 40).unwrap();
        // two significant digits
        assert!((1490..=1510).contains(&p90.as_millis()), "{p90:?}");
        // cached for a second (for the same quantile)
        r.on_failure(now);
        r.on_success(now + Duration::from_millis(1));
        assert_eq!(r.quantile(now, 0.9, 41), None);
        // another quantile is computed afresh: 41 failures now
        assert_eq!(r.quantile(now, 0.2, 41).map(|d| d.as_millis()), Some(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_without_failures_records_nothing_and_old_ones_expire() {
        let r = RecoveryStats::new();
        let t0 = Moment::now();
        r.on_success(t0);
        assert_eq!(r.quantile(t0, 0.9, 1), None);
        r.on_failure(t0);
        r.on_success(t0 + Duration::from_millis(700));
        let learned = r.quantile(t0 + REFRESH, 0.9, 1).unwrap();
        // two significant digits
        assert!((700..=704).contains(&learned.as_millis()), "{learned:?}");
        assert_eq!(r.quantile(t0 + WINDOW, 0.9, 1), None, "out of the window");
    }
}
