//! Per-thread striping of state that every request writes.
//!
//! A value every request updates (a counter, a budget slot) is one cache
//! line; with requests on several cores the line moves between them on
//! every update, ~100 ns a transfer, more than the rest of the update.
//! Striping gives each thread a line of its own: a thread takes a stripe
//! once and writes only there; readers (a scrape, a budget withdrawal) sum
//! the stripes.
//!
//! A stripe is **owned**: the first [`OWNED`] threads that write striped
//! state each claim one for their lifetime (released when the thread
//! exits), and threads beyond those share the last stripe, [`SHARED`].
//! No other thread writes an owned stripe, so its owner updates it with a
//! plain load and store ([`Stripe::add`], [`Stripe::update`]): a locked
//! read-modify-write costs about 20 cycles and drains the store buffer,
//! and a successful request makes several (counters, histogram buckets,
//! the budget's deposit). The shared stripe takes atomic read-modify-writes.
//! Readers load each stripe and never see a torn value either way.
//!
//! State whose updates may come from another thread than the one that
//! made the first (the admission gate's count, given back by a permit that
//! may be dropped on another worker) takes atomic read-modify-writes on
//! every stripe, owned or not.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Stripes a thread can own.
pub(crate) const OWNED: usize = 8;

/// The stripe threads share once every owned one is taken.
pub(crate) const SHARED: usize = OWNED;

/// How many stripes striped state has: the owned ones and the shared one.
pub(crate) const STRIPES: usize = OWNED + 1;

/// A value alone on its cache-line pair (the adjacent-line prefetcher
/// pulls lines in pairs, so 64-byte alignment still shares).
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

/// A thread's stripe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stripe(usize);

/// Which owned stripes are taken, one bit each.
static CLAIMED: AtomicU32 = AtomicU32::new(0);

/// A thread's claim on an owned stripe, given back when the thread exits.
struct Claim(Stripe);

impl Claim {
    fn take() -> Claim {
        let mut taken = CLAIMED.load(Ordering::Relaxed);
        loop {
            let free = (!taken).trailing_zeros() as usize;
            if free >= OWNED {
                return Claim(Stripe(SHARED));
            }
            // Acquire: this thread's plain updates start from the last
            // value the previous owner stored.
            match CLAIMED.compare_exchange_weak(
                taken,
                taken | 1 << free,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Claim(Stripe(free)),
                Err(now) => taken = now,
            }
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Whatever this thread still writes while it exits goes to the
        // shared stripe.
        let _ = STRIPE.try_with(|s| s.set(SHARED));
        if self.0.is_owned() {
            // Release: the next owner sees every update of this one.
            CLAIMED.fetch_and(!(1 << self.0.0), Ordering::Release);
        }
    }
}

/// [`STRIPE`] before the thread's first claim.
const UNCLAIMED: usize = usize::MAX;

thread_local! {
    /// This thread's stripe index. A constant-initialised `Cell` without
    /// a destructor: reading it is one thread-local load, with no lazy
    /// initialisation state to check, on every update of striped state.
    static STRIPE: Cell<usize> = const { Cell::new(UNCLAIMED) };
    /// The claim behind it, whose destructor gives the stripe back.
    static CLAIM: Claim = Claim::take();
}

impl Stripe {
    /// This thread's stripe (the shared one once the thread is exiting).
    #[inline]
    pub(crate) fn current() -> Stripe {
        match STRIPE.with(Cell::get) {
            UNCLAIMED => Stripe::claim(),
            i => Stripe(i),
        }
    }

    /// The thread's first use: claims a stripe.
    #[cold]
    #[inline(never)]
    fn claim() -> Stripe {
        let stripe = CLAIM.try_with(|c| c.0).unwrap_or(Stripe(SHARED));
        STRIPE.with(|s| s.set(stripe.0));
        stripe
    }

    /// Its index, in `0..STRIPES`.
    #[inline]
    pub(crate) fn index(self) -> usize {
        self.0
    }

    /// Whether only this thread writes it.
    #[inline]
    pub(crate) fn is_owned(self) -> bool {
        self.0 < OWNED
    }

    /// Adds `value` to `cell`, a value of this stripe.
    // The Prometheus recorder's counters and histograms are its users.
    #[cfg_attr(not(feature = "prometheus"), allow(dead_code))]
    #[inline]
    pub(crate) fn add(self, cell: &AtomicU64, value: u64) {
        if self.is_owned() {
            cell.store(
                cell.load(Ordering::Relaxed).wrapping_add(value),
                Ordering::Relaxed,
            );
        } else {
            cell.fetch_add(value, Ordering::Relaxed);
        }
    }

    /// Replaces `cell`, a value of this stripe, with `f` of it; `release`
    /// orders the store after this thread's earlier writes (for readers
    /// that load it with `Acquire`).
    #[inline]
    pub(crate) fn update(self, cell: &AtomicU64, release: bool, f: impl Fn(u64) -> u64) {
        let store = if release {
            Ordering::Release
        } else {
            Ordering::Relaxed
        };
        if self.is_owned() {
            cell.store(f(cell.load(Ordering::Relaxed)), store);
        } else {
            let _ = cell.fetch_update(store, Ordering::Relaxed, |v| Some(f(v)));
        }
    }
}

/// This thread's stripe index, in `0..STRIPES`.
#[inline]
pub(crate) fn index() -> usize {
    Stripe::current().index()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_thread_keeps_its_stripe_and_gives_it_back() {
        assert_eq!(Stripe::current(), Stripe::current());
        assert!(index() < STRIPES);
        assert_eq!(std::mem::align_of::<Padded<u8>>(), 128);
        // A thread's stripe is free again once it exits: OWNED threads one
        // after the other never run out (other tests' threads may hold
        // some, so at most those are missing).
        let owned = (0..4 * OWNED)
            .filter(|_| {
                std::thread::spawn(|| Stripe::current().is_owned())
                    .join()
                    .unwrap()
            })
            .count();
        assert!(owned > 0, "no thread got an owned stripe");
    }

    #[test]
    fn threads_beyond_the_owned_stripes_share_one_and_lose_nothing() {
        // 3 x OWNED threads at once: some own a stripe, the rest share;
        // every update is counted either way.
        let cells: Arc<Vec<Padded<AtomicU64>>> =
            Arc::new((0..STRIPES).map(|_| Padded(AtomicU64::new(0))).collect());
        let start = Arc::new(std::sync::Barrier::new(3 * OWNED));
        let handles: Vec<_> = (0..3 * OWNED)
            .map(|_| {
                let cells = cells.clone();
                let start = start.clone();
                std::thread::spawn(move || {
                    let stripe = Stripe::current();
                    start.wait();
                    for _ in 0..10_000 {
                        stripe.add(&cells[stripe.index()].0, 1);
                        stripe.update(&cells[stripe.index()].0, false, |v| v + 1);
                    }
                    stripe.is_owned()
                })
            })
            .collect();
        let shared = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|owned| !owned)
            .count();
        assert!(shared >= 2 * OWNED, "{shared} threads shared");
        let total: u64 = cells.iter().map(|c| c.0.load(Ordering::Relaxed)).sum();
        assert_eq!(total, 3 * OWNED as u64 * 20_000);
    }
}
