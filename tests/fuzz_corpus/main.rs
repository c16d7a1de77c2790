//! The fuzz corpora, replayed as regular tests.
//!
//! Each fuzz target's body lives in `fuzz/targets/<target>.rs` and is
//! included here as it is, so `cargo test` runs every committed input of
//! `fuzz/corpus/<target>/` through the same code that libFuzzer runs (with
//! its checks), without nightly flags or sanitizers. A panic names the
//! target and the input file; reproduce it under the fuzzer with
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/corpus/<target>/<file>`
//! from the repository root.
//!
//! `properties` runs the policy target's body on generated inputs too.
//! `regressions` holds the inputs of bugs found by fuzzing, as tests that
//! are ignored until the fix lands in `src/` (see README, "Reliability").

#[path = "../../fuzz/targets/admission.rs"]
mod admission;
#[path = "../../fuzz/targets/classify.rs"]
mod classify;
#[path = "../../fuzz/targets/gateway_config.rs"]
mod gateway_config;
#[path = "../../fuzz/targets/gateway_request.rs"]
mod gateway_request;
#[path = "../../fuzz/targets/policy.rs"]
mod policy;
#[path = "../../fuzz/targets/redact.rs"]
mod redact;
#[path = "../../fuzz/targets/retry_after.rs"]
mod retry_after;

mod properties;
mod regressions;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

/// Every file of `fuzz/corpus/<target>/`, sorted (an empty or missing
/// corpus is a failure: it would make the replay pass vacuously).
fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    files
}

/// Runs `body` on every input of the target's corpus; reports every input
/// that panicked, not just the first.
fn replay(target: &str, body: fn(&[u8])) {
    let files = corpus(target);
    let mut failed = Vec::new();
    for file in &files {
        let data = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        if catch_unwind(AssertUnwindSafe(|| body(&data))).is_err() {
            failed.push(file.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: {} of {} corpus inputs panicked:\n{}",
        failed.len(),
        files.len(),
        failed.join("\n")
    );
}

#[test]
fn policy_corpus() {
    replay("policy", policy::run);
}

#[test]
fn classify_corpus() {
    replay("classify", classify::run);
}

#[test]
fn retry_after_corpus() {
    replay("retry_after", retry_after::run);
}

#[test]
fn gateway_request_corpus() {
    replay("gateway_request", gateway_request::run);
}

#[test]
fn gateway_config_corpus() {
    replay("gateway_config", gateway_config::run);
}

#[test]
fn redact_corpus() {
    replay("redact", redact::run);
}

#[test]
fn admission_corpus() {
    replay("admission", admission::run);
}
