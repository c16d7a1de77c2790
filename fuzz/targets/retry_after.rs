//! Fuzz target `retry_after`: Retry-After header values, in the
//! delay-seconds and HTTP-date forms.
//!
//! Input: the raw bytes of a header value. Parsed with
//! [`parse_retry_after`] against fixed clocks (the epoch, 2023, the last
//! second of year 9999) when it is text, and through the header path
//! ([`retry_after`] on a `HeaderMap`, the real clock) when it is a valid
//! header value.
//!
//! Checks: a number of seconds (digits only: `+5` is not one) gives
//! exactly that many (capped at `u32::MAX` s, overflow included); a date gives at most the time to that date; a parsed
//! value never depends on surrounding whitespace.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderValue, header::RETRY_AFTER};
use retryctl::upstream::{parse_retry_after, retry_after};

/// One fuzz input.
pub fn run(data: &[u8]) {
    if let Ok(value) = std::str::from_utf8(data) {
        let clocks = [
            UNIX_EPOCH,
            UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            UNIX_EPOCH + Duration::from_secs(253_402_300_799),
        ];
        for now in clocks {
            let parsed = parse_retry_after(value, now);
            assert_eq!(parse_retry_after(&format!(" \t{value} "), now), parsed);
            let trimmed = value.trim();
            let cap = u64::from(u32::MAX);
            if !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit()) {
                // Delay-seconds (1*DIGIT): exactly that many, an overflow
                // capped like any other very long delay.
                let secs = trimmed.parse::<u64>().map_or(cap, |s| s.min(cap));
                assert_eq!(parsed, Some(Duration::from_secs(secs)), "{value:?}");
            } else if let Some(d) = parsed {
                let when = httpdate_like(trimmed).expect("only numbers and dates are accepted");
                let until = when.duration_since(now).unwrap_or(Duration::ZERO);
                assert_eq!(d, until, "{value:?}");
            }
        }
    }
    if let Ok(value) = HeaderValue::from_bytes(data) {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, value);
        if let Some(d) = retry_after(&headers) {
            // A date can be at most year 9999.
            assert!(
                d <= Duration::from_secs(253_402_300_799),
                "{data:?} -> {d:?}"
            );
        }
    }
}

/// The date a value names, through the same public parser (a value that
/// is not a number was parsed as a date: measure it from the epoch).
fn httpdate_like(value: &str) -> Option<SystemTime> {
    parse_retry_after(value, UNIX_EPOCH).map(|d| UNIX_EPOCH + d)
}
