//! `metrics_prefix` names every metric the process exports: the pool's,
//! the policy info gauge, and the policy reload metrics. One test in its
//! own binary, because the reload thread records through the global
//! recorder, which only one test per process can install.

use std::collections::BTreeSet;
use std::io;
use std::time::{Duration, Instant};

use retryctl::policy::LivePolicy;
use retryctl::reload::{PolicyWatcher, ReloadOptions};
use retryctl::{Pool, telemetry};

const PREFIX: &str = "acme_gw_";

/// The metric family names of an exposition text (its `# TYPE` lines).
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

async fn call(pool: &Pool<bool>, model: &str) -> bool {
    pool.call(model, |ok: &bool| {
        let ok = *ok;
        async move {
            if ok {
                Ok(())
            } else {
                Err(io::Error::from(io::ErrorKind::ConnectionRefused))
            }
        }
    })
    .await
    .is_ok()
}

/// Waits until `done` holds, up to 10 s.
async fn wait_for(what: &str, done: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < Duration::from_secs(10), "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn every_exported_metric_takes_the_prefix() {
    let handle = telemetry::Recorder::new()
        .install()
        .expect("the only recorder of this binary");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, "max_rounds = 2\ndelay = \"1ms\"\n").unwrap();
    let live = LivePolicy::default();
    let options = ReloadOptions::default()
        .debounce(Duration::from_millis(10))
        .poll_interval(Some(Duration::from_millis(50)))
        .settle(Duration::ZERO)
        .metrics_prefix(PREFIX);
    let watcher = PolicyWatcher::start(&path, live.clone(), options).expect("watch");
    let pool = Pool::builder()
        .policy(live.clone())
        .metrics_prefix(PREFIX)
        .provider("m", "down", false)
        .provider("m", "up", true)
        .build()
        .unwrap();

    // Failures, retries, fallbacks, an unknown model.
    for _ in 0..5 {
        assert!(call(&pool, "m").await);
    }
    assert!(!call(&pool, "no-such-model").await);

    // A reload applied, seen by a request (the pool's info gauge), then a
    // bad file rejected.
    let status = watcher.status();
    let before = status.counts();
    std::fs::write(&path, "max_rounds = 3\ndelay = \"1ms\"\n").unwrap();
    wait_for("the new policy was never applied", || {
        status.counts().applied > before.applied
    })
    .await;
    assert!(call(&pool, "m").await);
    std::fs::write(&path, "max_rounds = \"many\"\n").unwrap();
    wait_for("the bad policy was never rejected", || {
        status.counts().rejected > before.rejected
    })
    .await;

    let text = handle.render();
    let names = families(&text);
    // The pool's families and the reload ones are all there...
    for expected in [
        "requests_total",
        "attempts_total",
        "unknown_model_requests_total",
        "attempt_duration_seconds",
        "admission_limit",
        "order_decisions_total",
        "shadow_decisions_total",
        "policy_info",
        "policy_reloads_total",
        "policy_reload_failing",
        "policy_last_reload_success_timestamp_seconds",
    ] {
        assert!(
            names.contains(&format!("{PREFIX}{expected}")),
            "{PREFIX}{expected} missing from:\n{text}"
        );
    }
    // ...and every one of them takes the prefix, none the default.
    let stray: Vec<_> = names.iter().filter(|n| !n.starts_with(PREFIX)).collect();
    assert!(stray.is_empty(), "not prefixed: {stray:?}\n{text}");
    let default: Vec<_> = names
        .iter()
        .filter(|n| n.starts_with(telemetry::DEFAULT_PREFIX))
        .collect();
    assert!(default.is_empty(), "default prefix: {default:?}\n{text}");
    // No sample line outside a prefixed family either.
    let samples: Vec<_> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter(|l| !l.starts_with(PREFIX))
        .collect();
    assert!(samples.is_empty(), "unprefixed samples: {samples:?}");

    // The policy info gauge follows the reload under the prefix: the new
    // version at 1, the one it replaced at 0.
    let hash = format!("{:016x}", live.load().version());
    assert!(
        text.contains(&format!("{PREFIX}policy_info{{hash=\"{hash}\"}} 1")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "{PREFIX}policy_reloads_total{{result=\"applied\"}}"
        )),
        "{text}"
    );
    drop(watcher);
}
