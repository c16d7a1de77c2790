//! Recent per-provider statistics, for decisions and for a gateway's own use.
//!
//! Each route (model x provider) keeps the latency of successful attempts
//! in `hdrhistogram`s and attempt counts by result over a sliding window of
//! six 10 s slots, so "recent" means the last minute. The latency recorded
//! is the time until the operation returned: for an HTTP upstream, the time
//! to response headers. Failed attempts are counted but their latency is
//! not recorded: a refused connect is fast and a timed-out one lasts exactly
//! its limit, and neither says how long a good answer takes (an adaptive
//! limit fed with its own cuts would only ever grow).
//!
//! Adaptive decisions read `RouteStats::recent_latency`: a p50/p99 cached
//! in atomics and recomputed at most once per [`REFRESH`] by whichever
//! request finds it stale, so the request path never merges histograms.
//!
//! # Bounded memory
//!
//! Every histogram is allocated when the pool is built, with fixed bounds
//! (1 us ..= 600 s, two significant digits: 3,072 `u32` counters, 12 KiB)
//! and recorded with `saturating_record`; values outside the bounds are
//! clamped. A route holds 2 shards x 6 slots of them: **144 KiB per
//! provider and model**, constant from start to end; nothing grows on the
//! request path.
//!
//! # No serialising lock
//!
//! A route's state is split into two shards, each behind its own mutex and
//! on its own cache line. A recording thread tries its preferred shard and,
//! if another thread holds it, the other one (`try_lock`), so two threads
//! recording for the same provider at once never wait for each other. A
//! snapshot merges the shards.

pub use crate::health::HealthSnapshot;
pub use crate::pool::{GateSnapshot, ProviderStats, ShadowCounts};

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::Moment;
use hdrhistogram::Histogram;

use crate::classify::Cause;

/// Slots in the window.
const SLOTS: usize = 6;
/// Length of one slot.
const SLOT: Duration = Duration::from_secs(10);
/// Independent recording shards per route.
const SHARDS: usize = 2;
/// Highest latency recorded, in microseconds (600 s); longer is clamped.
const MAX_MICROS: u64 = 600_000_000;
/// Results counted: success, then every [`Cause`].
const RESULTS: usize = 1 + Cause::ALL.len();

/// How often the cached percentiles are recomputed.
pub const REFRESH: Duration = Duration::from_secs(1);

/// The window statistics exposes: 6 slots of 10 s.
pub const WINDOW: Duration = Duration::from_secs(SLOTS as u64 * SLOT.as_secs());

fn new_histogram() -> Histogram<u32> {
    Histogram::new_with_bounds(1, MAX_MICROS, 2)
        .unwrap_or_else(|e| unreachable!("constant histogram bounds are valid: {e}"))
}

/// The index of an attempt's result in the counters: 0 is success.
pub(crate) fn result_index(cause: Option<Cause>) -> usize {
    match cause {
        None => 0,
        Some(c) => 1 + Cause::ALL.iter().position(|&x| x == c).unwrap_or(0),
    }
}

#[derive(Debug)]
struct Slot {
    epoch: u64,
    latency: Histogram<u32>,
    counts: [u32; RESULTS],
}

impl Slot {
    fn new() -> Self {
        Slot {
            epoch: u64::MAX,
            latency: new_histogram(),
            counts: [0; RESULTS],
        }
    }
}

#[derive(Debug)]
#[repr(align(128))]
struct Shard(Mutex<[Slot; SLOTS]>);

/// Windowed statistics of one route.
#[derive(Debug)]
pub(crate) struct RouteStats {
    origin: Moment,
    shards: [Shard; SHARDS],
    /// Cached percentiles (microseconds) and sample count, and when they
    /// were computed (nanoseconds since `origin`; `u64::MAX`: never).
    cached_p50: AtomicU64,
    cached_p99: AtomicU64,
    cached_samples: AtomicU64,
    cached_at: AtomicU64,
}

impl RouteStats {
    pub(crate) fn new() -> Self {
        RouteStats {
            origin: Moment::now(),
            shards: std::array::from_fn(|_| {
                Shard(Mutex::new(std::array::from_fn(|_| Slot::new())))
            }),
            cached_p50: AtomicU64::new(0),
            cached_p99: AtomicU64::new(0),
            cached_samples: AtomicU64::new(0),
            cached_at: AtomicU64::new(u64::MAX),
        }
    }

    fn epoch(&self, now: Moment) -> u64 {
        now.nanos_since(self.origin) / SLOT.as_nanos() as u64
    }

    /// Records one attempt that ended at `now` after `elapsed`, with its
    /// cause (`None` for a success).
    pub(crate) fn record(&self, now: Moment, elapsed: Duration, cause: Option<Cause>) {
        let epoch = self.epoch(now);
        let result = result_index(cause);
        let first = crate::stripe::index() % SHARDS;
        let mut guard = None;
        for k in 0..SHARDS {
            if let Ok(g) = self.shards[(first + k) % SHARDS].0.try_lock() {
                guard = Some(g);
                break;
            }
        }
        let mut slots = match guard {
            Some(g) => g,
            None => match self.shards[first].0.lock() {
                Ok(g) => g,
                // A panic while recording cannot leave a slot half-written
                // in a way that matters: keep counting.
                Err(poisoned) => poisoned.into_inner(),
            },
        };
        let slot = &mut slots[(epoch % SLOTS as u64) as usize];
        if slot.epoch != epoch {
            slot.epoch = epoch;
            slot.latency.reset();
            slot.counts = [0; RESULTS];
        }
        if cause.is_none() {
            // Only a success's latency is recorded: a failure does not
            // convert its duration.
            let micros = (elapsed.as_micros() as u64).clamp(1, MAX_MICROS);
            slot.latency.saturating_record(micros);
        }
        slot.counts[result] = slot.counts[result].saturating_add(1);
    }

    /// Recent p50 and p99 of successful attempts, if at least `min_samples`
    /// succeeded in the window. Recomputed at most once per [`REFRESH`].
    pub(crate) fn recent_latency(
        &self,
        now: Moment,
        min_samples: u32,
    ) -> Option<(Duration, Duration)> {
        let at = now.nanos_since(self.origin);
        let last = self.cached_at.load(Ordering::Acquire);
        let stale = last == u64::MAX || at.saturating_sub(last) >= REFRESH.as_nanos() as u64;
        if stale
            && self
                .cached_at
                .compare_exchange(last, at, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            let w = self.snapshot(now);
            let micros = |d: Option<Duration>| d.map_or(0, |d| d.as_micros() as u64);
            self.cached_p50.store(micros(w.p50), Ordering::Release);
            self.cached_p99.store(micros(w.p99), Ordering::Release);
            self.cached_samples.store(w.successes, Ordering::Release);
        }
        if self.cached_samples.load(Ordering::Acquire) < u64::from(min_samples) {
            return None;
        }
        Some((
            Duration::from_micros(self.cached_p50.load(Ordering::Acquire)),
            Duration::from_micros(self.cached_p99.load(Ordering::Acquire)),
        ))
    }

    /// Merges the live slots of every shard.
    pub(crate) fn snapshot(&self, now: Moment) -> WindowStats {
        let epoch = self.epoch(now);
        let mut latency = new_histogram();
        let mut counts = [0u64; RESULTS];
        for shard in &self.shards {
            let slots = match shard.0.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            for slot in slots.iter() {
                if slot.epoch <= epoch && epoch - slot.epoch < SLOTS as u64 {
                    // Same bounds on both sides: adding cannot fail.
                    let _ = latency.add(&slot.latency);
                    for (sum, n) in counts.iter_mut().zip(slot.counts) {
                        *sum += u64::from(n);
                    }
                }
            }
        }
        let q = |p: f64| {
            (!latency.is_empty()).then(|| Duration::from_micros(latency.value_at_quantile(p)))
        };
        WindowStats {
            attempts: counts.iter().sum(),
            successes: counts[0],
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            failures: Cause::ALL
                .iter()
                .zip(&counts[1..])
                .filter(|(_, n)| **n > 0)
                .map(|(c, n)| (*c, *n))
                .collect(),
        }
    }
}

/// A route's attempts over the last [`WINDOW`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WindowStats {
    /// Attempts that ended in the window.
    pub attempts: u64,
    /// Of which succeeded.
    pub successes: u64,
    /// Median latency of successful attempts (time to response headers).
    pub p50: Option<Duration>,
    /// 90th percentile latency of successful attempts.
    pub p90: Option<Duration>,
    /// 99th percentile latency of successful attempts.
    pub p99: Option<Duration>,
    /// Failed attempts by cause (only causes seen).
    pub failures: Vec<(Cause, u64)>,
}

impl WindowStats {
    /// Failed attempts / attempts, 0 when there were none.
    pub fn error_rate(&self) -> f64 {
        if self.attempts == 0 {
            0.0
        } else {
            (self.attempts - self.successes) as f64 / self.attempts as f64
        }
    }

    /// Share of attempts that failed with `cause`.
    pub fn rate_of(&self, cause: Cause) -> f64 {
        if self.attempts == 0 {
            return 0.0;
        }
        let n = self
            .failures
            .iter()
            .find(|(c, _)| *c == cause)
            .map_or(0, |(_, n)| *n);
        n as f64 / self.attempts as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn percentiles_and_counts_over_the_window() {
        let s = RouteStats::new();
        let now = Moment::now();
        for ms in 1..=100u64 {
            s.record(now, Duration::from_millis(ms), None);
        }
        s.record(now, Duration::from_millis(5), Some(Cause::Reset));
        s.record(now, Duration::from_millis(5), Some(Cause::Reset));
        s.record(now, Duration::from_secs(5000), Some(Cause::ResponseTimeout));
        let w = s.snapshot(now);
        // failures are counted, but only successes shape the latency
        assert_eq!(w.p99.unwrap().as_millis(), 99);
        assert_eq!((w.attempts, w.successes), (103, 100));
        let p50 = w.p50.unwrap().as_millis();
        assert!((49..=52).contains(&p50), "{p50}");
        assert!(w.p99.unwrap() >= Duration::from_millis(99));
        assert_eq!(
            w.failures,
            vec![(Cause::Reset, 2), (Cause::ResponseTimeout, 1)]
        );
        assert!((w.rate_of(Cause::Reset) - 2.0 / 103.0).abs() < 1e-9);
    }

    #[tokio::test(start_paused = true)]
    async fn old_slots_fall_out_of_the_window() {
        let s = RouteStats::new();
        let t0 = Moment::now();
        s.record(t0, Duration::from_millis(10), None);
        assert_eq!(s.snapshot(t0 + Duration::from_secs(59)).attempts, 1);
        assert_eq!(s.snapshot(t0 + Duration::from_secs(60)).attempts, 0);
        // a slot reused after a full turn starts empty
        s.record(
            t0 + Duration::from_secs(60),
            Duration::from_millis(20),
            None,
        );
        let w = s.snapshot(t0 + Duration::from_secs(60));
        assert_eq!(w.attempts, 1);
        assert_eq!(w.p50.unwrap().as_millis(), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn recent_latency_is_cached_and_needs_enough_samples() {
        let s = RouteStats::new();
        let t0 = Moment::now();
        for _ in 0..10 {
            s.record(t0, Duration::from_millis(100), None);
        }
        assert_eq!(s.recent_latency(t0, 20), None, "10 samples < 20");
        for _ in 0..10 {
            s.record(t0, Duration::from_millis(300), None);
        }
        // cached for a second: still the old answer
        assert_eq!(s.recent_latency(t0 + Duration::from_millis(500), 20), None);
        let t1 = t0 + REFRESH;
        let (p50, p99) = s.recent_latency(t1, 20).unwrap();
        // two significant digits: within 1%
        assert_eq!(p50.as_millis(), 100);
        assert!((300..=303).contains(&p99.as_millis()), "{p99:?}");
    }

    #[test]
    fn two_threads_record_without_losing_counts() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let _g = rt.enter();
        let s = std::sync::Arc::new(RouteStats::new());
        let now = Moment::now();
        let hs: Vec<_> = (0..2)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        s.record(now, Duration::from_micros(300), None);
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(s.snapshot(now).attempts, 20_000);
    }
}
