//! Fuzz target `retry_after`: Retry-After header values, in the
//! delay-seconds and HTTP-date forms.
//!
//! Input: the raw bytes of a header value. Parsed with
//! [`parse_retry_after`] against fixed clocks (the epoch, 2023, the last
//! second of year 9999) when it is text, and through the header path
//! ([`retry_after`] on a `HeaderMap`, the real clock) when it is a valid
//! header value.
//!
//! Checks: a number of seconds gives exactly that many (capped at
//! `u32::MAX` s); a date gives at most the time to that date; a parsed
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
            if let Ok(secs) = trimmed.parse::<u64>() {
                assert_eq!(
                    parsed,
                    Some(Duration::from_secs(secs.min(u64::from(u32::MAX))))
                );
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
