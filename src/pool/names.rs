//! Model and provider names, interned for the life of the process.
//!
//! Every successful call reports the provider that served it. As an
//! `Arc<str>` that is a reference-count increment in [`Pool::call`] and a
//! decrement where the caller drops it: two atomic writes to one cache
//! line that every request on every core touches, which on two cores cost
//! more than the rest of the bookkeeping together (docs/benchmarks.md). A
//! `&'static str` costs nothing to copy or drop.
//!
//! Names come only from configuration (a request for an unknown model is
//! never interned), and each distinct name is stored once however many
//! pools are built, so the memory kept is bounded by the names an operator
//! ever configured: bytes, not a leak that grows with traffic.
//!
//! [`Pool::call`]: super::Pool::call

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};

/// The process-wide copy of `name`.
pub(super) fn intern(name: &str) -> &'static str {
    static NAMES: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);
    let mut names = NAMES.lock().unwrap_or_else(PoisonError::into_inner);
    let names = names.get_or_insert_with(HashSet::new);
    if let Some(&known) = names.get(name) {
        return known;
    }
    let stored: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.insert(stored);
    stored
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_copy_per_name() {
        let a = intern("proxy-intern-test");
        let b = intern(&String::from("proxy-intern-test"));
        assert_eq!(a, "proxy-intern-test");
        assert!(std::ptr::eq(a, b));
        assert!(!std::ptr::eq(a, intern("proxy-intern-other")));
    }
}
