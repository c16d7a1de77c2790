//! The `retryctl` binary: `check` and `defaults`.

use std::process::Command;

use retryctl::Policy;

fn retryctl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_retryctl"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run retryctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn shipped_policy_is_valid_and_documents_exactly_the_defaults() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/policy.toml"))
        .unwrap();
    assert_eq!(Policy::from_toml(&text).unwrap(), Policy::default());
    let (code, out, err) = retryctl(&["check", "config/policy.toml"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("valid; effective policy"));
    assert!(out.contains("max_rounds = 2"));
    assert_eq!(Policy::from_toml(&out).unwrap(), Policy::default());
}

#[test]
fn check_names_file_line_field_and_allowed_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "max_rounds = 2\n\n[budget]\nratio = 3.0\n").unwrap();
    let (code, out, err) = retryctl(&["check", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert!(err.contains("bad.toml"), "{err}");
    assert!(err.contains("line 4"), "{err}");
    assert!(err.contains("budget.ratio"), "{err}");
    assert!(err.contains("0.0..=1.0"), "{err}");
}

#[test]
fn check_rejects_typos_garbage_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "max_round = 3\n").unwrap();
    let (code, _, err) = retryctl(&["check", typo.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("line 1") && err.contains("max_round"), "{err}");
    let garbage = dir.path().join("garbage.toml");
    std::fs::write(&garbage, [0xff, 0xfe, 0x00, 0x41]).unwrap();
    let (code, _, err) = retryctl(&["check", garbage.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("not UTF-8"), "{err}");
    let (code, _, err) = retryctl(&["check", "/nonexistent/policy.toml"]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/policy.toml"), "{err}");
}

#[test]
fn defaults_prints_a_valid_policy() {
    let (code, out, _) = retryctl(&["defaults"]);
    assert_eq!(code, 0);
    assert_eq!(Policy::from_toml(&out).unwrap(), Policy::default());
}
