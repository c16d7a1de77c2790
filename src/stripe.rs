//! Per-thread striping of state that every request writes.
//!
//! A value every request updates (a counter, a budget slot) is one cache
//! line; with requests on several cores the line moves between them on
//! every update, ~100 ns a transfer, more than the rest of the update.
//! Striping gives each thread a line of its own: a thread takes a stripe
//! index once, in turn, and writes only there; readers (a scrape, a budget
//! withdrawal) sum the stripes. With up to [`STRIPES`] threads, no two
//! share a stripe.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How many stripes striped state has.
pub(crate) const STRIPES: usize = 8;

/// A value alone on its cache-line pair (the adjacent-line prefetcher
/// pulls lines in pairs, so 64-byte alignment still shares).
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

/// This thread's stripe, in `0..STRIPES`: threads take stripes in turn.
pub(crate) fn index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    STRIPE.with(|s| {
        let mut i = s.get();
        if i == usize::MAX {
            i = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
            s.set(i);
        }
        i
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_take_stripes_in_turn() {
        let stripes: Vec<usize> = (0..STRIPES)
            .map(|_| std::thread::spawn(index).join().unwrap())
            .collect();
        // Other tests take stripes concurrently, so consecutive threads
        // here need not get consecutive stripes; each is valid and the
        // same thread always gets the same one.
        assert!(stripes.iter().all(|&s| s < STRIPES));
        assert_eq!(index(), index());
        assert_eq!(std::mem::align_of::<Padded<u8>>(), 128);
    }
}
