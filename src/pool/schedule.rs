//! When the next round's retries happen: exponential backoff with
//! jitter, Retry-After honoured and capped, and a learned delay per
//! provider when the policy asks for one.
//!
//! Only retries of requests the upstream received are timed here: a
//! request it never received (refused, connect timeout, unsent) waits at
//! the provider's admission gate instead ([`super::admission`]).

use std::time::Duration;

use smallvec::SmallVec;

use crate::classify::Classification;
use crate::policy::Policy;

/// A provider to retry in the next round, and the wait it needs.
#[derive(Clone, Copy)]
pub(super) struct Retry {
    pub(super) index: u8,
    pub(super) wait: Duration,
}

/// `base x backoff^(retry - 1)`, capped. Out of line: inlined into
/// [`schedule`]'s loop (a learned delay's branch), its duration-to-float
/// conversions are hoisted before the loop and paid by every plan.
#[inline(never)]
pub(super) fn backoff(base: Duration, factor: f64, retry: u32, cap: Duration) -> Duration {
    // The first retry's factor is `backoff^0`, exactly 1 (for any
    // `backoff`, as `powi` defines it): no call into the runtime's `powi`
    // for the retry most requests that retry make. (`growth` is out of
    // line: inlined, `powi` is a pure intrinsic the optimiser calls
    // unconditionally and then selects 1.0 over.)
    let growth = match retry.saturating_sub(1).min(64) {
        0 => 1.0,
        n => growth(factor, n as i32),
    };
    let scaled = base.as_secs_f64() * growth;
    if !scaled.is_finite() || scaled >= cap.as_secs_f64() {
        cap
    } else if scaled == 0.0 {
        // What `from_secs_f64` would return, without its bit-level
        // conversion: a zero delay is what a blind immediate retry uses.
        Duration::ZERO
    } else {
        Duration::from_secs_f64(scaled)
    }
}

/// `factor^n`, for [`backoff`]'s later retries.
#[inline(never)]
fn growth(factor: f64, n: i32) -> f64 {
    factor.powi(n)
}

/// Spreads `wait` uniformly over `wait x (1 +/- jitter)`.
pub(super) fn jittered(wait: Duration, jitter: f64) -> Duration {
    if jitter <= 0.0 || wait.is_zero() {
        return wait;
    }
    let factor = 1.0 + jitter * (2.0 * fastrand::f64() - 1.0);
    wait.mul_f64(factor.max(0.0))
}

/// The waits before retry number `retry` (1-based) of the given providers,
/// into `out` in the order they become due (written in place: a plan
/// returned by value is a copy of its whole inline array, several times
/// over); providers whose Retry-After exceeds the policy's cap are left
/// out, and the longest of theirs is returned. `learned` gives a transient
/// provider's own delay (`delay = "auto"`); without one, transient
/// providers share one wait.
pub(super) fn schedule(
    policy: &Policy,
    retry: u32,
    pending: &[(u8, Classification)],
    learned: &dyn Fn(u8) -> Option<Duration>,
    out: &mut SmallVec<[Retry; 8]>,
) -> Option<Duration> {
    let transient = jittered(
        backoff(policy.base_delay(), policy.backoff, retry, policy.max_delay),
        policy.jitter,
    );
    let mut too_long = None;
    out.clear();
    for &(index, class) in pending {
        let wait = match class {
            Classification::RateLimited { retry_after } => {
                if let Some(ra) = retry_after.filter(|ra| *ra > policy.max_retry_after) {
                    too_long = too_long.max(Some(ra));
                    continue;
                }
                rate_limited_wait(policy, retry, retry_after)
            }
            _ => match learned(index) {
                Some(base) => jittered(
                    backoff(base, policy.backoff, retry, policy.max_delay),
                    policy.jitter,
                ),
                None => transient,
            },
        };
        out.push(Retry { index, wait });
    }
    // Stable: equal waits keep the round's provider order.
    out.sort_by_key(|r| r.wait);
    too_long
}

/// The wait before retry number `retry` of a rate-limited provider: its
/// own backoff, and at least the Retry-After it sent. Out of line: inlined
/// into [`schedule`]'s loop, its duration-to-float conversions are hoisted
/// before the loop and paid by every plan, rate-limited provider or not.
#[inline(never)]
fn rate_limited_wait(policy: &Policy, retry: u32, retry_after: Option<Duration>) -> Duration {
    let own = jittered(
        backoff(
            policy.rate_limited_delay,
            policy.backoff,
            retry,
            policy.max_retry_after,
        ),
        policy.jitter,
    );
    own.max(retry_after.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let s = Duration::from_millis(500);
        let cap = Duration::from_secs(4);
        let waits: Vec<_> = (1..=5).map(|r| backoff(s, 2.0, r, cap)).collect();
        assert_eq!(
            waits,
            [500, 1000, 2000, 4000, 4000]
                .map(Duration::from_millis)
                .to_vec()
        );
    }

    #[test]
    fn backoff_shortcuts_match_the_formula() {
        // What `backoff` computed before its shortcuts for the first retry
        // and a zero delay.
        let formula = |base: Duration, factor: f64, retry: u32, cap: Duration| {
            let scaled = base.as_secs_f64() * factor.powi(retry.saturating_sub(1).min(64) as i32);
            if !scaled.is_finite() || scaled >= cap.as_secs_f64() {
                cap
            } else {
                Duration::from_secs_f64(scaled)
            }
        };
        let bases = [0, 1, 999, 123_456_789, 500_000_000, 7_000_000_001].map(Duration::from_nanos);
        for base in bases {
            for factor in [0.0, 0.5, 1.0, 2.0, 1e300, f64::INFINITY, f64::NAN] {
                for retry in 0..=3 {
                    for cap in [Duration::ZERO, Duration::from_secs(4)] {
                        assert_eq!(
                            backoff(base, factor, retry, cap),
                            formula(base, factor, retry, cap),
                            "{base:?} x {factor}^({retry} - 1), cap {cap:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn jitter_stays_in_band() {
        let d = Duration::from_millis(500);
        for _ in 0..1000 {
            let j = jittered(d, 0.2);
            assert!(j >= Duration::from_millis(400) && j <= Duration::from_millis(600));
        }
        assert_eq!(jittered(d, 0.0), d);
    }

    #[test]
    fn schedule_honours_retry_after_and_drops_excessive_ones() {
        let policy = Policy {
            jitter: 0.0,
            ..Policy::default()
        };
        let pending = [
            (
                0,
                Classification::RateLimited {
                    retry_after: Some(Duration::from_secs(3)),
                },
            ),
            (1, Classification::Transient),
            (
                2,
                Classification::RateLimited {
                    retry_after: Some(Duration::from_secs(600)),
                },
            ),
            (3, Classification::RateLimited { retry_after: None }),
        ];
        let mut plan = SmallVec::new();
        let too_long = schedule(&policy, 1, &pending, &|_| None, &mut plan);
        let got: Vec<_> = plan.iter().map(|r| (r.index, r.wait.as_millis())).collect();
        assert_eq!(got, vec![(1, 500), (3, 1000), (0, 3000)]);
        assert_eq!(too_long, Some(Duration::from_secs(600)));
    }
}
