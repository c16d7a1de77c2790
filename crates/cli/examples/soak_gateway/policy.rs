//! The policy file the gateway follows, rewritten every second: a valid
//! version, then an invalid one, and so on. Each valid version differs
//! from the one before it (so each is applied), and each invalid one is
//! invalid in its own way (so each must be rejected, the last valid one
//! staying in force).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// What is common to every valid version: the timeouts the soak relies
/// on (a request's deadline below the client's per-request timeout) and
/// the admission gate's probe interval that [`GRACE`](crate::faults::GRACE)
/// allows for.
const COMMON: &str = "jitter = 0.2\n\
     [timeouts]\n\
     connect = \"500ms\"\n\
     attempt = \"5s\"\n\
     request = \"15s\"\n\
     [admission]\n\
     max_wait = \"10s\"\n\
     probe_delay = \"100ms\"\n\
     probe_max_delay = \"1s\"\n";

/// Four invalid files: a value out of range, a value of the wrong form,
/// an unknown key, and a file cut short in the middle of a table.
const INVALID: [&str; 4] = [
    "max_rounds = 0\n",
    "delay = \"soon\"\n",
    "max_roundz = 2\n",
    "max_rounds = 2\n[budget\nratio = 0.2\n",
];

/// The text of write `n` (0 is the file the gateway starts with): even
/// writes are valid, odd ones invalid.
pub(crate) fn text(n: u64) -> String {
    let version = n / 2;
    if n % 2 == 1 {
        return format!(
            "# write {n}: invalid on purpose\n{}",
            INVALID[(version % 4) as usize]
        );
    }
    format!(
        "# write {n}: valid version {version}\n\
         max_rounds = {rounds}\n\
         delay = \"{delay}ms\"\n\
         {COMMON}\
         [budget]\n\
         ratio = 0.{ratio}\n\
         min_per_second = {per_second}\n",
        rounds = 2 + version % 2,
        delay = 50 + (version % 4) * 50,
        ratio = 2 + version % 3,
        per_second = 100 + version % 7,
    )
}

/// How many writes of each kind were made.
#[derive(Debug, Default)]
pub(crate) struct Writes {
    pub(crate) valid: AtomicU64,
    pub(crate) invalid: AtomicU64,
}

/// Replaces the file atomically: a temporary file renamed over it, as an
/// editor or a config management tool does.
pub(crate) fn write(path: &Path, n: u64) -> std::io::Result<()> {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text(n))?;
    std::fs::rename(&tmp, path)
}

/// Writes version 1, 2, ... once a second until `end`.
pub(crate) async fn rewrite(
    path: std::path::PathBuf,
    end: Instant,
    writes: Arc<Writes>,
) -> std::io::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut n = 1;
    loop {
        tick.tick().await;
        if Instant::now() >= end {
            return Ok(());
        }
        write(&path, n)?;
        let counter = if n % 2 == 1 {
            &writes.invalid
        } else {
            &writes.valid
        };
        counter.fetch_add(1, Ordering::Relaxed);
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_writes_are_valid_and_differ_odd_ones_are_invalid() {
        let mut last = None;
        for n in 0..40 {
            let parsed = retryctl::policy::Policy::from_toml(&text(n));
            if n % 2 == 0 {
                let policy = parsed.expect("a valid version");
                assert_ne!(Some(format!("{policy:?}")), last, "write {n}");
                last = Some(format!("{policy:?}"));
            } else {
                assert!(parsed.is_err(), "write {n} is accepted");
            }
        }
    }
}
