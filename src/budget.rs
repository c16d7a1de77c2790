//! Retry budgets: why a ratio, and not a maximum number of retries.
//!
//! "Retry up to N times" is safe when failures are rare and independent and
//! dangerous when they are not: in an outage every request retries N times
//! and the upstream, already failing, sees (N+1)x its load just when it can
//! least take it. The gateway this crate grew out of saw a 4x amplification
//! saturate its backends.
//!
//! A budget bounds retries *in aggregate*: every request deposits `ratio`
//! of a token, every retry withdraws one, and a fixed reserve of
//! `min_per_second x window` tokens lets a quiet service retry at all.
//! With the defaults (20%, 10/s, 10 s) a flaky period is fully absorbed,
//! while a total outage costs at most 1.2x the traffic plus 10 retries/s.
//! This is the Finagle / Linkerd / tower design.
//!
//! Unlike tower's `TpsBudget`, which takes a mutex and reads the clock on
//! every call, [`RetryBudget`] is rings of atomic slots and uses the clock
//! reading the request already took: a deposit is a load and a store on
//! the calling thread's own stripe of slots (`crate::stripe`; a
//! compare-and-swap on the stripe threads share beyond the first eight),
//! so requests on different cores never contend for it. Withdrawals, one per retry, sum
//! the stripes and serialise on one ledger, which keeps the budget exact.
//!
//! ```
//! use retryctl::RetryBudget;
//! use retryctl::policy::BudgetPolicy;
//! use tokio::time::Instant;
//!
//! let policy = BudgetPolicy { min_per_second: 0, ..BudgetPolicy::default() };
//! let budget = RetryBudget::new();
//! let now = Instant::now();
//! for _ in 0..10 {
//!     budget.deposit(now, &policy); // ten requests at 20% ...
//! }
//! assert!(budget.withdraw(now, &policy)); // ... pay for two retries
//! assert!(budget.withdraw(now, &policy));
//! assert!(!budget.withdraw(now, &policy));
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use strength_reduce::StrengthReducedU64;
use tokio::time::Instant;

use crate::clock::{Moment, nanos};
use crate::policy::BudgetPolicy;
use crate::stripe::{Padded, STRIPES, Stripe};

/// Slots in the sliding window: the window moves in steps of `window / 10`.
const SLOTS: usize = 10;
/// Fixed-point scale: balances are kept in thousandths of a retry.
const MILLI: i64 = 1000;

/// A ring of slots, each packing a slot's epoch (upper 32 bits) and a
/// count in thousandths of a retry (lower 32 bits, saturating), so a slot
/// is claimed for a new epoch and updated in one compare-and-swap.
#[derive(Debug, Default)]
struct Ring([AtomicU64; SLOTS]);

impl Ring {
    /// Adds `delta` thousandths to the slot of `epoch`, in a ring of
    /// `stripe`.
    fn add(&self, stripe: Stripe, epoch: u32, delta: u32) {
        stripe.update(&self.0[epoch as usize % SLOTS], true, |cur| {
            let (e, v) = unpack(cur);
            let base = if e == epoch { v } else { 0 };
            pack(epoch, base.saturating_add(delta))
        });
    }

    /// The sum of the slots live at `epoch` (the window ending there),
    /// leaving out the slot of `epoch` itself when `skip_current`.
    fn sum(&self, epoch: u32, skip_current: bool) -> i64 {
        let current = epoch as usize % SLOTS;
        let mut sum = 0i64;
        for (i, slot) in self.0.iter().enumerate() {
            let (e, v) = unpack(slot.load(Ordering::Acquire));
            // Live: `e <= epoch && epoch - e < SLOTS`, in one comparison
            // (an `e` ahead of `epoch` wraps to a large distance). No
            // branch per slot: the sum is over ten words.
            let live = epoch.wrapping_sub(e) < SLOTS as u32 && !(skip_current && i == current);
            sum += i64::from(v) * i64::from(live);
        }
        sum
    }
}

/// The length of a slot of `policy`'s window, in nanoseconds (at least 1).
fn slot_nanos(policy: &BudgetPolicy) -> u64 {
    (nanos(policy.window) / SLOTS as u64).max(1)
}

/// What a request deposits, and into which slot, under one budget policy
/// and scale: the same for every request until the policy changes, so a
/// live policy works it out once (`ModelPolicy`) instead of a float
/// product and a duration conversion per request.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DepositPlan {
    /// Thousandths of a retry.
    delta: u32,
    /// The slot length in nanoseconds, as a divisor that divides by a
    /// product and a shift: a 64-bit division takes ~40 cycles, and its
    /// result, the slot's index, is what the deposit's store waits for.
    slot: StrengthReducedU64,
}

impl DepositPlan {
    /// `ratio x scale` (`scale` within 0..=1) of `policy`, and its slots.
    pub(crate) fn new(policy: &BudgetPolicy, scale: f64) -> Self {
        DepositPlan {
            // Rounded to the nearest thousandth by adding a half and
            // truncating (the product is never negative; `as` saturates
            // and maps NaN to 0).
            delta: (policy.ratio * scale.clamp(0.0, 1.0) * MILLI as f64 + 0.5) as u32,
            slot: StrengthReducedU64::new(slot_nanos(policy)),
        }
    }
}

impl PartialEq for DepositPlan {
    fn eq(&self, other: &Self) -> bool {
        self.delta == other.delta && self.slot.get() == other.slot.get()
    }
}

impl Eq for DepositPlan {}

/// A lock-free retry budget over a sliding window.
///
/// Deposits and withdrawals are kept apart: deposits in per-thread stripes
/// of slot rings (a request's deposit never contends with another core's),
/// withdrawals in one ring. A withdrawal succeeds by a compare-and-swap on
/// the withdrawal ring's current slot after checking deposits + reserve -
/// withdrawals >= 1; deposits only ever raise the balance, so a deposit
/// racing the check can only make it conservative, and two withdrawals
/// racing for the last token serialise on the slot. Changing the window
/// length re-bases the epochs, which empties the budget once.
#[derive(Debug)]
pub struct RetryBudget {
    origin: Moment,
    deposits: [Padded<Ring>; STRIPES],
    withdrawals: Padded<Ring>,
    /// Retry outcomes per slot: epoch (upper 32 bits), retries (16 bits),
    /// successful retries (16 bits), saturating.
    outcomes: [AtomicU64; SLOTS],
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget::new()
    }
}

fn pack(epoch: u32, value: u32) -> u64 {
    ((epoch as u64) << 32) | value as u64
}

fn unpack(word: u64) -> (u32, u32) {
    ((word >> 32) as u32, word as u32)
}

fn pack_outcomes(epoch: u32, tries: u16, wins: u16) -> u64 {
    ((epoch as u64) << 32) | ((tries as u64) << 16) | wins as u64
}

fn unpack_outcomes(word: u64) -> (u32, u16, u16) {
    ((word >> 32) as u32, (word >> 16) as u16, word as u16)
}

impl RetryBudget {
    /// An empty budget whose window starts now.
    pub fn new() -> Self {
        RetryBudget {
            origin: Moment::now(),
            deposits: Default::default(),
            withdrawals: Default::default(),
            outcomes: Default::default(),
        }
    }

    fn epoch(&self, now: Moment, policy: &BudgetPolicy) -> u32 {
        Self::epoch_from(now.nanos_since(self.origin) / slot_nanos(policy))
    }

    /// The epoch of the slot `index` slots after the origin's.
    #[inline]
    fn epoch_from(index: u64) -> u32 {
        // +1 so that epoch 0 (the zeroed slots) is never current.
        (index + 1).min(u32::MAX as u64) as u32
    }

    /// Deposits over the window ending at `epoch`, in thousandths.
    fn deposited(&self, epoch: u32) -> i64 {
        self.deposits
            .iter()
            .map(|Padded(ring)| ring.sum(epoch, false))
            .sum()
    }

    fn reserve(policy: &BudgetPolicy) -> i64 {
        (policy.min_per_second as f64 * policy.window.as_secs_f64() * MILLI as f64) as i64
    }

    /// Records one request: adds `ratio` of a retry to the budget.
    pub fn deposit(&self, now: Instant, policy: &BudgetPolicy) {
        self.deposit_scaled(Moment::of(now), policy, 1.0);
    }

    /// Records one request, adding `ratio x scale` of a retry (`scale`
    /// within 0..=1: see [`RetryBudget::scale`]).
    pub(crate) fn deposit_scaled(&self, now: Moment, policy: &BudgetPolicy, scale: f64) {
        self.deposit_planned(now, &DepositPlan::new(policy, scale));
    }

    /// Records one request as `plan` says (its deposit and slot length
    /// worked out once per policy: see [`DepositPlan`]).
    #[inline]
    pub(crate) fn deposit_planned(&self, now: Moment, plan: &DepositPlan) {
        if plan.delta >= 1 {
            let stripe = Stripe::current();
            let Padded(ring) = &self.deposits[stripe.index()];
            let index = now.nanos_since(self.origin) / plan.slot;
            ring.add(stripe, Self::epoch_from(index), plan.delta);
        }
    }

    /// Records whether a retry succeeded.
    pub(crate) fn record_retry(&self, now: Moment, policy: &BudgetPolicy, succeeded: bool) {
        let epoch = self.epoch(now, policy);
        let slot = &self.outcomes[epoch as usize % SLOTS];
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            let (e, tries, wins) = unpack_outcomes(cur);
            let (tries, wins) = if e == epoch { (tries, wins) } else { (0, 0) };
            let next = pack_outcomes(
                epoch,
                tries.saturating_add(1),
                wins.saturating_add(u16::from(succeeded)),
            );
            match slot.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Retries and successful retries over the window.
    pub(crate) fn retry_outcomes(&self, now: Moment, policy: &BudgetPolicy) -> (u64, u64) {
        let epoch = self.epoch(now, policy);
        let mut tries = 0u64;
        let mut wins = 0u64;
        for slot in &self.outcomes {
            let (e, t, w) = unpack_outcomes(slot.load(Ordering::Acquire));
            if e <= epoch && epoch - e < SLOTS as u32 {
                tries += u64::from(t);
                wins += u64::from(w);
            }
        }
        (tries, wins)
    }

    /// How much of `ratio` new requests should deposit when retries stop
    /// helping: 1.0 while the window's retry success rate is at least
    /// `min_success` (or there were fewer than `min_retries` retries),
    /// falling linearly to 0.0 as the rate falls to 0. The reserve
    /// (`min_per_second`) is never scaled: a dead upstream still gets its
    /// trickle of retries, which is how the budget notices it came back.
    pub(crate) fn scale(
        &self,
        now: Moment,
        policy: &BudgetPolicy,
        min_success: f64,
        min_retries: u32,
    ) -> f64 {
        let (tries, wins) = self.retry_outcomes(now, policy);
        if tries < u64::from(min_retries) || min_success <= 0.0 {
            return 1.0;
        }
        (wins as f64 / tries as f64 / min_success).min(1.0)
    }

    /// Takes one retry from the budget; `false` when there is none left.
    ///
    /// A disabled budget always grants.
    pub fn withdraw(&self, now: Instant, policy: &BudgetPolicy) -> bool {
        self.withdraw_at(Moment::of(now), policy)
    }

    /// [`RetryBudget::withdraw`] at a reading of the pool's clock.
    pub(crate) fn withdraw_at(&self, now: Moment, policy: &BudgetPolicy) -> bool {
        if !policy.enabled {
            return true;
        }
        let epoch = self.epoch(now, policy);
        // The reserve alone is a lower bound of the credit (deposits only
        // add): while it covers the retry, the forty deposit slots are not
        // summed. A quiet service's retries, most retries, stop here.
        let mut credit = Self::reserve(policy);
        let mut summed = false;
        let Padded(ring) = &self.withdrawals;
        let earlier = ring.sum(epoch, true);
        let slot = &ring.0[epoch as usize % SLOTS];
        let mut cur = slot.load(Ordering::Acquire);
        loop {
            let (e, w) = unpack(cur);
            let current = if e == epoch { w } else { 0 };
            if credit - earlier - i64::from(current) < MILLI {
                if summed {
                    return false;
                }
                credit += self.deposited(epoch);
                summed = true;
                continue;
            }
            let next = pack(epoch, current.saturating_add(MILLI as u32));
            match slot.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Retries currently available (may be fractional).
    pub fn available(&self, now: Instant, policy: &BudgetPolicy) -> f64 {
        self.available_at(Moment::of(now), policy)
    }

    /// [`RetryBudget::available`] at a reading of the pool's clock.
    pub(crate) fn available_at(&self, now: Moment, policy: &BudgetPolicy) -> f64 {
        let epoch = self.epoch(now, policy);
        let Padded(withdrawals) = &self.withdrawals;
        let balance = self.deposited(epoch) + Self::reserve(policy) - withdrawals.sum(epoch, false);
        balance as f64 / MILLI as f64
    }

    /// The length of one slot: the window's granularity.
    pub fn granularity(policy: &BudgetPolicy) -> Duration {
        policy.window / SLOTS as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(ratio: f64, min_per_second: u32) -> BudgetPolicy {
        BudgetPolicy {
            enabled: true,
            ratio,
            min_per_second,
            window: Duration::from_secs(10),
        }
    }

    proptest::proptest! {
        /// A deposit's slot, found by the plan's product and shift, is the
        /// one a division finds, for any window and any time since the
        /// origin (within the 584 years a `u64` of nanoseconds holds).
        #[test]
        fn a_deposit_finds_its_slot_as_a_division_does(
            window in 1u64..=u64::MAX / 2,
            since in proptest::prelude::any::<u64>(),
        ) {
            let policy = BudgetPolicy {
                window: Duration::from_nanos(window),
                ..policy(0.2, 10)
            };
            let plan = DepositPlan::new(&policy, 1.0);
            let slot = slot_nanos(&policy);
            for at in [since, since / slot * slot, (since / slot * slot).saturating_sub(1)] {
                proptest::prop_assert_eq!(at / plan.slot, at / slot, "at {} slot {}", at, slot);
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reserve_alone_allows_floor_times_window() {
        let p = policy(0.0, 10);
        let b = RetryBudget::new();
        let now = Instant::now();
        let granted = (0..500).filter(|_| b.withdraw(now, &p)).count();
        assert_eq!(granted, 100);
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_expire_after_the_window() {
        let p = policy(0.5, 0);
        let b = RetryBudget::new();
        let t0 = Instant::now();
        for _ in 0..10 {
            b.deposit(t0, &p);
        }
        assert_eq!(b.available(t0, &p), 5.0);
        assert_eq!(b.available(t0 + Duration::from_secs(9), &p), 5.0);
        assert_eq!(b.available(t0 + Duration::from_secs(10), &p), 0.0);
        assert!(!b.withdraw(t0 + Duration::from_secs(11), &p));
    }

    #[tokio::test(start_paused = true)]
    async fn withdrawals_expire_too() {
        let p = policy(0.0, 1); // reserve: 10 retries per 10 s
        let b = RetryBudget::new();
        let t0 = Instant::now();
        assert_eq!((0..20).filter(|_| b.withdraw(t0, &p)).count(), 10);
        let later = t0 + Duration::from_secs(10);
        assert_eq!((0..20).filter(|_| b.withdraw(later, &p)).count(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_budget_always_grants() {
        let p = BudgetPolicy {
            enabled: false,
            ..policy(0.0, 0)
        };
        let b = RetryBudget::new();
        assert!((0..1000).all(|_| b.withdraw(Instant::now(), &p)));
    }

    #[tokio::test(start_paused = true)]
    async fn scale_follows_the_retry_success_rate() {
        let p = policy(0.2, 0);
        let b = RetryBudget::new();
        let t0 = Moment::now();
        assert_eq!(b.scale(t0, &p, 0.2, 10), 1.0, "no data: full ratio");
        for i in 0..20 {
            b.record_retry(t0, &p, i % 20 == 0); // 1 in 20 succeeds: 5%
        }
        assert_eq!(b.retry_outcomes(t0, &p), (20, 1));
        assert!((b.scale(t0, &p, 0.2, 10) - 0.25).abs() < 1e-9);
        // scaled deposits: 10 requests x 0.2 x 0.25 = 0.5 retries
        for _ in 0..10 {
            b.deposit_scaled(t0, &p, 0.25);
        }
        assert_eq!(b.available_at(t0, &p), 0.5);
        // the window moves on: outcomes expire, the full ratio returns
        assert_eq!(b.scale(t0 + Duration::from_secs(10), &p, 0.2, 10), 1.0);
    }

    #[test]
    fn two_threads_never_overdraw() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let p = policy(0.0, 5); // 50 retries per window
        let b = std::sync::Arc::new(RetryBudget::new());
        let now = Instant::now();
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let b = b.clone();
                let p = p.clone();
                std::thread::spawn(move || (0..1000).filter(|_| b.withdraw(now, &p)).count())
            })
            .collect();
        let total: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, 50);
    }
}
