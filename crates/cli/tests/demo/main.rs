//! The demo's core on real sockets: each fault produces the socket-level
//! failure it claims, a seeded run is reproducible, and a policy that
//! retries nothing shows no reduction.

use std::sync::Arc;
use std::time::Duration;

use retryctl::policy::Policy;
use retryctl::{Cause, Classify, Rules};
use retryctl_cli::demo::{DemoConfig, Schedule};
use retryctl_testkit::faults::{ATTEMPT_HEADER, FaultServer, REQUEST_HEADER};
use retryctl_testkit::schedule::{FaultKind, Noise, NoiseRates, Window};
use tokio::time::Instant;

/// The real-time tests run one at a time: each one's timing margins assume
/// it has the machine's attention, not a sibling's burst of connections.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn window(kind: FaultKind, start_ms: u64, end_ms: u64, reset: bool) -> Window {
    Window {
        kind,
        start: Duration::from_millis(start_ms),
        end: Duration::from_millis(end_ms),
        reset,
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(200))
        .timeout(Duration::from_secs(3))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

async fn send(
    client: &reqwest::Client,
    url: &str,
    id: u64,
) -> Result<reqwest::Response, reqwest::Error> {
    client
        .post(format!("{url}/v1/chat/completions"))
        .header(REQUEST_HEADER, id)
        .header(ATTEMPT_HEADER, 1)
        .body("{}")
        .send()
        .await
}

fn cause(err: &reqwest::Error) -> Cause {
    err.classify(&Rules::default()).cause
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fault_produces_the_failure_it_claims() {
    let _serial = SERIAL.lock().await;
    let schedule = Arc::new(Schedule {
        seed: 3,
        windows: vec![
            window(FaultKind::Reload, 200, 800, false),
            window(FaultKind::Reload, 1100, 1700, true),
            window(FaultKind::Backlog, 2000, 3000, false),
            window(FaultKind::Restart, 3300, 3900, false),
        ],
        noise: NoiseRates::default(),
    });
    let epoch = Instant::now() + Duration::from_millis(100);
    let server = FaultServer::start(schedule.clone(), epoch).await.unwrap();
    let url = server.url();
    let c = client();
    let at = |ms: u64| tokio::time::sleep_until(epoch + Duration::from_millis(ms));
    // a request id with no noise
    let clean = (0..)
        .find(|&i| schedule.noise(i, 1) == Noise::None)
        .unwrap();

    at(50).await;
    assert_eq!(send(&c, &url, clean).await.unwrap().status(), 200);

    at(500).await;
    let e = send(&c, &url, clean).await.unwrap_err();
    assert_eq!(cause(&e), Cause::ConnectRefused, "reload (refuse): {e:?}");

    at(1400).await;
    let e = send(&c, &url, clean).await.unwrap_err();
    assert!(
        matches!(cause(&e), Cause::Reset | Cause::NotSent),
        "reload (reset): {e:?}"
    );
    assert!(
        server
            .counters()
            .reset
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );

    at(1850).await;
    assert_eq!(send(&c, &url, clean).await.unwrap().status(), 200);

    // A burst of new connections overflows the slow accept queue.
    at(2100).await;
    let burst: Vec<_> = (0..12)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move { send(&c, &url, clean).await })
        })
        .collect();
    let mut stalled = 0;
    let mut served = 0;
    for r in burst {
        match r.await.unwrap() {
            Ok(resp) if resp.status() == 200 => served += 1,
            Ok(resp) => panic!("unexpected {}", resp.status()),
            Err(e) => {
                assert_eq!(cause(&e), Cause::ConnectTimeout, "{e:?}");
                stalled += 1;
            }
        }
    }
    assert!(
        stalled >= 1 && served >= 1,
        "stalled {stalled}, served {served}"
    );

    at(3600).await;
    let e = send(&c, &url, clean).await.unwrap_err();
    assert_eq!(cause(&e), Cause::ConnectRefused, "restart: {e:?}");

    at(4100).await;
    assert_eq!(send(&c, &url, clean).await.unwrap().status(), 200);

    // Noise, decided per request id and attempt.
    let find = |f: fn(Noise) -> bool| (0..100_000u64).find(|&i| f(schedule.noise(i, 1))).unwrap();
    let id = find(|n| n == Noise::Status(502, None));
    assert_eq!(send(&c, &url, id).await.unwrap().status(), 502);
    let id = find(|n| n == Noise::Status(503, Some(1)));
    let resp = send(&c, &url, id).await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let id = find(|n| n == Noise::ClientError);
    assert_eq!(send(&c, &url, id).await.unwrap().status(), 400);
}

/// Windows whose edges fall midway between two requests (20 req/s: every
/// 50 ms) and between two retries (500 ms and 1 s after a request), so the
/// same requests meet the same faults on every run, even on a loaded
/// machine (25 ms of slack).
fn aligned_schedule() -> Schedule {
    Schedule {
        seed: 11,
        windows: vec![
            window(FaultKind::Reload, 1025, 1225, false),
            window(FaultKind::Reload, 2525, 2725, true),
            window(FaultKind::Restart, 4025, 5025, false),
        ],
        noise: NoiseRates {
            slow: 0.0,
            ..NoiseRates::default()
        },
    }
}

fn config(policy: Policy) -> DemoConfig {
    DemoConfig {
        seed: 11,
        rps: 20,
        duration: Duration::from_secs(6),
        policy,
        policy_file: None,
        connect_timeout: Duration::from_millis(250),
        progress: false,
    }
}

fn no_jitter() -> Policy {
    Policy {
        jitter: 0.0,
        ..Policy::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_run_gives_the_same_counts_twice() {
    let _serial = SERIAL.lock().await;
    // Rounds alone: their timing is the policy's, so the counts repeat
    // exactly (the gate's probes follow the sockets' timing).
    let rounds = || {
        let mut p = no_jitter();
        p.admission.enabled = false;
        p
    };
    let a = retryctl_cli::demo::run_schedule(&config(rounds()), aligned_schedule())
        .await
        .unwrap();
    let b = retryctl_cli::demo::run_schedule(&config(rounds()), aligned_schedule())
        .await
        .unwrap();
    assert_eq!(a.requests, 120);
    let counts = |r: &retryctl_cli::demo::DemoReport| {
        (
            r.baseline.failures,
            r.retrying.failures,
            r.baseline.attempts,
            r.retrying.attempts,
            r.faults
                .iter()
                .map(|f| (f.hit, f.baseline_failed, f.retrying_failed, f.absorbed))
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(counts(&a), counts(&b), "\n{}\n{}", a.table(), b.table());
    // The reload windows (4 requests each) are absorbed; the 1 s restart
    // is not (a retry 500 ms later finds the port still closed, except for
    // requests sent in its last 500 ms).
    let row = |k: FaultKind| a.faults.iter().find(|f| f.kind == k).unwrap().clone();
    let reload = row(FaultKind::Reload);
    assert_eq!((reload.hit, reload.baseline_failed), (8, 8));
    assert_eq!(reload.absorbed + reload.retrying_failed, 8);
    assert!(
        reload.absorbed >= 6,
        "a retry fails only on noise: {reload:?}"
    );
    let restart = row(FaultKind::Restart);
    assert_eq!((restart.hit, restart.baseline_failed), (20, 20));
    // requests sent in the first half retry into the window: 10 fail
    // (more only if a retry meets a 5xx by the schedule's noise)
    assert!((10..=12).contains(&restart.retrying_failed), "{restart:?}");
    assert_eq!(a.client_errors_retried, 0);
    // the retries that failed (into the restart, or on noise) are wasted;
    // the reload windows' absorbed requests cost one retry each, not wasted
    assert!(
        a.retrying.wasted_attempts >= restart.retrying_failed,
        "{}",
        a.table()
    );
    assert_eq!(a.baseline.wasted_attempts, 0);
    let absorbed = a.baseline.failures - a.retrying.failures;
    assert_eq!(
        a.wasted_per_absorbed,
        Some(a.retrying.wasted_attempts as f64 / absorbed as f64)
    );
    assert_eq!(a.baseline.any_attempt_failed, a.baseline.failures);
    assert!(a.retrying.any_attempt_failed >= a.baseline.failures - 2);
    let client = row(FaultKind::ClientError);
    assert_eq!(client.baseline_failed, client.retrying_failed);
    assert!(a.retrying.failures < a.baseline.failures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_waits_out_the_restart_that_rounds_cannot() {
    let _serial = SERIAL.lock().await;
    // The default policy: admission on.
    let r = retryctl_cli::demo::run_schedule(&config(no_jitter()), aligned_schedule())
        .await
        .unwrap();
    let row = |k: FaultKind| r.faults.iter().find(|f| f.kind == k).unwrap().clone();
    let restart = row(FaultKind::Restart);
    let reload = row(FaultKind::Reload);
    assert_eq!(restart.baseline_failed, 20);
    // Rounds alone lose 10-12 of these (see above); the gate none.
    assert_eq!(restart.retrying_failed, 0, "{}", r.table());
    assert_eq!(restart.absorbed, 20);
    assert_eq!(reload.retrying_failed, 0, "{}", r.table());
    assert_eq!(r.client_errors_retried, 0);
    // Only the genuine 400s fail (and at most one request on noise).
    let client = row(FaultKind::ClientError);
    assert!(
        r.retrying.failures <= client.retrying_failed + 1,
        "{}",
        r.table()
    );
    // While down, the restarted upstream saw probes, not retries: fewer
    // failed attempts than half the requests the faults hit (rounds alone
    // waste one per request the restart hit).
    assert!(
        r.retrying.wasted_attempts * 2 < restart.baseline_failed + reload.baseline_failed,
        "{}",
        r.table()
    );
    assert!(r.retrying.queued_requests > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_retries_nothing_shows_no_reduction() {
    let _serial = SERIAL.lock().await;
    // One round and no gate: nothing is ever attempted twice.
    let mut policy = Policy {
        max_rounds: 1,
        ..no_jitter()
    };
    policy.admission.enabled = false;
    let r = retryctl_cli::demo::run_schedule(&config(policy), aligned_schedule())
        .await
        .unwrap();
    assert!(r.baseline.failures > 0);
    assert_eq!(r.baseline.failures, r.retrying.failures, "{}", r.table());
    assert_eq!(r.baseline.attempts, r.retrying.attempts);
    assert_eq!(r.reduction_pct, 0.0);
    assert_eq!(r.retrying.amplification_pct, 0.0);
    assert_eq!(r.retrying.wasted_attempts, 0);
    assert_eq!(r.wasted_per_absorbed, None);
    assert!(r.table().contains("wasted per absorbed failure"));
}

#[test]
fn report_renders_json_and_svg() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let schedule = Schedule {
        seed: 5,
        windows: vec![window(FaultKind::Reload, 300, 500, false)],
        noise: NoiseRates::default(),
    };
    let cfg = DemoConfig {
        rps: 20,
        duration: Duration::from_secs(1),
        ..config(no_jitter())
    };
    let report = rt
        .block_on(async {
            let _serial = SERIAL.lock().await;
            retryctl_cli::demo::run_schedule(&cfg, schedule).await
        })
        .unwrap();
    let json = dir.path().join("r.json");
    let svg = dir.path().join("r.svg");
    report.write_json(&json).unwrap();
    report.write_svg(&svg).unwrap();
    let value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(value["requests"], 20);
    assert_eq!(value["windows"][0]["kind"], "reload");
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg"));
    assert!(text.contains("retryctl") && text.contains("baseline"));
    assert!(report.table().contains("failure reduction"));
    assert!(value["retrying"]["wasted_attempts"].is_u64(), "{value}");
    assert!(value["retrying"]["queued_p99_ms"].is_f64(), "{value}");
    assert!(value.get("wasted_per_absorbed").is_some(), "{value}");
}

// ---- demo --policy FILE: the file is followed live ------------------------------

/// Refusing windows of 150 ms every 400 ms from 200 ms to 3 s, no noise:
/// at 20 req/s, three requests meet each window.
fn refusing_every_400ms() -> Schedule {
    Schedule {
        seed: 13,
        windows: (0..7)
            .map(|i| window(FaultKind::Reload, 200 + i * 400, 350 + i * 400, false))
            .collect(),
        noise: NoiseRates {
            bad_gateway: 0.0,
            unavailable: 0.0,
            client_error: 0.0,
            slow: 0.0,
            slow_delay: Duration::ZERO,
        },
    }
}

/// Runs 3 s of the demo following `path`, which is rewritten to `edit`
/// about 1 s into the traffic.
async fn run_with_edit(
    path: &std::path::Path,
    edit: &'static str,
) -> (
    retryctl_cli::demo::runner::SideRun,
    retryctl_cli::demo::runner::SideRun,
) {
    let cfg = DemoConfig {
        duration: Duration::from_secs(3),
        policy_file: Some(path.to_owned()),
        ..config(Policy::default())
    };
    let writer = {
        let path = path.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1300)).await;
            std::fs::write(&path, edit).unwrap();
        })
    };
    let sides = retryctl_cli::demo::runner::run(&cfg, Arc::new(refusing_every_400ms()))
        .await
        .unwrap();
    writer.await.unwrap();
    sides
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_file_edited_during_the_run_changes_the_retrying_side_live() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    // Retries off at first; the gate off throughout, so that max_rounds
    // alone decides whether a refused request is re-attempted.
    std::fs::write(
        &path,
        "max_rounds = 1
jitter = 0.0
[admission]
enabled = false
",
    )
    .unwrap();
    let (baseline, retrying) = run_with_edit(
        &path,
        "max_rounds = 3
jitter = 0.0
[admission]
enabled = false
",
    )
    .await;
    let reloads = retrying.reloads.expect("the file was followed");
    assert_eq!((reloads.applied, reloads.refused), (1, 0), "{reloads:?}");
    assert_eq!(reloads.events.len(), 1, "{reloads:?}");
    let event = &reloads.events[0];
    assert_eq!(event.result, "applied");
    assert_eq!(event.detail, "max_rounds = 3");
    assert!(
        (Duration::from_millis(700)..Duration::from_millis(2000)).contains(&event.at),
        "{event:?}"
    );
    assert!(
        event.to_string().starts_with("policy reloaded at "),
        "{event}"
    );
    assert!(reloads.line().contains("1 reload applied, 0 refused"));
    assert!(reloads.last_error.is_none());

    // Before the reload (the watcher's poll and a margin earlier), a
    // refused request was not retried; after it, every one was.
    let before =
        |s: &&retryctl_cli::demo::runner::Sample| s.sent + Duration::from_millis(300) < event.at;
    let after = |s: &&retryctl_cli::demo::runner::Sample| s.sent > event.at;
    let hit_before: Vec<_> = retrying
        .samples
        .iter()
        .filter(before)
        .filter(|s| s.first_failure.is_some())
        .collect();
    assert!(hit_before.len() >= 3, "{hit_before:?}");
    assert!(
        retrying
            .samples
            .iter()
            .filter(before)
            .all(|s| s.attempts == 1),
        "max_rounds = 1 before the edit"
    );
    let hit_after: Vec<_> = retrying
        .samples
        .iter()
        .filter(after)
        .filter(|s| s.first_failure.is_some())
        .collect();
    assert!(hit_after.len() >= 6, "{hit_after:?}");
    assert!(
        hit_after.iter().all(|s| s.attempts >= 2 && s.attempts <= 3),
        "max_rounds = 3 after the edit: {hit_after:?}"
    );
    assert!(hit_after.iter().any(|s| s.ok), "{hit_after:?}");
    // The baseline keeps the policy read at start: one attempt each.
    assert!(baseline.samples.iter().all(|s| s.attempts <= 1));
    assert!(baseline.reloads.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_edit_is_refused_and_the_previous_policy_stays() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(
        &path,
        "max_rounds = 3
jitter = 0.0
[admission]
enabled = false
",
    )
    .unwrap();
    let (_, retrying) = run_with_edit(
        &path,
        "max_rounds = 0
jitter = 0.0
",
    )
    .await;
    let reloads = retrying.reloads.expect("the file was followed");
    assert_eq!(reloads.applied, 0, "{reloads:?}");
    assert!(reloads.refused >= 1, "{reloads:?}");
    let event = &reloads.events[0];
    assert_eq!(event.result, "refused", "{reloads:?}");
    assert!(
        event
            .detail
            .contains("policy.toml:1:14: `max_rounds` = 0 is invalid"),
        "{event:?}"
    );
    assert!(
        event.to_string().contains("refused")
            && event.to_string().contains("previous policy stays"),
        "{event}"
    );
    let last = reloads.last_error.as_deref().unwrap_or_default();
    assert!(last.contains("max_rounds"), "{reloads:?}");
    assert!(
        reloads
            .line()
            .contains(&format!("0 reloads applied, {} refused", reloads.refused)),
        "{}",
        reloads.line()
    );
    // max_rounds = 3 stays in force: refused requests after the edit are
    // still retried.
    let hit_after: Vec<_> = retrying
        .samples
        .iter()
        .filter(|s| s.sent > event.at && s.first_failure.is_some())
        .collect();
    assert!(hit_after.len() >= 6, "{hit_after:?}");
    assert!(hit_after.iter().all(|s| s.attempts >= 2), "{hit_after:?}");
}

// ---- demo --compare: each adaptive option against the fixed rule -------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_adaptive_option_wins_its_scenario_on_real_sockets() {
    use retryctl_cli::demo::compare::{self, ScenarioReport};
    let _serial = SERIAL.lock().await;
    let mut all = compare::scenarios(1);
    // shorter than `retryctl demo --compare`, same faults
    let mut run = async |name: &str, secs: u64| -> ScenarioReport {
        let i = all.iter().position(|s| s.name == name).unwrap();
        let s = &mut all[i];
        s.duration = Duration::from_secs(secs);
        compare::run(s, Duration::from_millis(250)).await.unwrap()
    };

    // latency order: the 800 ms provider goes last once measured
    let r = run("latency_order", 6).await;
    assert_eq!((r.fixed.failures, r.adaptive.failures), (0, 0));
    // round-robin: half the answers take 800 ms; measured (after a second
    // or two of round-robin), almost none
    assert!(r.mean_ms.0 > 350.0, "{:?}", r.mean_ms);
    assert!(r.mean_ms.1 < r.mean_ms.0 / 2.0, "{:?}", r.mean_ms);
    assert!(r.adaptive_wins());

    // learned delay: the second 1.5 s outage is waited out
    let r = run("learned_delay", 8).await;
    assert!(
        r.adaptive.failures + 20 < r.fixed.failures,
        "{} vs {}",
        r.adaptive.failures,
        r.fixed.failures
    );

    // shadow: counted on the live side, checked against the candidate run
    let r = run("shadow", 6).await;
    let e = r.shadow.expect("shadow counts");
    assert!(e.would_retry > 0 && e.saved > 0, "{e:?}");
    assert!(r.adaptive.failures < r.fixed.failures);
    assert!(e.predicted_failures < r.fixed.failures, "{e:?}");

    // deadline-aware: the retries the deadline would cut are not made
    let r = run("deadline_aware", 4).await;
    assert!(r.adaptive.attempts < r.fixed.attempts, "{r:?}");
    assert!(r.adaptive.failures <= r.fixed.failures + 2, "{r:?}");

    // adaptive attempt timeout: stalls are cut and retried
    let r = run("attempt_timeout", 4).await;
    assert!(r.adaptive.failures * 2 < r.fixed.failures, "{r:?}");

    // adaptive budget: fewer retries into a closed port
    let r = run("budget", 6).await;
    assert!(r.adaptive.attempts < r.fixed.attempts, "{r:?}");
    let table = compare::table(1, std::slice::from_ref(&r));
    assert!(
        table.contains("budget") && table.contains("verdict"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admission_scenario_counts_the_retries_wasted_on_the_demo_mix() {
    use retryctl_cli::demo::compare;
    let _serial = SERIAL.lock().await;
    let mut s = compare::scenarios(1)
        .into_iter()
        .find(|s| s.name == "admission")
        .unwrap();
    // shorter than `retryctl demo --compare`: the first reload and at
    // least 2 s of the restart
    s.duration = Duration::from_secs(6);
    let restart = s.providers[0].windows[1];
    assert_eq!(restart.kind, FaultKind::Restart);
    assert!(restart.start + Duration::from_secs(2) <= s.duration);
    assert!(!s.fixed.admission.enabled && s.adaptive.admission.enabled);
    let r = compare::run(&s, Duration::from_millis(250)).await.unwrap();
    assert_eq!(r.requests, 600);
    // Without the gate, the second round retries into the closed port.
    assert!(r.fixed.wasted_attempts > 20, "{r:?}");
    assert!(r.fixed.failures > 0, "{r:?}");
    for side in [&r.fixed, &r.adaptive] {
        assert!(side.any_attempt_failed >= side.failures, "{side:?}");
        assert!(side.wasted_attempts < side.attempts, "{side:?}");
    }
    assert_eq!(
        r.verdict().starts_with("the option wins"),
        r.adaptive_wins(),
        "{}",
        r.verdict()
    );
    let table = compare::table(1, std::slice::from_ref(&r));
    assert!(
        table.contains("wasted") && table.contains("[admission] enabled = true"),
        "{table}"
    );
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(
        json["fixed"]["wasted_attempts"].as_u64(),
        Some(r.fixed.wasted_attempts)
    );
}
