//! The pool's clock: the CPU's time-stamp counter where it can be, tokio's
//! clock where it must be.
//!
//! A request reads the clock when it starts and when each attempt ends.
//! `tokio::time::Instant::now()` is `clock_gettime(CLOCK_MONOTONIC)`: about
//! 27 ns on the virtual machines gateways run on (40 ns with tokio's
//! `test-util`, which checks for a paused clock first), two readings a
//! seventh of the success path. The time-stamp counter, read and scaled by
//! [`quanta`], takes about 10 ns.
//!
//! A reading is a [`Moment`]: nanoseconds since one origin for the whole
//! process, a `u64`. A request subtracts and compares readings several times
//! (attempt durations, the budget's and the statistics' slots, deadlines);
//! `Instant` arithmetic is a `timespec` subtraction with carries and checks,
//! about 30 instructions each, where a `u64` takes one. A moment becomes a
//! `tokio::time::Instant` only where a tokio timer is armed (a wait, an
//! attempt that did not finish on its first poll).
//!
//! Readings follow tokio's clock: a counter reading is *anchor + counter
//! ticks since the anchor*, where the anchor is a pair (counter, tokio's
//! clock as a moment) read together. The counter's calibrated
//! rate is off by some parts per million, so each thread takes a new
//! anchor once a second ([`RESYNC`]): a reading is never more than a few
//! microseconds from tokio's, so a timer armed from it fires when it should.
//! A new anchor may step a thread's readings back by that much; every
//! difference the pool takes saturates at zero.
//!
//! Tests pause tokio's clock and move it by hand; the counter would not
//! follow. A pool built in a runtime whose clock is paused therefore keeps
//! tokio's clock ([`Clock::detect`]); so does one on a machine without an
//! invariant time-stamp counter (quanta then reads the monotonic clock,
//! which would only add its scaling).

use std::cell::Cell;
use std::ops::{Add, Sub};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;

/// How often a thread re-reads tokio's clock to re-anchor its counter
/// readings. At the counter's worst calibration error (about 100 parts per
/// million) a reading drifts 100 us in this time.
const RESYNC: Duration = Duration::from_secs(1);

/// The process's calibrated counter (`None` where it is not usable).
fn counter() -> Option<&'static quanta::Clock> {
    static COUNTER: OnceLock<Option<quanta::Clock>> = OnceLock::new();
    COUNTER
        // quanta falls back to the monotonic clock without an invariant
        // counter: nothing to gain over tokio's then.
        .get_or_init(|| invariant_tsc().then(quanta::Clock::new))
        .as_ref()
}

/// Whether the CPU says its time-stamp counter ticks at a constant rate
/// across power states (CPUID leaf 0x8000_0007, EDX bit 8).
#[cfg(target_arch = "x86_64")]
fn invariant_tsc() -> bool {
    // CPUID is safe to execute on every x86-64 CPU; `__cpuid` is safe since
    // Rust 1.87.
    let max = std::arch::x86_64::__cpuid(0x8000_0000).eax;
    max >= 0x8000_0007 && std::arch::x86_64::__cpuid(0x8000_0007).edx & (1 << 8) != 0
}

#[cfg(not(target_arch = "x86_64"))]
fn invariant_tsc() -> bool {
    false
}

/// A reading of the pool's clock: nanoseconds since the process's origin
/// (2^64 ns is 584 years). Differences saturate at zero, as
/// `Instant::saturating_duration_since` does; sums saturate at the end of
/// time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Moment(u64);

/// The instant every [`Moment`] counts from: a day before the process's
/// first reading. tokio's paused clocks (in tests) start at the real time
/// their runtime was built, which may be before the first reading; a day
/// of margin keeps every one of them after the origin.
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(|| {
        let now = std::time::Instant::now();
        let day = Duration::from_secs(86_400);
        Instant::from_std(now.checked_sub(day).unwrap_or(now))
    })
}

/// `d` in nanoseconds, saturating (`Duration::as_nanos` is a `u128`
/// product).
#[inline]
pub(crate) fn nanos(d: Duration) -> u64 {
    d.as_secs()
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(d.subsec_nanos()))
}

impl Moment {
    /// tokio's clock now, as a moment.
    pub(crate) fn now() -> Moment {
        Moment::of(Instant::now())
    }

    /// `instant` as a moment (the origin, for an instant before it).
    pub(crate) fn of(instant: Instant) -> Moment {
        Moment(nanos(instant.saturating_duration_since(origin())))
    }

    /// This moment as a tokio instant, for a timer.
    pub(crate) fn instant(self) -> Instant {
        let o = origin();
        o.checked_add(Duration::from_nanos(self.0))
            .unwrap_or(o + Duration::from_secs(86_400 * 365 * 30))
    }

    /// Nanoseconds from `earlier` to this moment (zero if `earlier` is
    /// later).
    #[inline]
    pub(crate) fn nanos_since(self, earlier: Moment) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// The time from `earlier` to this moment (zero if `earlier` is later).
    #[inline]
    pub(crate) fn saturating_duration_since(self, earlier: Moment) -> Duration {
        Duration::from_nanos(self.nanos_since(earlier))
    }

    /// This moment plus `d`, `None` past the end of time.
    #[inline]
    pub(crate) fn checked_add(self, d: Duration) -> Option<Moment> {
        self.checked_add_nanos(nanos(d))
    }

    /// This moment plus `nanos` nanoseconds, `None` past the end of time.
    #[inline]
    pub(crate) fn checked_add_nanos(self, nanos: u64) -> Option<Moment> {
        self.0.checked_add(nanos).map(Moment)
    }
}

impl Add<Duration> for Moment {
    type Output = Moment;

    #[inline]
    fn add(self, d: Duration) -> Moment {
        Moment(self.0.saturating_add(nanos(d)))
    }
}

impl Sub for Moment {
    type Output = Duration;

    #[inline]
    fn sub(self, earlier: Moment) -> Duration {
        self.saturating_duration_since(earlier)
    }
}

/// A thread's anchor: a counter reading `at` and tokio's clock read with
/// it, and the counter's rate, so that a reading is one subtraction, one
/// multiplication and one addition from it.
#[derive(Clone, Copy)]
struct Anchor {
    /// The counter reading.
    at: u64,
    /// tokio's clock at `at`, in nanoseconds since the origin.
    moment: u64,
    /// Nanoseconds per 2^32 counter ticks.
    rate: u64,
    /// Ticks after `at` the anchor is good for ([`RESYNC`]); zero for no
    /// anchor yet.
    ticks: u64,
}

thread_local! {
    /// This thread's anchor (none until its first reading).
    static ANCHOR: Cell<Anchor> = const {
        Cell::new(Anchor {
            at: 0,
            moment: 0,
            rate: 0,
            ticks: 0,
        })
    };
}

/// Where a pool's readings come from. Chosen once, when the pool is built.
#[derive(Clone, Copy)]
pub(crate) struct Clock {
    counter: Option<&'static quanta::Clock>,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.counter.is_some() {
            "Clock(tsc)"
        } else {
            "Clock(tokio)"
        })
    }
}

impl Clock {
    /// tokio's clock, always.
    pub(crate) const TOKIO: Clock = Clock { counter: None };

    /// The counter, unless tokio's clock is paused here or the counter is
    /// not usable. A paused clock does not move between two readings; a
    /// running one with nanosecond resolution does (one that does not, a
    /// coarse clock source, keeps tokio's clock: correct, only slower).
    pub(crate) fn detect() -> Clock {
        let paused = tokio::runtime::Handle::try_current().is_ok()
            && (0..3).all(|_| Instant::now() == Instant::now());
        if paused {
            return Clock::TOKIO;
        }
        Clock { counter: counter() }
    }

    /// Whether readings come from the time-stamp counter.
    #[cfg(test)]
    pub(crate) fn is_counter(self) -> bool {
        self.counter.is_some()
    }

    /// Now.
    #[inline]
    pub(crate) fn now(self) -> Moment {
        match self.counter {
            None => Moment::now(),
            Some(c) => counter_now(c),
        }
    }
}

/// A counter reading as a moment, from this thread's anchor. quanta's own
/// conversion (`delta_as_nanos`) checks the counter's kind and shifts by
/// a variable amount on each call; the anchor keeps the rate as a
/// multiplier, so a reading is one 64 x 64 product and a fixed shift.
#[inline]
fn counter_now(counter: &quanta::Clock) -> Moment {
    let raw = counter.raw();
    let anchor = ANCHOR.get();
    // A counter behind the anchor (this thread moved to a core whose
    // counter is behind) wraps around to far ahead: a new anchor.
    let ticks = raw.wrapping_sub(anchor.at);
    if ticks < anchor.ticks {
        return Moment(anchor.moment + scale(ticks, anchor.rate));
    }
    take_anchor(counter)
}

/// [`RESYNC`] in nanoseconds.
const RESYNC_NANOS: u64 = RESYNC.as_nanos() as u64;

/// `ticks` in nanoseconds at `rate` nanoseconds per 2^32 ticks.
#[inline(always)]
fn scale(ticks: u64, rate: u64) -> u64 {
    ((u128::from(ticks) * u128::from(rate)) >> 32) as u64
}

/// Takes a new anchor: tokio's clock read between two counter readings
/// that are close together (a thread preempted between them would skew
/// every reading of the next second by the time it was away; three tries,
/// then the last pair).
#[cold]
#[inline(never)]
fn take_anchor(counter: &quanta::Clock) -> Moment {
    let mut pair = (0, Moment::now());
    for _ in 0..3 {
        let before = counter.raw();
        let now = Moment::now();
        let after = counter.raw();
        pair = (after, now);
        if counter.delta_as_nanos(before, after) < ANCHOR_WIDTH_NANOS {
            break;
        }
    }
    // quanta's calibrated rate, as nanoseconds per 2^32 ticks (its
    // rounding: under a nanosecond a second).
    let rate = counter.delta_as_nanos(0, 1 << 32);
    // The ticks of a resync period (none for a counter that reports no
    // rate: each reading then takes an anchor, which reads tokio's clock).
    let ticks = (u128::from(RESYNC_NANOS) << 32)
        .checked_div(u128::from(rate))
        .map_or(0, |t| t.min(u128::from(u64::MAX)) as u64);
    ANCHOR.set(Anchor {
        at: pair.0,
        moment: pair.1.0,
        rate,
        ticks,
    });
    pair.1
}

/// The widest two counter readings around an anchor's tokio reading may
/// be (a `clock_gettime` takes tens of nanoseconds).
const ANCHOR_WIDTH_NANOS: u64 = 5_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_paused_runtime_keeps_tokios_clock() {
        let clock = Clock::detect();
        assert!(!clock.is_counter());
        let before = clock.now();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(clock.now() - before, Duration::from_secs(5));
    }

    #[tokio::test]
    async fn counter_readings_follow_tokios_clock() {
        let clock = Clock::detect();
        if counter().is_none() {
            // No invariant counter on this CPU: the detection must say so.
            assert!(!clock.is_counter());
            return;
        }
        assert!(clock.is_counter());
        // Each counter reading lies between two tokio readings taken
        // around it, give or take the calibration's error over the anchor's
        // second. (A preempted thread only widens the bracket.)
        let bracket = || {
            let before = Moment::now();
            let ours = clock.now();
            (before, ours, Moment::now())
        };
        let slack = Duration::from_micros(200);
        for _ in 0..1000 {
            let (before, ours, after) = bracket();
            assert!(
                ours + slack >= before && ours <= after + slack,
                "{before:?} {ours:?} {after:?}"
            );
        }
        // Over a few milliseconds (busy: the point is the real clock),
        // counter readings move as much as tokio's.
        let (b1, o1, a1) = bracket();
        while Moment::now() - a1 < Duration::from_millis(5) {
            std::hint::spin_loop();
        }
        let (b2, o2, a2) = bracket();
        let moved = o2 - o1;
        assert!(
            moved + slack >= b2 - a1 && moved <= a2 - b1 + slack,
            "moved {moved:?}, tokio's clock between {:?} and {:?}",
            b2 - a1,
            a2 - b1
        );
    }
}
