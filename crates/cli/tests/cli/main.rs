//! The `retryctl` binary: `check`, `defaults`, and `demo --compare`'s options.

use std::process::Command;

use retryctl::policy::Policy;

fn retryctl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_retryctl"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
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
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../config/policy.toml"
    ))
    .unwrap();
    assert_eq!(Policy::from_toml(&text).unwrap(), Policy::default());
    let (code, out, err) = retryctl(&["check", "config/policy.toml"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("valid; effective policy"));
    assert!(out.contains("max_rounds = 2"));
    assert_eq!(Policy::from_toml(&out).unwrap(), Policy::default());
}

#[test]
fn shipped_override_example_is_valid_when_uncommented() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../config/policy.toml"
    ))
    .unwrap();
    let start = text.find("# [models.").expect("an override example");
    let (head, example) = text.split_at(start);
    let uncommented: String = example
        .lines()
        .map(|l| l.strip_prefix("# ").or(l.strip_prefix("#")).unwrap_or(l))
        .map(|l| format!("{l}\n"))
        .collect();
    let policy = Policy::from_toml(&format!("{head}{uncommented}")).unwrap();
    let big = policy.resolve("openai/gpt-oss-120b");
    assert_eq!((big.max_rounds, big.budget.ratio), (3, 0.5));
    assert_eq!(big.timeouts.attempt, std::time::Duration::from_secs(180));
    assert_eq!(policy.resolve("other"), policy.resolve("unknown"));
}

#[test]
fn check_names_file_line_column_field_and_allowed_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "max_rounds = 2\n\n[budget]\nratio = 3.0\n").unwrap();
    let (code, out, err) = retryctl(&["check", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    let first = err.lines().next().unwrap();
    assert!(first.starts_with("error: "), "{err}");
    assert!(
        first.ends_with("bad.toml:4:9: `budget.ratio` = 3.0 is invalid: a number within 0.0..=1.0"),
        "{err}"
    );
    // The offending line, with a caret under the value.
    assert!(err.contains("\n4 | ratio = 3.0\n  |         ^\n"), "{err}");
}

#[test]
fn check_names_the_full_path_of_a_model_override() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("models.toml");
    let write = |text: &str| std::fs::write(&path, text).unwrap();
    let check = || retryctl(&["check", path.to_str().unwrap()]);

    write("[models.\"openai/gpt-oss-120b\".budget]\nratio = 1.5\n");
    let (code, _, err) = check();
    assert_eq!(code, 1);
    assert!(
        err.contains(
            "models.toml:2:9: `models.\"openai/gpt-oss-120b\".budget.ratio` = 1.5 is invalid"
        ),
        "{err}"
    );
    write("[models.\"gpt-4.1\"]\nmax_rounds = 3\n[models.\"gpt-4.1\".health]\ndemote_afterr = 3\n");
    let (code, _, err) = check();
    assert_eq!(code, 1);
    assert!(
        err.contains("models.toml:4:1: `models.\"gpt-4.1\".health.demote_afterr`: unknown field"),
        "{err}"
    );
    write("[models.small.timeouts]\nattempt = \"1s\"\n");
    let (code, _, err) = check();
    assert_eq!(code, 1);
    assert!(
        err.contains("models.toml:1:1: `models.\"small\".timeouts.connect`"),
        "{err}"
    );
    assert!(err.contains("inherited"), "{err}");

    write("[models.\"openai/gpt-oss-120b\"]\nmax_rounds = 3\n");
    let (code, out, err) = check();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("per-model overrides"), "{out}");
    let printed = Policy::from_toml(&out).unwrap();
    assert_eq!(printed.resolve("openai/gpt-oss-120b").max_rounds, 3);
}

#[test]
fn check_rejects_typos_garbage_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "max_round = 3\n").unwrap();
    let (code, _, err) = retryctl(&["check", typo.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("typo.toml:1:1: `max_round`"), "{err}");
    assert!(err.contains("unknown field"), "{err}");

    let garbage = dir.path().join("garbage.toml");
    std::fs::write(&garbage, b"max_rounds = 2\n\xff\xfe\x00\x41").unwrap();
    let (code, _, err) = retryctl(&["check", garbage.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("garbage.toml:2:1: not UTF-8"), "{err}");

    // Valid UTF-8 but not TOML: control characters, printed harmlessly.
    let control = dir.path().join("control.toml");
    std::fs::write(&control, b"\x1b[31m\x00\x07").unwrap();
    let (code, _, err) = retryctl(&["check", control.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("control.toml:1:"), "{err}");
    assert!(!err.contains('\u{1b}') && !err.contains('\u{7}'), "{err:?}");

    let (code, _, err) = retryctl(&["check", "/nonexistent/policy.toml"]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/policy.toml"), "{err}");
    let (code, _, err) = retryctl(&["check", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("not a regular file"), "{err}");
}

#[test]
fn check_accepts_an_empty_file_as_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    let (code, out, err) = retryctl(&["check", empty.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(Policy::from_toml(&out).unwrap(), Policy::default());
}

#[test]
fn defaults_prints_a_valid_policy() {
    let (code, out, _) = retryctl(&["defaults"]);
    assert_eq!(code, 0);
    assert_eq!(Policy::from_toml(&out).unwrap(), Policy::default());
}

#[test]
fn demo_compare_names_its_scenarios() {
    let (code, _, err) = retryctl(&["demo", "--compare", "--scenario", "nope"]);
    assert_eq!(code, 1);
    for name in [
        "latency_order",
        "learned_delay",
        "shadow",
        "deadline_aware",
        "attempt_timeout",
        "budget",
        "admission",
    ] {
        assert!(err.contains(name), "{err}");
    }
    // --scenario only with --compare
    let (code, _, _) = retryctl(&["demo", "--scenario", "shadow"]);
    assert_eq!(code, 2);
    let (code, help, _) = retryctl(&["demo", "--help"]);
    assert_eq!(code, 0);
    assert!(help.contains("budget, admission)"), "{help}");
}

#[test]
fn demo_follows_its_policy_file_and_reports_the_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(
        &path,
        "max_rounds = 2
",
    )
    .unwrap();
    let json = dir.path().join("report.json");
    let child = Command::new(env!("CARGO_BIN_EXE_retryctl"))
        .args([
            "demo",
            "--duration",
            "3s",
            "--rps",
            "20",
            "--quiet",
            "--metrics-addr",
            "127.0.0.1:0",
            "--policy",
            path.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run retryctl");
    std::thread::sleep(std::time::Duration::from_millis(1200));
    std::fs::write(
        &path,
        "max_rounds = 3
[admission]
enabled = false
",
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(800));
    std::fs::write(
        &path,
        "max_rounds = 3
[budget]
ratio = 3.0
",
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("following "), "{stderr}");
    let applied = stderr
        .lines()
        .find(|l| l.starts_with("policy reloaded at "))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        applied.ends_with(": admission.enabled = false, max_rounds = 3"),
        "{applied}"
    );
    let refused = stderr
        .lines()
        .find(|l| l.starts_with("policy reload refused at "))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        refused.contains("the previous policy stays: ")
            && refused.contains("policy.toml:3:9: `budget.ratio` = 3.0 is invalid"),
        "{refused}"
    );
    assert!(
        stdout.contains("1 reload applied, 1 refused (still refused: "),
        "{stdout}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let reloads = &report["reloads"];
    assert_eq!(
        (reloads["applied"].as_u64(), reloads["refused"].as_u64()),
        (Some(1), Some(1)),
        "{reloads}"
    );
    assert_eq!(reloads["events"][0]["result"], "applied");
    assert_eq!(reloads["events"][1]["result"], "refused");
}

#[test]
fn demo_refuses_a_bad_policy_file_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "max_rounds = 2
[admission]
enabled = \"yes\"
",
    )
    .unwrap();
    let (code, out, err) = retryctl(&[
        "demo",
        "--quiet",
        "--metrics-addr",
        "127.0.0.1:0",
        "--policy",
        path.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("bad.toml:3:11: `admission.enabled`"), "{err}");
}

#[test]
fn check_names_the_shadow_and_auto_delay_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "delay = \"auto\"\n[shadow]\nmax_rounds = 0\n").unwrap();
    let (code, _, err) = retryctl(&["check", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains(":3:14") && err.contains("shadow.max_rounds"),
        "{err}"
    );
}

#[test]
fn shipped_shadow_example_is_valid_when_uncommented() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../config/policy.toml"
    ))
    .unwrap();
    let start = text.find("# [shadow]").expect("a shadow example");
    let end = start + text[start..].find("\n\n").expect("the example's end");
    let uncommented: String = text[start..end]
        .lines()
        .map(|l| l.strip_prefix("# ").or(l.strip_prefix("#")).unwrap_or(l))
        .map(|l| format!("{l}\n"))
        .collect();
    let policy = Policy::from_toml(&format!("{}{uncommented}", &text[..start])).unwrap();
    let candidate = policy.shadow_candidate().expect("a candidate");
    assert_eq!((candidate.max_rounds, candidate.budget.ratio), (3, 0.3));
}

#[test]
fn check_names_an_admission_error_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "max_rounds = 2\n\n[admission]\ndecrease = 1.5\n").unwrap();
    let (code, out, err) = retryctl(&["check", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    let first = err.lines().next().unwrap();
    assert!(
        first.ends_with(
            "bad.toml:4:12: `admission.decrease` = 1.5 is invalid: a number within 0.1..=0.9"
        ),
        "{err}"
    );
    assert!(
        err.contains("\n4 | decrease = 1.5\n  |            ^\n"),
        "{err}"
    );

    std::fs::write(&bad, "[models.\"m\".admission]\nmax_wait = \"1h\"\n").unwrap();
    let (code, _, err) = retryctl(&["check", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("bad.toml:2:12: `models.\"m\".admission.max_wait` = \"1h\" is invalid"),
        "{err}"
    );
}

#[test]
fn defaults_and_check_print_the_admission_table() {
    let (code, out, _) = retryctl(&["defaults"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("\n[admission]\nenabled = true\nmax_wait = \"10s\"\n"),
        "{out}"
    );
    let (code, out, err) = retryctl(&["check", "config/policy.toml"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\n[admission]\n"), "{out}");
}

#[test]
fn shipped_policy_writes_out_every_admission_field() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../config/policy.toml"
    ))
    .unwrap();
    let keys = |text: &str| -> Vec<String> {
        let table: toml::Table = toml::from_str(text).unwrap();
        let admission = table.get("admission").and_then(|a| a.as_table());
        let mut keys: Vec<String> = admission
            .expect("an [admission] table")
            .keys()
            .cloned()
            .collect();
        keys.sort();
        keys
    };
    assert_eq!(keys(&text), keys(&Policy::default().to_toml()));
    assert!(
        text.contains("spends no retry budget"),
        "the budget is explained"
    );
}
