//! Fuzz target `policy`: the policy file parser and validator.
//!
//! Input: the raw bytes of a policy file, as the reload watcher and
//! `retryctl check` read it. Shared by `fuzz/fuzz_targets/policy.rs` and
//! the corpus replay in `tests/fuzz_corpus`.
//!
//! Besides "no panic, no hang", it checks what every caller relies on:
//! an accepted policy validates, can be put in force, renders to TOML
//! that parses back to the same policy, and resolves every model it
//! overrides to a valid policy; a refused one renders its error and
//! points inside the text.

use retryctl::policy::{ActivePolicy, Policy};

/// One fuzz input.
pub fn run(data: &[u8]) {
    let parsed = Policy::from_bytes(data);
    // The UTF-8 path must agree with the bytes path (which only adds the
    // BOM and the not-UTF-8 error).
    if let Ok(text) = std::str::from_utf8(data) {
        if !text.starts_with('\u{feff}') {
            assert_eq!(
                Policy::from_toml(text),
                parsed,
                "from_toml and from_bytes disagree"
            );
        }
    }
    match parsed {
        Ok(policy) => accepted(&policy),
        Err(e) => {
            let rendered = e.to_string();
            assert!(!rendered.is_empty());
            if let Some((line, col)) = e.location {
                let lines = data.split(|&b| b == b'\n').count();
                assert!(line >= 1 && col >= 1, "location is 1-based: {e}");
                assert!(
                    line <= lines.max(1),
                    "line {line} past the text's {lines} lines: {e}"
                );
            }
        }
    }
}

fn accepted(policy: &Policy) {
    policy.validate().expect("a parsed policy validates");
    let active = ActivePolicy::new(policy.clone()).expect("a parsed policy can be put in force");
    let rendered = policy.to_toml();
    let again = Policy::from_toml(&rendered)
        .unwrap_or_else(|e| panic!("rendered policy does not parse back: {e}\n{rendered}"));
    assert_eq!(
        &again, policy,
        "rendered policy parses back differently:\n{rendered}"
    );
    for model in policy.models.keys() {
        let resolved = policy.resolve(model);
        resolved
            .validate()
            .expect("a resolved model policy validates");
        assert!(resolved.models.is_empty());
        let _ = active.for_model(model).rules().text("connection refused");
    }
}
