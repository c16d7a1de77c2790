//! Recent per-provider statistics, for decisions and for a gateway's own use.
//!
//! Each route (model x provider) keeps the latency of successful attempts
//! and attempt counts by result over a sliding window of six 10 s slots,
//! so "recent" means the last minute. The latency recorded is the time
//! until the operation returned: for an HTTP upstream, the time to
//! response headers. Failed attempts are counted but their latency is not
//! recorded: a refused connect is fast and a timed-out one lasts exactly
//! its limit, and neither says how long a good answer takes (an adaptive
//! limit fed with its own cuts would only ever grow).
//!
//! Adaptive decisions read `RouteStats::recent_latency`: a p50/p99 cached
//! in atomics and recomputed at most once per [`REFRESH`] by whichever
//! request finds it stale, so the request path never merges histograms.
//!
//! # A sample is one atomic add
//!
//! A slot's latency counters are laid out exactly as an `hdrhistogram`
//! with bounds 1 us ..= 600 s and two significant digits lays out its own
//! (one bucket per 1% of a value), but as atomics: recording a success is finding its
//! bucket (a shift and a leading-zero count) and one relaxed `fetch_add`;
//! a failure is one `fetch_add` on its cause's counter, and the success
//! count is the latency counters' total. A snapshot (once per [`REFRESH`]
//! for the adaptive decisions, or when an application asks) folds the live
//! slots into an `hdrhistogram` with that same layout, which gives the
//! percentiles: the same figures, to the microsecond, as recording into
//! the `hdrhistogram` itself, without its mutex and its bookkeeping on
//! every request (a lock and an unlock, two locked operations, and ~170
//! instructions per success; docs/benchmarks.md).
//!
//! Two shards per route, each on cache lines of its own, take a thread's
//! samples by its stripe (`crate::stripe`), so two cores recording for
//! the same provider do not pass one line back and forth.
//!
//! A slot is reused every minute: the first sample of its new 10 s finds
//! it stale, claims it, zeroes it and publishes the new epoch. A sample
//! another thread records during those few microseconds is dropped (it
//! finds the slot claimed), as is one that ends more than 50 s after its
//! slot's epoch began; a snapshot leaves out a slot that changed epoch
//! while it was being read.
//!
//! # Bounded memory
//!
//! Every counter is allocated when the pool is built: 2,960 `u32`
//! latency counters per slot (11.6 KiB; the hdrhistogram layout's buckets
//! up to 600 s), 2 shards x 6 slots of them per route: **139 KiB per
//! provider and model**, constant from start to end. Latencies outside
//! the bounds are clamped; a counter
//! wraps only after 2^32 samples in one 10 s slot of one shard (430 M a
//! second), which no provider sees.

pub use crate::health::HealthSnapshot;
pub use crate::pool::{GateSnapshot, ProviderStats, ShadowCounts};

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::Moment;
use crate::stripe::Padded;
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
/// Significant digits of the latency buckets.
const DIGITS: u8 = 2;
/// Log2 of the buckets per binade, past the first: 2 digits of a value
/// need 200 distinct steps, so 256 sub-buckets, of which the upper half
/// is new in each binade (hdrhistogram's `sub_bucket_half_count`).
const HALF_MAGNITUDE: u32 = 7;
/// Latency buckets per slot: every bucket up to [`MAX_MICROS`]'s.
const BUCKETS: usize = bucket_of(MAX_MICROS) + 1;
/// A slot's epoch while the thread that claimed it zeroes it.
const TURNING: u64 = u64::MAX - 1;
/// A slot's epoch before its first sample.
const NEVER: u64 = u64::MAX;

/// How often the cached percentiles are recomputed.
pub const REFRESH: Duration = Duration::from_secs(1);

/// The window statistics exposes: 6 slots of 10 s.
pub const WINDOW: Duration = Duration::from_secs(SLOTS as u64 * SLOT.as_secs());

/// An hdrhistogram with the buckets' layout, which a snapshot fills.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, DIGITS)
        .unwrap_or_else(|e| unreachable!("constant histogram bounds are valid: {e}"))
}

/// The bucket of `micros` (in `1..=MAX_MICROS`), where hdrhistogram puts
/// it: the binade's index from the leading zeros, the position in it from
/// a shift.
#[inline]
const fn bucket_of(micros: u64) -> usize {
    let binade = 64 - (HALF_MAGNITUDE + 1) - (micros | 0xff).leading_zeros();
    let sub = micros >> binade;
    (((binade + 1) as u64) << HALF_MAGNITUDE) as usize + sub as usize - (1 << HALF_MAGNITUDE)
}

/// The lowest value of `bucket`: what a snapshot records for it.
fn lowest_of(bucket: usize) -> u64 {
    let binade = (bucket >> HALF_MAGNITUDE) as u32;
    let sub = (bucket & ((1 << HALF_MAGNITUDE) - 1)) as u64;
    match binade {
        0 => sub,
        b => (sub + (1 << HALF_MAGNITUDE)) << (b - 1),
    }
}

/// The index of an attempt's result in the counters: 0 is success.
#[inline]
pub(crate) fn result_index(cause: Option<Cause>) -> usize {
    match cause {
        None => 0,
        Some(c) => 1 + Cause::ALL.iter().position(|&x| x == c).unwrap_or(0),
    }
}

/// One 10 s slot of one shard.
#[derive(Debug)]
struct Slot {
    /// Which 10 s since the route's origin it counts ([`NEVER`],
    /// [`TURNING`]).
    epoch: AtomicU64,
    /// Failed attempts by cause, in [`Cause::ALL`] order.
    failures: [AtomicU32; Cause::ALL.len()],
    /// Successful attempts by latency bucket.
    latency: Box<[AtomicU32]>,
}

impl Slot {
    fn new() -> Self {
        Slot {
            epoch: AtomicU64::new(NEVER),
            failures: std::array::from_fn(|_| AtomicU32::new(0)),
            latency: (0..BUCKETS).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    /// Claims the slot for `epoch` and zeroes it, unless another thread
    /// is doing so or has moved it on already (the sample is dropped).
    #[cold]
    #[inline(never)]
    fn turn(&self, seen: u64, epoch: u64) -> Option<&Slot> {
        if seen == TURNING || (seen != NEVER && seen > epoch) {
            return None;
        }
        if let Err(now) =
            self.epoch
                .compare_exchange(seen, TURNING, Ordering::Acquire, Ordering::Acquire)
        {
            return (now == epoch).then_some(self);
        }
        for c in self.failures.iter().chain(self.latency.iter()) {
            c.store(0, Ordering::Relaxed);
        }
        // Release: a thread that sees the epoch sees the zeroes.
        self.epoch.store(epoch, Ordering::Release);
        Some(self)
    }
}

/// Windowed statistics of one route.
#[derive(Debug)]
pub(crate) struct RouteStats {
    origin: Moment,
    shards: [Padded<[Slot; SLOTS]>; SHARDS],
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
            shards: std::array::from_fn(|_| Padded(std::array::from_fn(|_| Slot::new()))),
            cached_p50: AtomicU64::new(0),
            cached_p99: AtomicU64::new(0),
            cached_samples: AtomicU64::new(0),
            cached_at: AtomicU64::new(u64::MAX),
        }
    }

    fn epoch(&self, now: Moment) -> u64 {
        now.nanos_since(self.origin) / SLOT.as_nanos() as u64
    }

    /// Records one attempt that ended at `now` after `elapsed` nanoseconds,
    /// with its
    /// cause (`None` for a success).
    #[inline]
    pub(crate) fn record(&self, now: Moment, elapsed: u64, cause: Option<Cause>) {
        let epoch = self.epoch(now);
        let Padded(slots) = &self.shards[crate::stripe::index() % SHARDS];
        let slot = &slots[(epoch % SLOTS as u64) as usize];
        let seen = slot.epoch.load(Ordering::Acquire);
        let Some(slot) = (if seen == epoch {
            Some(slot)
        } else {
            slot.turn(seen, epoch)
        }) else {
            return;
        };
        let counter = match cause {
            // Only a success's latency is recorded: a failure does not
            // convert its duration.
            None => {
                let micros = (elapsed / 1_000).clamp(1, MAX_MICROS);
                &slot.latency[bucket_of(micros)]
            }
            Some(c) => &slot.failures[result_index(Some(c)) - 1],
        };
        counter.fetch_add(1, Ordering::Relaxed);
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

    /// Folds the live slots of every shard.
    pub(crate) fn snapshot(&self, now: Moment) -> WindowStats {
        let epoch = self.epoch(now);
        let mut latency = vec![0u64; BUCKETS];
        let mut failures = [0u64; Cause::ALL.len()];
        let mut read = vec![0u32; BUCKETS];
        for Padded(slots) in &self.shards {
            for slot in slots {
                let e = slot.epoch.load(Ordering::Acquire);
                if e > epoch || epoch - e >= SLOTS as u64 {
                    continue;
                }
                for (r, c) in read.iter_mut().zip(slot.latency.iter()) {
                    *r = c.load(Ordering::Relaxed);
                }
                let failed = slot.failures.each_ref().map(|c| c.load(Ordering::Relaxed));
                // Reused while being read: its counts are no longer the
                // window's.
                std::sync::atomic::fence(Ordering::Acquire);
                if slot.epoch.load(Ordering::Relaxed) != e {
                    continue;
                }
                for (sum, n) in latency.iter_mut().zip(&read) {
                    *sum += u64::from(*n);
                }
                for (sum, n) in failures.iter_mut().zip(failed) {
                    *sum += u64::from(n);
                }
            }
        }
        let mut histogram = new_histogram();
        for (bucket, n) in latency.iter().enumerate().filter(|(_, n)| **n > 0) {
            histogram.saturating_record_n(lowest_of(bucket), *n);
        }
        let successes = histogram.len();
        let q =
            |p: f64| (successes > 0).then(|| Duration::from_micros(histogram.value_at_quantile(p)));
        WindowStats {
            attempts: successes + failures.iter().sum::<u64>(),
            successes,
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            failures: Cause::ALL
                .iter()
                .zip(failures)
                .filter(|(_, n)| *n > 0)
                .map(|(c, n)| (*c, n))
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
            s.record(now, crate::clock::nanos(Duration::from_millis(ms)), None);
        }
        s.record(
            now,
            crate::clock::nanos(Duration::from_millis(5)),
            Some(Cause::Reset),
        );
        s.record(
            now,
            crate::clock::nanos(Duration::from_millis(5)),
            Some(Cause::Reset),
        );
        s.record(
            now,
            crate::clock::nanos(Duration::from_secs(5000)),
            Some(Cause::ResponseTimeout),
        );
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
        s.record(t0, crate::clock::nanos(Duration::from_millis(10)), None);
        assert_eq!(s.snapshot(t0 + Duration::from_secs(59)).attempts, 1);
        assert_eq!(s.snapshot(t0 + Duration::from_secs(60)).attempts, 0);
        // a slot reused after a full turn starts empty
        s.record(
            t0 + Duration::from_secs(60),
            crate::clock::nanos(Duration::from_millis(20)),
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
            s.record(t0, crate::clock::nanos(Duration::from_millis(100)), None);
        }
        assert_eq!(s.recent_latency(t0, 20), None, "10 samples < 20");
        for _ in 0..10 {
            s.record(t0, crate::clock::nanos(Duration::from_millis(300)), None);
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
    fn buckets_are_laid_out_as_hdrhistogram_lays_out_its_own() {
        let h = new_histogram();
        assert_eq!(BUCKETS, 2_960);
        let mut values: Vec<u64> = (1..=70_000).collect();
        values.extend((0..64).flat_map(|s| [1u64 << s, (1u64 << s) - 1, (1u64 << s) + 1]));
        values.extend((1..=10_000u64).map(|k| k * 59_999 + 7));
        values.push(MAX_MICROS);
        for v in values.into_iter().filter(|v| (1..=MAX_MICROS).contains(v)) {
            let b = bucket_of(v);
            assert!(b < BUCKETS, "{v}");
            assert_eq!(lowest_of(b), h.lowest_equivalent(v), "{v}");
        }
        // Consecutive buckets are consecutive ranges.
        for b in 1..BUCKETS {
            assert!(lowest_of(b) > lowest_of(b - 1), "{b}");
            assert_eq!(bucket_of(lowest_of(b)), b);
            assert_eq!(bucket_of(lowest_of(b) - 1), b - 1);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn percentiles_match_an_hdrhistogram_fed_the_same_samples() {
        let s = RouteStats::new();
        let now = Moment::now();
        let mut h = new_histogram();
        let mut x = 12_345u64;
        for _ in 0..20_000 {
            // A spread from microseconds to minutes.
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let micros = 1 + (x >> 33) % (1 << (1 + (x >> 59) % 30));
            s.record(
                now,
                crate::clock::nanos(Duration::from_micros(micros)),
                None,
            );
            h.saturating_record(micros.min(MAX_MICROS));
        }
        let w = s.snapshot(now);
        assert_eq!(w.successes, 20_000);
        for (got, q) in [(w.p50, 0.5), (w.p90, 0.9), (w.p99, 0.99)] {
            assert_eq!(
                got,
                Some(Duration::from_micros(h.value_at_quantile(q))),
                "{q}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_sample_or_one_racing_a_reset_is_dropped() {
        let s = RouteStats::new();
        let t0 = Moment::now();
        let t60 = t0 + Duration::from_secs(60);
        s.record(t60, crate::clock::nanos(Duration::from_millis(10)), None);
        // Ended 60 s earlier, in the slot now counting t60's 10 s: its
        // count would land in the wrong epoch.
        s.record(
            t0,
            crate::clock::nanos(Duration::from_millis(10)),
            Some(Cause::Reset),
        );
        let w = s.snapshot(t60);
        assert_eq!((w.attempts, w.successes), (1, 1));
        assert!(w.failures.is_empty());
        // A slot another thread is zeroing takes no sample.
        let slot = &s.shards[crate::stripe::index() % SHARDS].0[1];
        slot.epoch.store(TURNING, Ordering::Relaxed);
        s.record(
            t0 + Duration::from_secs(70),
            crate::clock::nanos(Duration::from_millis(10)),
            None,
        );
        assert_eq!(
            slot.latency
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .sum::<u32>(),
            0
        );
        // and a snapshot skips it.
        slot.latency[bucket_of(10_000)].store(5, Ordering::Relaxed);
        assert_eq!(s.snapshot(t0 + Duration::from_secs(70)).attempts, 1);
        // Once that thread is done (here: it left an old epoch), the slot
        // counts again, from zero.
        slot.epoch.store(0, Ordering::Relaxed);
        s.record(
            t0 + Duration::from_secs(70),
            crate::clock::nanos(Duration::from_millis(10)),
            None,
        );
        let w = s.snapshot(t0 + Duration::from_secs(70));
        assert_eq!((w.attempts, w.successes), (2, 2), "{w:?}");
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
                        s.record(now, crate::clock::nanos(Duration::from_micros(300)), None);
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
