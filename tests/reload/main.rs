//! Hot reload with real files in temporary directories and the real
//! watcher: every way a file gets replaced, every kind of bad file, the
//! timer fallback, shutdown, and requests flowing through a pool while the
//! policy changes under them.
//!
//! Waiting is a bounded poll for the expected state (up to 5 s, every
//! 10 ms), never a timed assertion: latency is measured by
//! `examples/reload_latency.rs`, not asserted here.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use retryctl::Pool;
use retryctl::policy::{LivePolicy, Policy};
use retryctl::reload::{LoadError, PolicyWatcher, ReloadCounts, ReloadOptions, StartError};

const WAIT: Duration = Duration::from_secs(5);

/// Polls `done` every 10 ms for up to 5 s.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < WAIT, "gave up waiting for: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A valid policy whose `budget.min_per_second` is `n`: tells versions
/// apart with one number.
fn policy_text(n: u32) -> String {
    format!("max_rounds = 2\n\n[budget]\nmin_per_second = {n}\n")
}

fn marker(live: &LivePolicy) -> u32 {
    live.load().policy().budget.min_per_second
}

fn wait_for_marker(live: &LivePolicy, n: u32) {
    wait_until(&format!("policy {n} in force"), || marker(live) == n);
}

/// A directory holding `policy.toml` with policy 1, a live handle, and a
/// watcher following the file.
struct Setup {
    dir: tempfile::TempDir,
    path: PathBuf,
    live: LivePolicy,
    watcher: PolicyWatcher,
}

fn setup(options: ReloadOptions) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, policy_text(1)).unwrap();
    let live = LivePolicy::default();
    let watcher = PolicyWatcher::start(&path, live.clone(), options).unwrap();
    assert_eq!(marker(&live), 1, "the initial load is synchronous");
    Setup {
        dir,
        path,
        live,
        watcher,
    }
}

/// Writes `text` to a temporary file beside `path` and renames it over
/// `path`, as editors and `sed -i` do.
fn replace_by_rename(path: &Path, text: &str) {
    let tmp = path.with_extension("toml.swp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn initial_load_applies_the_file_and_a_bad_file_at_start_is_an_error() {
    let s = setup(ReloadOptions::default());
    assert_eq!(
        s.watcher.counts(),
        ReloadCounts {
            applied: 1,
            unchanged: 0,
            rejected: 0
        }
    );
    assert!(s.watcher.is_watching_events());
    assert!(s.watcher.last_error().is_none());

    let live = LivePolicy::default();
    let bad = s.dir.path().join("bad.toml");
    std::fs::write(&bad, "max_rounds = 2\njitter = 5.0\n").unwrap();
    match PolicyWatcher::start(&bad, live.clone(), ReloadOptions::default()) {
        Err(StartError::Load(e)) => {
            assert_eq!(e.policy_error().unwrap().location, Some((2, 10)), "{e}");
            assert!(e.to_string().contains("bad.toml:2:10: `jitter`"), "{e}");
        }
        other => panic!("expected a load error, got {other:?}"),
    }
    assert_eq!(live.load().policy(), &Policy::default(), "nothing stored");
    let missing = s.dir.path().join("missing.toml");
    match PolicyWatcher::start(&missing, live, ReloadOptions::default()) {
        Err(StartError::Load(e)) => assert!(e.is_not_found(), "{e}"),
        other => panic!("expected a load error, got {other:?}"),
    }
}

#[test]
fn in_place_write_applies() {
    let s = setup(ReloadOptions::default());
    std::fs::write(&s.path, policy_text(2)).unwrap();
    wait_for_marker(&s.live, 2);
    wait_until("counted", || s.watcher.counts().applied == 2);
    assert!(s.watcher.last_error().is_none());
}

#[test]
fn write_to_temp_and_rename_applies() {
    let s = setup(ReloadOptions::default());
    replace_by_rename(&s.path, &policy_text(2));
    wait_for_marker(&s.live, 2);
    replace_by_rename(&s.path, &policy_text(3));
    wait_for_marker(&s.live, 3);
}

#[test]
fn deleted_file_keeps_the_last_good_policy_and_a_recreated_file_applies() {
    let s = setup(ReloadOptions::default());
    std::fs::remove_file(&s.path).unwrap();
    wait_until("the deletion is seen", || {
        s.watcher.last_error().is_some_and(|e| e.is_not_found())
    });
    assert_eq!(marker(&s.live), 1, "the last good policy stays");
    assert!(s.watcher.counts().rejected >= 1);
    std::fs::write(&s.path, policy_text(2)).unwrap();
    wait_for_marker(&s.live, 2);
    wait_until("the error clears", || s.watcher.last_error().is_none());
}

/// The layout kubelet gives a mounted ConfigMap, and its update: a new
/// timestamped directory, a temporary `..data_tmp` symlink renamed over
/// `..data`, then the old directory removed.
#[cfg(unix)]
#[test]
fn kubernetes_configmap_symlink_swap_applies() {
    use std::os::unix::fs::symlink;

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let first = root.join("..2026_01_01_00_00_00.000000001");
    std::fs::create_dir(&first).unwrap();
    std::fs::write(first.join("policy.toml"), policy_text(1)).unwrap();
    symlink("..2026_01_01_00_00_00.000000001", root.join("..data")).unwrap();
    symlink("..data/policy.toml", root.join("policy.toml")).unwrap();

    let live = LivePolicy::default();
    let watcher = PolicyWatcher::start(
        root.join("policy.toml"),
        live.clone(),
        ReloadOptions::default(),
    )
    .unwrap();
    assert_eq!(marker(&live), 1);

    for (n, stamp) in [
        (2, "..2026_01_02_00_00_00.000000002"),
        (3, "..2026_01_03_00_00_00.000000003"),
    ] {
        let old = std::fs::read_link(root.join("..data")).unwrap();
        let new = root.join(stamp);
        std::fs::create_dir(&new).unwrap();
        std::fs::write(new.join("policy.toml"), policy_text(n)).unwrap();
        symlink(stamp, root.join("..data_tmp")).unwrap();
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        std::fs::remove_dir_all(root.join(old)).unwrap();
        wait_for_marker(&live, n);
    }
    assert!(watcher.last_error().is_none());
    assert_eq!(watcher.counts().rejected, 0, "{:?}", watcher.counts());
}

#[test]
fn burst_of_50_writes_ends_on_the_last_one() {
    let s = setup(ReloadOptions::default());
    let before = s.watcher.counts().applied;
    for n in 100..150 {
        std::fs::write(&s.path, policy_text(n)).unwrap();
    }
    wait_for_marker(&s.live, 149);
    // Nothing older may come after the last one: give the watcher time to
    // handle any event still queued, then look again.
    let settled = s.watcher.counts();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(marker(&s.live), 149);
    let applies = s.watcher.counts().applied - before;
    assert!(
        (1..=50).contains(&applies),
        "{applies} applies for 50 writes"
    );
    // In-place writes are not atomic: a last file read half-written that
    // happens to parse (and carries the marker) can be applied, then the
    // whole one. At most that one more apply; nothing older.
    assert!(
        s.watcher.counts().applied - settled.applied <= 1,
        "{:?} after {settled:?}",
        s.watcher.counts()
    );
    eprintln!("50 writes -> {applies} applies");
}

/// Writes a bad file: the old policy stays, the error names the line (and
/// contains `fragment`); then a good file applies and clears the error.
fn assert_rejected(bad: &[u8], line: usize, fragment: &str) {
    let s = setup(ReloadOptions::default());
    let rejected = s.watcher.counts().rejected;
    std::fs::write(&s.path, bad).unwrap();
    wait_until("the bad file is rejected", || {
        s.watcher.counts().rejected > rejected
    });
    let e = s.watcher.last_error().expect("an error is kept");
    let policy_error = e.policy_error().expect("a policy error");
    assert_eq!(policy_error.location.map(|l| l.0), Some(line), "{e}");
    assert!(e.to_string().contains(fragment), "{e}");
    assert!(
        e.to_string().contains("policy.toml:"),
        "names the file: {e}"
    );
    assert_eq!(marker(&s.live), 1, "the last good policy stays");
    assert!(matches!(&*e, LoadError::Invalid { .. }));

    std::fs::write(&s.path, policy_text(2)).unwrap();
    wait_for_marker(&s.live, 2);
    wait_until("the error clears", || s.watcher.last_error().is_none());
}

#[test]
fn syntax_error_keeps_the_old_policy() {
    assert_rejected(
        b"max_rounds = 2\n[budget\nratio = 0.5\n",
        2,
        "policy.toml:2:",
    );
}

#[test]
fn unknown_key_keeps_the_old_policy() {
    assert_rejected(
        b"max_rounds = 2\n\n[budget]\nratioo = 0.5\n",
        4,
        "`budget.ratioo`",
    );
}

#[test]
fn out_of_range_value_keeps_the_old_policy() {
    assert_rejected(
        b"max_rounds = 2\n[models.\"openai/gpt-oss-120b\".budget]\nratio = 1.5\n",
        3,
        "policy.toml:3:9: `models.\"openai/gpt-oss-120b\".budget.ratio` = 1.5 is invalid",
    );
}

#[test]
fn wrong_type_keeps_the_old_policy() {
    assert_rejected(b"\n\nmax_rounds = \"two\"\n", 3, "`max_rounds`");
}

#[test]
fn binary_garbage_keeps_the_old_policy() {
    assert_rejected(b"max_rounds = 2\n\xff\xfe\x00\x01garbage", 2, "not UTF-8");
    assert_rejected(b"\x00\x01\x02\x03\x04", 1, "policy.toml:1:");
}

#[test]
fn empty_file_is_valid_and_applies_the_defaults() {
    let s = setup(ReloadOptions::default());
    std::fs::write(&s.path, "").unwrap();
    wait_until("the defaults apply", || {
        *s.live.load().policy() == Policy::default()
    });
    assert!(s.watcher.last_error().is_none());
    assert_eq!(s.watcher.counts().rejected, 0);
}

#[test]
fn per_model_overrides_in_the_file_reach_for_model() {
    let s = setup(ReloadOptions::default());
    std::fs::write(
        &s.path,
        "[models.\"openai/gpt-oss-120b\"]\nmax_rounds = 3\n[models.\"openai/gpt-oss-120b\".budget]\nratio = 0.5\n",
    )
    .unwrap();
    wait_until("the override applies", || {
        s.live
            .load()
            .for_model("openai/gpt-oss-120b")
            .policy()
            .max_rounds
            == 3
    });
    let active = s.live.load();
    let big = active.for_model("openai/gpt-oss-120b").policy();
    assert_eq!(big.budget.ratio, 0.5);
    assert_eq!(active.for_model("other").policy().max_rounds, 2);
}

#[test]
fn touching_the_file_without_changing_it_is_unchanged() {
    let s = setup(ReloadOptions::default());
    let before = s.watcher.counts();
    // Same content, rewritten: events fire, the content hash says no.
    std::fs::write(&s.path, policy_text(1)).unwrap();
    wait_until("the re-read is counted", || {
        s.watcher.counts().unchanged > before.unchanged
    });
    assert_eq!(s.watcher.counts().applied, before.applied);
    // A new file with the same policy written differently: same policy.
    replace_by_rename(&s.path, "[budget]\nmin_per_second = 1 # same\n");
    wait_until("the re-read is counted", || {
        s.watcher.counts().unchanged > before.unchanged + 1
    });
    assert_eq!(s.watcher.counts().applied, before.applied);
}

#[test]
fn timer_rereads_when_no_events_arrive() {
    let s = setup(
        ReloadOptions::default()
            .events(false)
            .poll_interval(Some(Duration::from_millis(50))),
    );
    assert!(!s.watcher.is_watching_events());
    std::fs::write(&s.path, policy_text(2)).unwrap();
    wait_for_marker(&s.live, 2);
    wait_until("polls keep coming", || s.watcher.counts().unchanged >= 2);
}

#[test]
fn reload_now_rereads_without_events_or_timer() {
    let s = setup(ReloadOptions::default().events(false).poll_interval(None));
    std::fs::write(&s.path, policy_text(2)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(marker(&s.live), 1, "nothing re-reads by itself");
    s.watcher.reload_now();
    wait_for_marker(&s.live, 2);
}

#[test]
fn drop_stops_watching_and_joins_the_thread() {
    let s = setup(ReloadOptions::default().poll_interval(Some(Duration::from_millis(20))));
    std::fs::write(&s.path, policy_text(2)).unwrap();
    wait_for_marker(&s.live, 2);
    let status = s.watcher.status();
    assert!(Arc::strong_count(&status) >= 3, "watcher, thread, test");
    drop(s.watcher);
    // The reload thread held the other handle: it has exited.
    assert_eq!(Arc::strong_count(&status), 1);
    let counts = status.counts();
    std::fs::write(&s.path, policy_text(3)).unwrap();
    replace_by_rename(&s.path, &policy_text(4));
    // Longer than a debounce, a settle and many timer periods.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(marker(&s.live), 2, "no longer followed");
    assert_eq!(status.counts(), counts);
}

/// Requests through a pool while the file is replaced 100 times: none
/// fails. Every other call is refused once and retried, so the policy in
/// force matters on every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_flow_while_the_policy_is_replaced_100_times() {
    fn text(n: u32) -> String {
        // Always at least 2 rounds, a 1 ms delay and no budget, so a
        // request fails only if a swap breaks it. The admission gate is
        // not under test: at 4 in flight it would take a provider that
        // refuses every other connect down for a probe delay at a time
        // (tests/admission), and the traffic here would mostly wait.
        format!(
            "max_rounds = {}\ndelay = \"1ms\"\nmax_delay = \"2ms\"\n[admission]\nenabled = false\n[budget]\nenabled = false\nmin_per_second = {n}\n\
             [models.m]\nmax_rounds = {}\n[models.m.health]\ndemote_after = {}\n",
            2 + n % 3,
            2 + n % 5,
            1 + n,
        )
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, text(0)).unwrap();
    let live = LivePolicy::default();
    let watcher = PolicyWatcher::start(
        &path,
        live.clone(),
        ReloadOptions::default()
            .debounce(Duration::from_millis(10))
            .settle(Duration::ZERO),
    )
    .unwrap();
    let pool = Arc::new(
        Pool::builder()
            .provider("m", "p", ())
            .policy(live.clone())
            .build()
            .unwrap(),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (pool, stop, served, failed) =
            (pool.clone(), stop.clone(), served.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let mut attempt = 0;
                let result = pool
                    .call("m", |_: &()| {
                        attempt += 1;
                        let refuse = i % 2 == 0 && attempt == 1;
                        async move {
                            if refuse {
                                Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
                            } else {
                                Ok(())
                            }
                        }
                    })
                    .await;
                match result {
                    Ok(_) => served.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("request failed: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                tokio::task::yield_now().await;
            }
        }));
    }

    let live_w = live.clone();
    let swaps = tokio::task::spawn_blocking(move || {
        for n in 1..=100 {
            // Atomic replacement: an in-place write can be seen truncated,
            // and an empty file is the (valid) default policy.
            replace_by_rename(&path, &text(n));
            wait_until(&format!("policy {n}"), || {
                live_w.load().policy().budget.min_per_second == n
            });
        }
    });
    swaps.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let counts = watcher.counts();
    assert!(counts.applied >= 101, "{counts:?}");
    assert_eq!(counts.rejected, 0, "{counts:?}");
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(served.load(Ordering::Relaxed) > 100, "traffic flowed");
    let active = live.load();
    assert_eq!(active.for_model("m").policy().health.demote_after, 101);
}
