//! Pool behaviour under paused tokio time: rounds, delays, classification,
//! budget, deadline, health and cancellation. No real sleeps.
//!
//! These tests exercise the round mechanism, and most use a refused
//! connection as their transient failure: [`pool`] builds every pool with
//! `admission.enabled = false`, the configuration in which such a failure
//! is retried in rounds (with admission on, it waits at the provider's
//! gate instead: tests/admission).

mod script;
#[path = "../support/test_error.rs"]
mod test_error;

use std::sync::Arc;
use std::time::Duration;

use retryctl::policy::{BudgetPolicy, HealthPolicy, LivePolicy, Policy};
use retryctl::{CallOptions, Cause, Classification, FailReason, Pool, PoolError, Served};
use retryctl_testkit::LogBuffer;
use script::{Scripted, Step, TestError, refused};
use tokio::time::Instant;

const MODEL: &str = "openai/gpt-oss-120b";

type P = Arc<Scripted>;
type Outcome = Result<Served<&'static str>, PoolError<TestError>>;

fn pool(providers: impl IntoIterator<Item = P>, policy: Policy) -> Pool<P> {
    let mut b = Pool::builder().policy(LivePolicy::new(rounds_only(policy)).unwrap());
    for p in providers {
        b = b.provider(MODEL, p.name, p);
    }
    b.build().unwrap()
}

/// `policy` without the admission gate.
fn rounds_only(mut policy: Policy) -> Policy {
    policy.admission.enabled = false;
    policy
}

async fn call(pool: &Pool<P>) -> Outcome {
    pool.call(MODEL, |p: &P| p.attempt()).await
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

// ---- the production fix's four cases -------------------------------------

#[tokio::test(start_paused = true)]
async fn connection_error_retries_once_after_500ms_with_jitter() {
    for _ in 0..20 {
        let a = Scripted::new("a", vec![refused(), refused()]);
        let pool = pool([a.clone()], Policy::default());
        let err = call(&pool).await.unwrap_err();
        assert_eq!(err.reason, FailReason::RoundsExhausted);
        assert_eq!(
            (err.report.attempts, err.report.rounds, err.report.retries),
            (2, 2, 1)
        );
        let t = a.times();
        let gap = t[1] - t[0];
        assert!(
            (400..=600).contains(&ms(gap)),
            "wait {gap:?} outside 500ms +/- 20%"
        );
        assert_eq!(err.report.waited, gap);
        assert!(
            err.report
                .failures()
                .iter()
                .all(|f| f.verdict.cause == Cause::ConnectRefused)
        );
    }
}

#[tokio::test(start_paused = true)]
async fn json_parse_failure_is_not_retried() {
    let a = Scripted::new("a", vec![Step::Text("expected value at line 1 column 1")]);
    let pool = pool([a.clone()], Policy::default());
    let err = call(&pool).await.unwrap_err();
    assert_eq!(err.reason, FailReason::NotRetryable);
    assert_eq!((err.report.attempts, err.report.rounds), (1, 1));
    assert_eq!(a.count(), 1);
    assert_eq!(
        err.report.failures()[0].verdict.class,
        Classification::TryNext
    );
    assert_eq!(err.report.waited, Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn status_502_retries_once() {
    let a = Scripted::new("a", vec![Step::Status(502, None)]);
    let pool = pool([a.clone()], Policy::default());
    let err = call(&pool).await.unwrap_err();
    assert_eq!(err.reason, FailReason::RoundsExhausted);
    assert_eq!(a.count(), 2);
    assert_eq!(err.report.failures()[1].verdict.cause, Cause::Unavailable);
    assert_eq!(err.report.failures()[1].round, 2);
}

#[tokio::test(start_paused = true)]
async fn second_attempt_success_is_returned() {
    let a = Scripted::new("a", vec![refused(), Step::Ok]);
    let pool = pool([a.clone()], Policy::default());
    let start = Instant::now();
    let served = call(&pool).await.unwrap();
    assert_eq!(served.value, "a");
    assert_eq!(
        (served.attempts(), served.rounds(), served.report.retries),
        (2, 2, 1)
    );
    assert!(!served.fell_back);
    assert_eq!(served.report.failures().len(), 1);
    let waited = Instant::now() - start;
    assert!((400..=600).contains(&ms(waited)), "{waited:?}");
}

#[tokio::test(start_paused = true)]
async fn success_first_time_costs_one_attempt_and_no_wait() {
    let a = Scripted::new("a", vec![Step::Ok]);
    let pool = pool([a.clone()], Policy::default());
    let start = Instant::now();
    let served = call(&pool).await.unwrap();
    assert_eq!(
        (served.attempts(), served.rounds(), served.report.retries),
        (1, 1, 0)
    );
    assert_eq!(Instant::now(), start);
    assert!(served.report.failures().is_empty());
}

/// An operation that takes `took` and counts its polls.
struct CountedPolls {
    polls: Arc<std::sync::atomic::AtomicUsize>,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl std::future::Future for CountedPolls {
    type Output = Result<&'static str, TestError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        self.polls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.sleep.as_mut().poll(cx).map(|()| Ok("ok"))
    }
}

#[tokio::test(start_paused = true)]
async fn an_attempt_is_polled_again_only_when_it_wakes() {
    // An HTTP client's request future is a deep stack of futures: a poll
    // that nothing woke walks all of it for nothing. The attempt's first
    // poll sends the request; the next one is the answer's.
    for admission in [false, true] {
        let mut policy = Policy::default();
        policy.admission.enabled = admission;
        let pool: Pool<()> = Pool::builder()
            .policy(LivePolicy::new(policy).unwrap())
            .provider(MODEL, "a", ())
            .build()
            .unwrap();
        let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let start = Instant::now();
        let served = pool
            .call(MODEL, |_| CountedPolls {
                polls: polls.clone(),
                sleep: Box::pin(tokio::time::sleep(Duration::from_millis(10))),
            })
            .await
            .unwrap();
        assert_eq!(served.value, "ok");
        assert_eq!(Instant::now() - start, Duration::from_millis(10));
        assert_eq!(
            polls.load(std::sync::atomic::Ordering::Relaxed),
            2,
            "admission {admission}"
        );
    }
}

// ---- the review's findings ------------------------------------------------

#[tokio::test(start_paused = true)]
async fn demotion_needs_ten_failed_requests_not_five() {
    let a = Scripted::new("a", vec![refused()]);
    let b = Scripted::new("b", vec![Step::Ok]);
    let pool = pool([a.clone(), b.clone()], Policy::default());
    let demoted = |pool: &Pool<P>| {
        pool.stats()
            .iter()
            .find(|s| s.provider == "a")
            .map(|s| (s.health.consecutive_failures, s.health.demoted))
            .unwrap()
    };
    // Requests that reach `a` in both rounds: b fails too, then recovers.
    b.set(vec![refused()]);
    for i in 1..=9 {
        let err = call(&pool).await.unwrap_err();
        assert_eq!(err.report.attempts, 4, "2 providers x 2 rounds");
        assert_eq!(demoted(&pool), (i, false), "after request {i}");
    }
    let _ = call(&pool).await.unwrap_err();
    assert_eq!(demoted(&pool), (10, true));
    assert_eq!(a.count(), 20, "a failed 20 attempts over 10 requests");
}

#[tokio::test(start_paused = true)]
async fn four_xx_from_first_of_three_providers_is_one_attempt() {
    let ps: Vec<P> = ["a", "b", "c"]
        .into_iter()
        .map(|n| Scripted::new(n, vec![Step::Status(400, None)]))
        .collect();
    let pool = pool(ps.clone(), Policy::default());
    let err = call(&pool).await.unwrap_err();
    assert_eq!(err.reason, FailReason::Permanent);
    assert!(err.is_client_error());
    assert_eq!((err.report.attempts, err.report.rounds), (1, 1));
    let total: usize = ps.iter().map(|p| p.count()).sum();
    assert_eq!(total, 1);
    assert!(
        err.to_string().contains("after 1 attempt in 1 round"),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn permanent_errors_never_touch_health() {
    let a = Scripted::new("a", vec![Step::Status(400, None)]);
    let pool = pool([a.clone()], Policy::default());
    for _ in 0..50 {
        assert_eq!(call(&pool).await.unwrap_err().reason, FailReason::Permanent);
    }
    let h = &pool.stats()[0].health;
    assert_eq!((h.consecutive_failures, h.demoted), (0, false));
}

// ---- per-provider decisions ----------------------------------------------

#[tokio::test(start_paused = true)]
async fn retry_round_covers_only_providers_whose_own_error_was_retryable() {
    // a: transient, b: model not found, c: unparseable response
    let a = Scripted::new("a", vec![refused(), Step::Ok]);
    let b = Scripted::new("b", vec![Step::Status(404, None)]);
    let c = Scripted::new("c", vec![Step::Text("invalid json")]);
    let pool = pool([a.clone(), b.clone(), c.clone()], Policy::default());
    let served = call(&pool).await.unwrap();
    assert_eq!(served.value, "a");
    assert_eq!((a.count(), b.count(), c.count()), (2, 1, 1));
    assert_eq!((served.attempts(), served.rounds()), (4, 2));
    // no wait between different providers in round 1
    assert_eq!(b.times()[0], a.times()[0]);
    assert_eq!(c.times()[0], a.times()[0]);
    let causes: Vec<_> = served
        .report
        .failures()
        .iter()
        .map(|f| f.verdict.cause)
        .collect();
    assert_eq!(
        causes,
        vec![Cause::ConnectRefused, Cause::NextProvider, Cause::Opaque]
    );
}

#[tokio::test(start_paused = true)]
async fn last_error_non_retryable_does_not_hide_an_earlier_transient_one() {
    // The first fix looked only at the last provider's error.
    let a = Scripted::new("a", vec![refused(), Step::Ok]);
    let b = Scripted::new("b", vec![Step::Status(404, None)]);
    let pool = pool([a.clone(), b.clone()], Policy::default());
    let served = call(&pool).await.unwrap();
    assert_eq!((served.value, served.rounds()), ("a", 2));
}

#[tokio::test(start_paused = true)]
async fn falls_back_without_waiting() {
    let a = Scripted::new("a", vec![refused()]);
    let b = Scripted::new("b", vec![Step::Ok]);
    let pool = pool([a.clone(), b.clone()], Policy::default());
    let start = Instant::now();
    let served = call(&pool).await.unwrap();
    assert_eq!(served.value, "b");
    assert!(served.fell_back);
    assert_eq!((served.attempts(), served.rounds()), (2, 1));
    assert_eq!(Instant::now(), start, "no wait when switching provider");
}

#[tokio::test(start_paused = true)]
async fn healthy_providers_rotate_round_robin() {
    let ps: Vec<P> = ["a", "b", "c"]
        .into_iter()
        .map(|n| Scripted::new(n, vec![Step::Ok]))
        .collect();
    let pool = pool(ps.clone(), Policy::default());
    let mut served = Vec::new();
    for _ in 0..6 {
        served.push(call(&pool).await.unwrap().value);
    }
    assert_eq!(served, vec!["a", "b", "c", "a", "b", "c"]);
}

/// Sends requests until `a`, the first of two providers and failing, is
/// demoted after `demote_after` failures. Round robin puts `a` first in
/// every other request and `b` serves each one, so that takes at most
/// `2 * demote_after` requests: past that the test fails instead of
/// looping on.
async fn demote_first(pool: &Pool<P>, a: &Scripted, demote_after: u32) {
    let most = 2 * demote_after as usize;
    let mut requests = 0;
    while !pool.stats()[0].health.demoted {
        assert!(
            requests < most,
            "{} not demoted after {requests} requests ({} failed attempts, demote_after = \
             {demote_after}): {:?}",
            a.name,
            a.count(),
            pool.stats()[0].health
        );
        assert_eq!(call(pool).await.unwrap().value, "b");
        requests += 1;
    }
    assert_eq!(
        a.count(),
        demote_after as usize,
        "demoted after exactly demote_after failed requests"
    );
}

#[tokio::test(start_paused = true)]
async fn demoted_goes_to_back_then_probe_recovers_it() {
    let policy = Policy {
        health: HealthPolicy {
            demote_after: 2,
            cooldown: Duration::from_secs(30),
            max_cooldown: Duration::from_secs(300),
        },
        ..Policy::default()
    };
    let a = Scripted::new("a", vec![refused()]);
    let b = Scripted::new("b", vec![Step::Ok]);
    let pool = pool([a.clone(), b.clone()], policy);
    // Two requests where a is tried (and fails) demote it.
    demote_first(&pool, &a, 2).await;
    let a_before = a.count();
    for _ in 0..10 {
        assert_eq!(call(&pool).await.unwrap().value, "b");
    }
    assert_eq!(a.count(), a_before, "a demoted: b serves, a is not tried");
    // The cool-down passes; a is back up; the next request probes it first.
    a.set(vec![Step::Ok]);
    tokio::time::advance(Duration::from_secs(29)).await;
    assert_eq!(call(&pool).await.unwrap().value, "b");
    tokio::time::advance(Duration::from_secs(1)).await;
    let served = call(&pool).await.unwrap();
    assert_eq!(served.value, "a", "probe goes first");
    let h = &pool.stats()[0].health;
    assert_eq!(
        (h.demoted, h.recoveries, h.consecutive_failures),
        (false, 1, 0)
    );
    // back in rotation
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(call(&pool).await.unwrap().value);
    }
    assert!(got.contains(&"a") && got.contains(&"b"), "{got:?}");
}

#[tokio::test(start_paused = true)]
async fn failed_probe_doubles_the_cooldown() {
    let policy = Policy {
        health: HealthPolicy {
            demote_after: 1,
            cooldown: Duration::from_secs(30),
            max_cooldown: Duration::from_secs(300),
        },
        ..Policy::default()
    };
    let a = Scripted::new("a", vec![refused()]);
    let b = Scripted::new("b", vec![Step::Ok]);
    let pool = pool([a.clone(), b.clone()], policy);
    demote_first(&pool, &a, 1).await;
    tokio::time::advance(Duration::from_secs(30)).await;
    let n = a.count();
    let served = call(&pool).await.unwrap();
    assert_eq!(
        (served.value, a.count()),
        ("b", n + 1),
        "probe failed, b served"
    );
    assert_eq!(
        pool.stats()[0].health.next_probe_in,
        Some(Duration::from_secs(60))
    );
}

/// One provider, refusing, demoted after `demote_after` failed requests
/// for a cool-down of 30 s; one round (no retry).
fn lone_provider(demote_after: u32) -> (P, Pool<P>) {
    let policy = Policy {
        health: HealthPolicy {
            demote_after,
            cooldown: Duration::from_secs(30),
            max_cooldown: Duration::from_secs(300),
        },
        max_rounds: 1,
        ..Policy::default()
    };
    let a = Scripted::new("a", vec![refused()]);
    (a.clone(), pool([a], policy))
}

#[tokio::test(start_paused = true)]
async fn a_lone_provider_is_probed_too() {
    // One provider per model, the deployment the production incident had:
    // demoted, it is still the one tried, and the request that comes once
    // its cool-down has passed is its probe (a failed one doubles the
    // cool-down; one that succeeds recovers it).
    let (a, pool) = lone_provider(2);
    for _ in 0..2 {
        call(&pool).await.unwrap_err();
    }
    let h = &pool.stats()[0].health;
    assert!(h.demoted);
    assert_eq!(h.next_probe_in, Some(Duration::from_secs(30)));
    // Before the cool-down ends: tried (the only provider), not a probe.
    tokio::time::advance(Duration::from_secs(10)).await;
    call(&pool).await.unwrap_err();
    assert_eq!(
        pool.stats()[0].health.next_probe_in,
        Some(Duration::from_secs(20))
    );
    // Due: this request is the probe, and it fails.
    tokio::time::advance(Duration::from_secs(20)).await;
    call(&pool).await.unwrap_err();
    assert_eq!(
        pool.stats()[0].health.next_probe_in,
        Some(Duration::from_secs(60))
    );
    // The next probe succeeds: recovered.
    tokio::time::advance(Duration::from_secs(60)).await;
    a.set(vec![Step::Ok]);
    assert_eq!(call(&pool).await.unwrap().value, "a");
    let h = &pool.stats()[0].health;
    assert_eq!((h.demoted, h.recoveries), (false, 1));
}

#[tokio::test(start_paused = true)]
async fn a_lone_provider_has_one_probe_at_a_time() {
    let (a, pool) = lone_provider(1);
    let pool = Arc::new(pool);
    call(&pool).await.unwrap_err();
    assert!(pool.stats()[0].health.demoted);
    tokio::time::advance(Duration::from_secs(30)).await;
    // The probe: it hangs, holding the probe slot.
    a.set(vec![Step::Hang]);
    let probe = tokio::spawn({
        let pool = pool.clone();
        async move { call(&pool).await }
    });
    tokio::task::yield_now().await;
    assert_eq!(a.count(), 2, "the probe is under way");
    // Two more requests while it is under way: neither is a probe, so
    // their failures leave the next probe where it was (a failed probe
    // would double the cool-down).
    a.set(vec![refused()]);
    call(&pool).await.unwrap_err();
    call(&pool).await.unwrap_err();
    assert_eq!(a.count(), 4);
    assert_eq!(
        pool.stats()[0].health.next_probe_in,
        Some(Duration::ZERO),
        "a request other than the probe was counted as one"
    );
    probe.abort();
}

#[tokio::test(start_paused = true)]
async fn all_demoted_are_still_served() {
    let policy = Policy {
        health: HealthPolicy {
            demote_after: 1,
            ..HealthPolicy::default()
        },
        ..Policy::default()
    };
    let a = Scripted::new("a", vec![refused()]);
    let b = Scripted::new("b", vec![refused()]);
    let pool = pool([a.clone(), b.clone()], policy);
    let _ = call(&pool).await.unwrap_err();
    assert!(pool.stats().iter().all(|s| s.health.demoted));
    b.set(vec![Step::Ok]);
    let served = call(&pool).await.unwrap();
    assert_eq!(served.value, "b");
    assert!(!pool.stats()[1].health.demoted, "success restores it");
}

// ---- rate limits, deadline, budget -----------------------------------------

#[tokio::test(start_paused = true)]
async fn rate_limited_waits_for_retry_after() {
    let a = Scripted::new(
        "a",
        vec![Step::Status(429, Some(Duration::from_secs(3))), Step::Ok],
    );
    let pool = pool([a.clone()], Policy::default());
    let served = call(&pool).await.unwrap();
    let t = a.times();
    assert_eq!(t[1] - t[0], Duration::from_secs(3));
    assert_eq!(
        served.report.failures()[0].verdict.cause,
        Cause::RateLimited
    );
    // 429 never demotes
    assert_eq!(pool.stats()[0].health.consecutive_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn retry_after_beyond_the_deadline_fails_fast() {
    let a = Scripted::new("a", vec![Step::Status(429, Some(Duration::from_secs(20)))]);
    let pool = pool([a.clone()], Policy::default());
    let start = Instant::now();
    let err = pool
        .call_with(
            MODEL,
            CallOptions::timeout(Duration::from_secs(10)),
            |p: &P| p.attempt(),
        )
        .await
        .unwrap_err();
    assert_eq!(Instant::now(), start, "failed fast, no wait");
    assert_eq!(
        err.reason,
        FailReason::DeadlineExceeded {
            wait: Some(Duration::from_secs(20))
        }
    );
    assert!(err.to_string().contains("20s past"), "{err}");
    assert_eq!(a.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn retry_after_beyond_the_cap_is_not_waited_for() {
    let a = Scripted::new(
        "a",
        vec![Step::Status(429, Some(Duration::from_secs(3600)))],
    );
    let pool = pool([a.clone()], Policy::default());
    let start = Instant::now();
    let err = call(&pool).await.unwrap_err();
    assert_eq!(Instant::now(), start);
    assert_eq!(
        err.reason,
        FailReason::RetryAfterTooLong {
            retry_after: Duration::from_secs(3600)
        }
    );
}

#[tokio::test(start_paused = true)]
async fn no_wait_past_the_deadline() {
    let policy = Policy {
        max_rounds: 5,
        delay: Duration::from_secs(1).into(),
        jitter: 0.0,
        ..Policy::default()
    };
    let a = Scripted::new("a", vec![refused()]);
    let pool = pool([a.clone()], policy);
    let start = Instant::now();
    let deadline = start + Duration::from_millis(3500);
    let err = pool
        .call_with(MODEL, CallOptions::deadline(deadline), |p: &P| p.attempt())
        .await
        .unwrap_err();
    // waits 1 s, 2 s; the next (4 s) would end past the deadline
    let t: Vec<_> = a.times().iter().map(|t| ms(*t - start)).collect();
    assert_eq!(t, vec![0, 1000, 3000]);
    assert_eq!(
        err.reason,
        FailReason::DeadlineExceeded {
            wait: Some(Duration::from_secs(4))
        }
    );
    assert!(Instant::now() <= deadline);
}

#[tokio::test(start_paused = true)]
async fn slow_attempt_is_cut_by_the_deadline() {
    let a = Scripted::new("a", vec![Step::Hang]);
    let pool = pool([a.clone()], Policy::default());
    let start = Instant::now();
    let err = pool
        .call_with(
            MODEL,
            CallOptions::timeout(Duration::from_secs(2)),
            |p: &P| p.attempt(),
        )
        .await
        .unwrap_err();
    assert_eq!(Instant::now() - start, Duration::from_secs(2));
    assert_eq!(err.reason, FailReason::DeadlineExceeded { wait: None });
    assert_eq!(pool.stats()[0].health.consecutive_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn response_timeout_is_not_retried_by_default_but_can_be() {
    let policy = |retry: bool| {
        let mut p = Policy::default();
        p.timeouts.attempt = Duration::from_secs(10);
        p.classify.retry_response_timeout = retry;
        p
    };
    let a = Scripted::new("a", vec![Step::Hang]);
    let pool1 = pool([a.clone()], policy(false));
    let err = call(&pool1).await.unwrap_err();
    assert_eq!(err.reason, FailReason::NotRetryable);
    assert_eq!(
        err.report.failures()[0].verdict.cause,
        Cause::ResponseTimeout
    );
    assert_eq!(err.report.failures()[0].elapsed, Duration::from_secs(10));
    assert_eq!(a.count(), 1);
    let b = Scripted::new("b", vec![Step::Hang, Step::Ok]);
    let pool2 = pool([b.clone()], policy(true));
    assert_eq!(call(&pool2).await.unwrap().rounds(), 2);
}

#[tokio::test(start_paused = true)]
async fn budget_bounds_retries_during_a_total_outage() {
    // 1,000 requests at once against a dead provider: the default budget
    // pays for 20% of them plus a reserve of 10/s x 10 s = 100.
    let a = Scripted::new("a", vec![refused()]);
    let pool = Arc::new(pool([a.clone()], Policy::default()));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let pool = pool.clone();
        set.spawn(async move { call(&pool).await.unwrap_err() });
    }
    let mut budget_refused = 0;
    let mut retried = 0;
    while let Some(err) = set.join_next().await {
        let err = err.unwrap();
        match err.reason {
            FailReason::BudgetExhausted => budget_refused += 1,
            FailReason::RoundsExhausted => retried += 1,
            ref r => panic!("unexpected {r:?}"),
        }
    }
    assert_eq!(retried, 300, "20% of 1000 + 100 reserve");
    assert_eq!(budget_refused, 700);
    assert_eq!(a.count(), 1300);
}

#[tokio::test(start_paused = true)]
async fn budget_recovers_after_the_window() {
    let policy = Policy {
        budget: BudgetPolicy {
            ratio: 0.0,
            min_per_second: 1,
            ..BudgetPolicy::default()
        },
        delay: Duration::ZERO.into(),
        ..Policy::default()
    };
    let a = Scripted::new("a", vec![refused()]);
    let pool = pool([a.clone()], policy);
    let mut reasons = Vec::new();
    for _ in 0..12 {
        reasons.push(call(&pool).await.unwrap_err().reason);
    }
    let retried = reasons
        .iter()
        .filter(|r| **r == FailReason::RoundsExhausted)
        .count();
    assert_eq!(retried, 10);
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(
        call(&pool).await.unwrap_err().reason,
        FailReason::RoundsExhausted
    );
}

// ---- policy snapshot, unknown model, cancellation ---------------------------

#[tokio::test(start_paused = true)]
async fn unknown_model_is_a_typed_error_and_touches_nothing() {
    let a = Scripted::new("a", vec![Step::Ok]);
    let pool = pool([a.clone()], Policy::default());
    let err = pool.call("nope", |p: &P| p.attempt()).await.unwrap_err();
    assert_eq!(
        err.reason,
        FailReason::UnknownModel {
            model: "nope".into()
        }
    );
    assert!(err.is_client_error());
    assert_eq!(err.report.attempts, 0);
    assert_eq!(a.count(), 0);
    let long = "m".repeat(10_000);
    let err = pool.call(&long, |p: &P| p.attempt()).await.unwrap_err();
    assert!(err.to_string().len() < 200);
}

#[tokio::test(start_paused = true)]
async fn a_request_keeps_its_policy_snapshot() {
    let a = Scripted::new("a", vec![refused(), refused(), refused(), Step::Ok]);
    let pool = Arc::new(pool([a.clone()], Policy::default()));
    let p2 = pool.clone();
    let task = tokio::spawn(async move { call(&p2).await });
    tokio::task::yield_now().await; // the request has started and waits
    assert_eq!(a.count(), 1);
    pool.policy()
        .store(rounds_only(Policy {
            max_rounds: 4,
            ..Policy::default()
        }))
        .unwrap();
    let err = task.await.unwrap().unwrap_err();
    assert_eq!(err.report.rounds, 2, "started under max_rounds = 2");
    // the next request uses the new policy
    let served = call(&pool).await.unwrap();
    assert_eq!(served.rounds(), 2);
    assert_eq!(a.count(), 4);
}

#[tokio::test(start_paused = true)]
async fn cancelled_calls_leave_health_and_budget_consistent() {
    let policy = Policy {
        health: HealthPolicy {
            demote_after: 1_000_000,
            ..HealthPolicy::default()
        },
        ..Policy::default()
    };
    let a = Scripted::new(
        "a",
        vec![Step::After(Duration::from_millis(100), Box::new(refused()))],
    );
    let b = Scripted::new(
        "b",
        vec![Step::After(Duration::from_millis(50), Box::new(refused()))],
    );
    let pool = Arc::new(pool([a.clone(), b.clone()], policy));
    let budget_before = pool.budget_available(MODEL).unwrap();
    for i in 0..1000u64 {
        let pool = pool.clone();
        // cancel at a random point: during an attempt, during the wait, or
        // after completion
        let cut = Duration::from_millis(fastrand::u64(0..900));
        let started = Instant::now();
        let _ = tokio::time::timeout(cut, call(&pool)).await;
        // keep each call in its own window slice
        tokio::time::advance(Duration::from_millis(
            1000 - (Instant::now() - started).as_millis() as u64 % 1000,
        ))
        .await;
        let _ = i;
    }
    let total_attempts = a.count() + b.count();
    for s in pool.stats() {
        let h = s.health;
        assert!(!h.demoted);
        // at most once per request, and never more than the attempts seen
        assert!(h.consecutive_failures <= 1000, "{h:?}");
        let seen = if s.provider == "a" {
            a.count()
        } else {
            b.count()
        };
        assert!(h.consecutive_failures as usize <= seen);
    }
    assert!(total_attempts >= 1000);
    // nothing leaked: after the window, the budget is back where it started
    tokio::time::advance(Duration::from_secs(11)).await;
    assert_eq!(pool.budget_available(MODEL).unwrap(), budget_before);
    // and the pool still works
    a.set(vec![Step::Ok]);
    b.set(vec![Step::Ok]);
    assert!(call(&pool).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn cancelled_probe_releases_the_probe_slot() {
    let policy = Policy {
        health: HealthPolicy {
            demote_after: 1,
            ..HealthPolicy::default()
        },
        ..Policy::default()
    };
    let a = Scripted::new("a", vec![refused()]);
    let b = Scripted::new("b", vec![Step::Ok]);
    let pool = pool([a.clone(), b.clone()], policy);
    demote_first(&pool, &a, 1).await;
    tokio::time::advance(Duration::from_secs(30)).await;
    a.set(vec![Step::Hang]);
    // The probe hangs; the caller gives up after 1 s.
    let n = a.count();
    let r = tokio::time::timeout(Duration::from_secs(1), call(&pool)).await;
    assert!(r.is_err());
    assert_eq!(a.count(), n + 1, "the probe was sent");
    // The slot is free again: the next request probes (and a is back).
    a.set(vec![Step::Ok]);
    assert_eq!(call(&pool).await.unwrap().value, "a");
    assert!(!pool.stats()[0].health.demoted);
}

// ---- tracing events carry the real accounting -----------------------------

/// Collects formatted log lines, on this thread, while the guard lives.
fn capture() -> (LogBuffer, tracing::subscriber::DefaultGuard) {
    let lines = LogBuffer::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .without_time()
        .with_writer(move || writer.clone())
        .finish();
    (lines, tracing::subscriber::set_default(subscriber))
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn events_report_the_real_attempt_count() {
    let (lines, _guard) = capture();
    let ps = vec![
        Scripted::new("a", vec![refused()]),
        Scripted::new("b", vec![Step::Status(502, None)]),
        Scripted::new("c", vec![refused()]),
    ];
    let pool = pool(ps, Policy::default());
    let err = call(&pool).await.unwrap_err();
    assert_eq!(err.report.attempts, 6);
    let text = lines.text();
    let retrying: Vec<_> = text
        .lines()
        .filter(|l| l.contains("retrying after transient failure"))
        .collect();
    assert_eq!(retrying.len(), 1, "{text}");
    assert!(
        retrying[0].contains("round=2") && retrying[0].contains("attempts=3"),
        "{text}"
    );
    assert!(retrying[0].contains("providers=3"), "{text}");
    let failed: Vec<_> = text
        .lines()
        .filter(|l| l.contains("all providers failed"))
        .collect();
    assert_eq!(failed.len(), 1, "{text}");
    assert!(failed[0].contains("WARN"), "{text}");
    assert!(
        failed[0].contains("attempts=6") && failed[0].contains("rounds=2"),
        "{text}"
    );
    assert!(
        failed[0].contains("reason=\"rounds_exhausted\"")
            || failed[0].contains("reason=rounds_exhausted"),
        "{text}"
    );
    assert_eq!(text.matches("attempt failed").count(), 6, "{text}");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_early_stop_logs_one_attempt_and_no_outage() {
    let (lines, _guard) = capture();
    let ps = vec![
        Scripted::new("a", vec![Step::Status(400, None)]),
        Scripted::new("b", vec![Step::Ok]),
        Scripted::new("c", vec![Step::Ok]),
    ];
    let pool = pool(ps, Policy::default());
    let err = call(&pool).await.unwrap_err();
    assert_eq!(err.report.attempts, 1);
    let text = lines.text();
    assert!(!text.contains("all providers failed"), "{text}");
    let rejected: Vec<_> = text
        .lines()
        .filter(|l| l.contains("rejected by the upstream"))
        .collect();
    assert_eq!(rejected.len(), 1, "{text}");
    assert!(rejected[0].contains("attempts=1"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn per_model_overrides_apply_to_their_model_only() {
    let policy = Policy::from_toml(
        "max_rounds = 2\n[models.\"no-retry\"]\nmax_rounds = 1\n[models.\"slow\"]\ndelay = \"2s\"\njitter = 0.0\n",
    )
    .unwrap();
    let a = Scripted::new("a", vec![refused()]);
    let pool: Pool<P> = Pool::builder()
        .policy(LivePolicy::new(rounds_only(policy)).unwrap())
        .provider(MODEL, "a", a.clone())
        .provider("no-retry", "a", a.clone())
        .provider("slow", "a", a.clone())
        .build()
        .unwrap();
    let attempts = |r: Outcome| r.unwrap_err().report.attempts;
    assert_eq!(attempts(pool.call(MODEL, |p: &P| p.attempt()).await), 2);
    assert_eq!(
        attempts(pool.call("no-retry", |p: &P| p.attempt()).await),
        1
    );
    let start = Instant::now();
    assert_eq!(attempts(pool.call("slow", |p: &P| p.attempt()).await), 2);
    assert_eq!(Instant::now() - start, Duration::from_secs(2));
}

// ---- adaptive decisions driven by observed latency ---------------------------

/// Fills a provider's recent latency with `n` successes of `took` each
/// (concurrently, so they all land in the current window).
async fn prime(pool: &Arc<Pool<P>>, p: &P, n: usize, took: Duration) {
    p.set(vec![Step::After(took, Box::new(Step::Ok))]);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let pool = pool.clone();
        set.spawn(async move { call(&pool).await.unwrap() });
    }
    while set.join_next().await.is_some() {}
    // the percentiles are recomputed at most once a second
    tokio::time::advance(retryctl::stats::REFRESH).await;
}

fn adaptive_policy(deadline_aware: bool, attempt_timeout: bool) -> Policy {
    let mut p = Policy {
        jitter: 0.0,
        ..Policy::default()
    };
    p.adaptive.deadline_aware = deadline_aware;
    p.adaptive.attempt_timeout = attempt_timeout;
    p.adaptive.attempt_timeout_min = Duration::from_millis(100);
    p.adaptive.min_samples = 50;
    p
}

#[tokio::test(start_paused = true)]
async fn deadline_aware_skips_a_retry_that_could_not_finish() {
    for aware in [true, false] {
        let a = Scripted::new("a", vec![Step::Ok]);
        let pool = Arc::new(pool([a.clone()], adaptive_policy(aware, false)));
        prime(&pool, &a, 50, Duration::from_secs(2)).await;
        a.set(vec![
            refused(),
            Step::After(Duration::from_secs(2), Box::new(Step::Ok)),
        ]);
        let start = Instant::now();
        let err = pool
            .call_with(
                MODEL,
                CallOptions::timeout(Duration::from_millis(2300)),
                |p: &P| p.attempt(),
            )
            .await
            .unwrap_err();
        if aware {
            // 0.5 s wait + 2 s median > 2.3 s left: not even started
            match err.reason {
                FailReason::RetryCannotFinish { wait, p50 } => {
                    assert_eq!(wait, Duration::from_millis(500));
                    // two significant digits
                    assert!((2000..=2020).contains(&p50.as_millis()), "{p50:?}");
                }
                ref other => panic!("{other:?}"),
            }
            assert_eq!(err.report.attempts, 1);
            assert_eq!(Instant::now(), start, "failed at once");
        } else {
            // the fixed rule starts the retry, which the deadline cuts
            assert_eq!(err.reason, FailReason::DeadlineExceeded { wait: None });
            assert_eq!(err.report.attempts, 2);
            assert_eq!(Instant::now() - start, Duration::from_millis(2300));
        }
    }
}

#[tokio::test(start_paused = true)]
async fn deadline_aware_without_data_falls_back_to_the_fixed_rule() {
    let a = Scripted::new("a", vec![refused(), Step::Ok]);
    let pool = pool([a.clone()], adaptive_policy(true, false));
    let served = pool
        .call_with(
            MODEL,
            CallOptions::timeout(Duration::from_secs(1)),
            |p: &P| p.attempt(),
        )
        .await
        .unwrap();
    assert_eq!(served.rounds(), 2);
}

#[tokio::test(start_paused = true)]
async fn adaptive_attempt_timeout_cuts_a_stall_and_retries_it() {
    // p99 of 100 ms x 3 = a 300 ms limit instead of the fixed 90 s
    let a = Scripted::new("a", vec![Step::Ok]);
    let adaptive = Arc::new(pool([a.clone()], adaptive_policy(false, true)));
    prime(&adaptive, &a, 50, Duration::from_millis(100)).await;
    a.set(vec![Step::Hang, Step::Ok]);
    let start = Instant::now();
    let served = call(&adaptive).await.unwrap();
    assert_eq!(served.rounds(), 2);
    let cut = &served.report.failures()[0];
    assert_eq!(cut.verdict.cause, Cause::AdaptiveTimeout);
    assert_eq!(cut.verdict.class, Classification::Transient);
    assert!(
        (297..=306).contains(&cut.elapsed.as_millis()),
        "{:?}",
        cut.elapsed
    );
    assert!(Instant::now() - start < Duration::from_secs(1));

    // the fixed rule waits out the whole attempt limit and does not retry
    let b = Scripted::new("b", vec![Step::Ok]);
    let fixed = Arc::new(pool([b.clone()], adaptive_policy(false, false)));
    prime(&fixed, &b, 50, Duration::from_millis(100)).await;
    b.set(vec![Step::Hang, Step::Ok]);
    let start = Instant::now();
    let err = call(&fixed).await.unwrap_err();
    assert_eq!(err.reason, FailReason::NotRetryable);
    assert_eq!(Instant::now() - start, Duration::from_secs(90));
}

#[tokio::test(start_paused = true)]
async fn adaptive_attempt_timeout_leaves_a_slow_model_alone() {
    // A provider that always takes 20 s: its p99 is 20 s, so the adaptive
    // limit (capped at 30 s) never cuts a normal answer.
    let a = Scripted::new("a", vec![Step::Ok]);
    let pool = Arc::new(pool([a.clone()], adaptive_policy(false, true)));
    prime(&pool, &a, 50, Duration::from_secs(20)).await;
    let served = call(&pool).await.unwrap();
    assert_eq!((served.attempts(), served.rounds()), (1, 1));
}

/// 1,000 requests over 10 s (one every 10 ms) against `steps`; returns the
/// retries made.
async fn retries_over_ten_seconds(adaptive_budget: bool, steps: Vec<Step>) -> u32 {
    let mut policy = Policy {
        delay: Duration::ZERO.into(),
        jitter: 0.0,
        ..Policy::default()
    };
    policy.adaptive.budget = adaptive_budget;
    let a = Scripted::new("a", steps);
    let pool = pool([a.clone()], policy);
    let mut retries = 0;
    for _ in 0..1000 {
        retries += match call(&pool).await {
            Ok(s) => s.report.retries,
            Err(e) => e.report.retries,
        };
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    retries
}

#[tokio::test(start_paused = true)]
async fn adaptive_budget_shrinks_in_an_outage_and_keeps_flaky_recoveries() {
    // A total outage: every retry fails.
    let fixed = retries_over_ten_seconds(false, vec![refused()]).await;
    let adaptive = retries_over_ten_seconds(true, vec![refused()]).await;
    assert!((295..=300).contains(&fixed), "{fixed}");
    // the floor (10/s x 10 s) stays; the ratio part stops once 20 retries
    // have all failed
    assert!((100..=110).contains(&adaptive), "{adaptive}");
    // A flaky period: every first attempt fails, every retry succeeds.
    let flaky: Vec<Step> = (0..2000)
        .map(|i| if i % 2 == 0 { refused() } else { Step::Ok })
        .collect();
    let fixed = retries_over_ten_seconds(false, flaky.clone()).await;
    let adaptive = retries_over_ten_seconds(true, flaky).await;
    assert_eq!(fixed, adaptive, "retries that work are not cut");
}

// ---- latency-aware order ------------------------------------------------------

/// A pool of two providers, `slow` answering in 800 ms and `fast` in
/// 20 ms, both with 100 recent successes and the percentiles refreshed.
async fn slow_and_fast(latency_order: bool) -> (Arc<Pool<P>>, P, P) {
    let mut policy = adaptive_policy(false, false);
    policy.adaptive.latency_order = latency_order;
    let slow = Scripted::new("slow", vec![Step::Ok]);
    let fast = Scripted::new("fast", vec![Step::Ok]);
    let pool = Arc::new(pool([slow.clone(), fast.clone()], policy));
    slow.set(vec![Step::After(
        Duration::from_millis(800),
        Box::new(Step::Ok),
    )]);
    fast.set(vec![Step::After(
        Duration::from_millis(20),
        Box::new(Step::Ok),
    )]);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let pool = pool.clone();
        set.spawn(async move { call(&pool).await.unwrap() });
    }
    while set.join_next().await.is_some() {}
    tokio::time::advance(retryctl::stats::REFRESH).await;
    (pool, slow, fast)
}

/// How many of `n` sequential requests each of [`slow_and_fast`]'s
/// providers served, and their total time.
async fn served_by_slow_and_fast(latency_order: bool, n: usize) -> (usize, usize, Duration) {
    let (pool, slow, fast) = slow_and_fast(latency_order).await;
    let (before_slow, before_fast) = (slow.count(), fast.count());
    let start = Instant::now();
    for _ in 0..n {
        call(&pool).await.unwrap();
    }
    (
        slow.count() - before_slow,
        fast.count() - before_fast,
        Instant::now() - start,
    )
}

#[tokio::test(start_paused = true)]
async fn latency_order_moves_a_persistently_slow_provider_last() {
    let (slow, fast, took) = served_by_slow_and_fast(true, 100).await;
    assert_eq!((slow, fast), (0, 100), "800 ms > 2 x 20 ms and > 500 ms");
    assert_eq!(took, Duration::from_millis(100 * 20));
    // the fixed rule: round-robin, half the requests wait 800 ms
    let (slow, fast, took) = served_by_slow_and_fast(false, 100).await;
    assert_eq!((slow, fast), (50, 50));
    assert_eq!(took, Duration::from_millis(50 * 800 + 50 * 20));
}

#[tokio::test(start_paused = true)]
async fn latency_order_still_falls_back_to_the_slow_provider() {
    let (pool, _slow, fast) = slow_and_fast(true).await;
    fast.set(vec![refused()]);
    let served = call(&pool).await.unwrap();
    assert_eq!(
        (served.value, served.attempts(), served.fell_back),
        ("slow", 2, true)
    );
}

#[tokio::test(start_paused = true)]
async fn latency_order_without_samples_is_round_robin() {
    let mut policy = adaptive_policy(false, false);
    policy.adaptive.latency_order = true;
    let a = Scripted::new(
        "a",
        vec![Step::After(Duration::from_millis(800), Box::new(Step::Ok))],
    );
    let b = Scripted::new(
        "b",
        vec![Step::After(Duration::from_millis(20), Box::new(Step::Ok))],
    );
    let pool = pool([a.clone(), b.clone()], policy);
    // 10 requests each: below min_samples (50), so the order stays
    for _ in 0..20 {
        call(&pool).await.unwrap();
        tokio::time::advance(retryctl::stats::REFRESH).await;
    }
    assert_eq!((a.count(), b.count()), (10, 10));
}

// ---- learned retry delay ------------------------------------------------------

/// A provider that refuses connections until a moment, then answers.
#[derive(Debug)]
struct Outage {
    until: std::sync::Mutex<Instant>,
}

impl Outage {
    fn new() -> Arc<Self> {
        Arc::new(Outage {
            until: std::sync::Mutex::new(Instant::now()),
        })
    }

    /// Down from now for `d`.
    fn down_for(&self, d: Duration) {
        *self.until.lock().unwrap() = Instant::now() + d;
    }

    fn attempt(&self) -> impl Future<Output = Result<(), std::io::Error>> + use<> {
        let down = Instant::now() < *self.until.lock().unwrap();
        async move {
            if down {
                Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
            } else {
                Ok(())
            }
        }
    }
}

fn outage_pool(delay: retryctl::policy::RetryDelay) -> (Arc<Outage>, Arc<Pool<Arc<Outage>>>) {
    let mut policy = Policy {
        delay,
        jitter: 0.0,
        ..Policy::default()
    };
    policy.budget.enabled = false;
    let o = Outage::new();
    let pool = Pool::builder()
        .provider(MODEL, "a", o.clone())
        .policy(LivePolicy::new(rounds_only(policy)).unwrap())
        .build()
        .unwrap();
    (o, Arc::new(pool))
}

/// A 1.5 s outage under a request every 50 ms (2 s of traffic).
async fn outage_under_load(o: &Arc<Outage>, pool: &Arc<Pool<Arc<Outage>>>) {
    o.down_for(Duration::from_millis(1500));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let pool = pool.clone();
        set.spawn(async move {
            pool.call(MODEL, |p: &Arc<Outage>| p.attempt())
                .await
                .is_ok()
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while set.join_next().await.is_some() {}
    tokio::time::advance(retryctl::stats::REFRESH).await;
}

#[tokio::test(start_paused = true)]
async fn learned_delay_waits_out_a_recovery_the_fixed_delay_retries_into() {
    use retryctl::policy::RetryDelay;
    for auto in [true, false] {
        let delay = if auto {
            RetryDelay::Auto
        } else {
            RetryDelay::Fixed(Duration::from_millis(500))
        };
        let (o, pool) = outage_pool(delay);
        outage_under_load(&o, &pool).await;
        // the next outage, one request at its start
        o.down_for(Duration::from_millis(1500));
        let start = Instant::now();
        let result = pool.call(MODEL, |p: &Arc<Outage>| p.attempt()).await;
        if auto {
            // p90 of the recoveries seen: the 1.5 s outage (two significant
            // digits), so the retry lands after it
            let served = result.unwrap();
            assert_eq!(served.rounds(), 2);
            let waited = served.report.waited.as_millis();
            assert!((1500..=1510).contains(&waited), "{waited}");
        } else {
            let err = result.unwrap_err();
            assert_eq!(err.reason, FailReason::RoundsExhausted);
            assert_eq!(Instant::now() - start, Duration::from_millis(500));
        }
    }
}

#[tokio::test(start_paused = true)]
async fn learned_delay_without_recoveries_uses_the_fallback() {
    let (o, pool) = outage_pool(retryctl::policy::RetryDelay::Auto);
    o.down_for(Duration::from_millis(700));
    let err = pool
        .call(MODEL, |p: &Arc<Outage>| p.attempt())
        .await
        .unwrap_err();
    // adaptive.delay_auto_fallback = 500 ms, like the fixed default
    assert_eq!(err.report.waited, Duration::from_millis(500));
    assert_eq!(err.reason, FailReason::RoundsExhausted);
}

#[tokio::test(start_paused = true)]
async fn learned_delay_is_clamped_to_its_bounds() {
    use retryctl::policy::RetryDelay;
    let mut policy = Policy {
        delay: RetryDelay::Auto,
        jitter: 0.0,
        ..Policy::default()
    };
    policy.budget.enabled = false;
    policy.adaptive.delay_auto_max = Duration::from_millis(800);
    let o = Outage::new();
    let pool = Arc::new(
        Pool::builder()
            .provider(MODEL, "a", o.clone())
            .policy(LivePolicy::new(rounds_only(policy)).unwrap())
            .build()
            .unwrap(),
    );
    outage_under_load(&o, &pool).await;
    o.down_for(Duration::from_millis(1500));
    let err = pool
        .call(MODEL, |p: &Arc<Outage>| p.attempt())
        .await
        .unwrap_err();
    assert_eq!(err.report.waited, Duration::from_millis(800));
}

// ---- shadow policy ------------------------------------------------------------

fn with_shadow(live: Policy, shadow: &str) -> Policy {
    let text = format!("{}\n[shadow]\n{shadow}\n", live.to_toml());
    Policy::from_toml(&text).unwrap()
}

fn outage_pool_with(policy: Policy) -> (Arc<Outage>, Pool<Arc<Outage>>) {
    let o = Outage::new();
    let pool = Pool::builder()
        .provider(MODEL, "a", o.clone())
        .policy(LivePolicy::new(rounds_only(policy)).unwrap())
        .build()
        .unwrap();
    (o, pool)
}

fn no_jitter() -> Policy {
    Policy {
        jitter: 0.0,
        ..Policy::default()
    }
}

#[tokio::test(start_paused = true)]
async fn shadow_with_more_rounds_would_retry_and_saves_what_recovers_in_time() {
    // live: 2 rounds (0.5 s); shadow: 3 rounds, the third after 1 s more
    for (outage_ms, saved) in [(1200, 1), (2000, 0)] {
        let (o, pool) = outage_pool_with(with_shadow(no_jitter(), "max_rounds = 3"));
        o.down_for(Duration::from_millis(outage_ms));
        let err = pool
            .call(MODEL, |p: &Arc<Outage>| p.attempt())
            .await
            .unwrap_err();
        // the shadow does not act: the live policy's two rounds
        assert_eq!(err.reason, FailReason::RoundsExhausted);
        assert_eq!((err.report.attempts, err.report.rounds), (2, 2));
        let c = pool.shadow_counts(MODEL).unwrap();
        assert_eq!((c.would_retry, c.agree, c.saved), (1, 0, 0));
        // the shadow's retry would start at 0.5 + 1.0 s; the next live
        // attempt starting after that decides it
        tokio::time::advance(Duration::from_millis(1000)).await;
        let _ = pool.call(MODEL, |p: &Arc<Outage>| p.attempt()).await;
        let c = pool.shadow_counts(MODEL).unwrap();
        assert_eq!(
            (c.saved, c.retried_in_vain),
            (saved, 1 - saved),
            "{outage_ms} ms"
        );
        assert_eq!(c.caused, 0);
    }
}

#[tokio::test(start_paused = true)]
async fn shadow_with_fewer_rounds_would_cause_the_failure_a_retry_saved() {
    let a = Scripted::new("a", vec![refused(), Step::Ok, Step::Ok]);
    let pool = pool([a.clone()], with_shadow(no_jitter(), "max_rounds = 1"));
    let served = call(&pool).await.unwrap();
    assert_eq!(served.rounds(), 2, "the live policy retried");
    call(&pool).await.unwrap();
    let c = pool.shadow_counts(MODEL).unwrap();
    assert_eq!((c.would_not_retry, c.caused, c.agree), (1, 1, 1));
    assert_eq!((c.would_retry, c.would_refuse_budget), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn shadow_budget_would_refuse_retries_the_live_budget_pays_for() {
    // a shadow budget of nothing: every retry the live policy makes is one
    // it would have refused
    let a = Scripted::new("a", vec![refused(), Step::Ok]);
    let policy = with_shadow(
        no_jitter(),
        "[shadow.budget]\nratio = 0.0\nmin_per_second = 0",
    );
    let pool = pool([a.clone()], policy);
    let served = call(&pool).await.unwrap();
    assert_eq!(served.rounds(), 2);
    let c = pool.shadow_counts(MODEL).unwrap();
    assert_eq!((c.would_refuse_budget, c.caused), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn shadow_health_would_demote_earlier() {
    let a = Scripted::new("a", vec![refused()]);
    let b = Scripted::new("b", vec![Step::Ok]);
    let mut live = no_jitter();
    live.max_rounds = 1;
    let pool = pool(
        [a.clone(), b.clone()],
        with_shadow(live, "[shadow.health]\ndemote_after = 3"),
    );
    for _ in 0..6 {
        call(&pool).await.unwrap();
    }
    // a failed in 3 of the 6 requests (round-robin: it goes first every
    // other time): the shadow would demote it, the live policy (10) does not
    let c = pool.shadow_counts(MODEL).unwrap();
    assert_eq!(c.would_demote, 1);
    assert!(pool.stats().iter().all(|s| !s.health.demoted));
    assert_eq!(c.agree, 6);
}

#[tokio::test(start_paused = true)]
async fn without_a_shadow_nothing_is_counted() {
    let a = Scripted::new("a", vec![refused(), Step::Ok]);
    let pool = pool([a.clone()], no_jitter());
    call(&pool).await.unwrap();
    assert_eq!(
        pool.shadow_counts(MODEL),
        Some(retryctl::stats::ShadowCounts::default())
    );
    assert_eq!(pool.shadow_counts("nope"), None);
}

#[tokio::test(start_paused = true)]
async fn shadow_budget_is_no_larger_than_the_live_one() {
    // a total outage: every retry fails; live 2 rounds, shadow 3, same budget
    let policy = with_shadow(
        Policy {
            delay: Duration::ZERO.into(),
            jitter: 0.0,
            ..Policy::default()
        },
        "max_rounds = 3",
    );
    let a = Scripted::new("a", vec![refused()]);
    let pool = pool([a.clone()], policy);
    let mut live_retries = 0;
    for _ in 0..1000 {
        live_retries += call(&pool).await.unwrap_err().report.retries;
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    let c = pool.shadow_counts(MODEL).unwrap();
    let refused = c.would_refuse_budget;
    let shadow_retries = u64::from(live_retries) - refused + c.would_retry;
    assert!((295..=300).contains(&live_retries), "{live_retries}");
    assert!(shadow_retries <= 301, "{c:?}, live {live_retries}");
}

#[tokio::test(start_paused = true)]
async fn shadow_would_not_retry_past_the_deadline() {
    // live: fails at 0.5 s after 2 rounds; the shadow's third round would
    // start 1 s later, at 1.5 s
    for (timeout_ms, would_retry) in [(1200, 0), (2000, 1)] {
        let (o, pool) = outage_pool_with(with_shadow(no_jitter(), "max_rounds = 3"));
        o.down_for(Duration::from_secs(10));
        let err = pool
            .call_with(
                MODEL,
                CallOptions::timeout(Duration::from_millis(timeout_ms)),
                |p: &Arc<Outage>| p.attempt(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.reason, FailReason::RoundsExhausted);
        let c = pool.shadow_counts(MODEL).unwrap();
        assert_eq!(
            (c.would_retry, c.agree),
            (would_retry, 1 - would_retry),
            "{timeout_ms} ms"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_shadow_never_changes_what_the_live_policy_does() {
    let script = || {
        vec![
            refused(),
            Step::Ok,
            Step::Status(502, None),
            Step::Status(502, None),
            Step::Status(400, None),
            refused(),
            refused(),
            Step::Status(503, Some(Duration::from_secs(1))),
            Step::Ok,
        ]
    };
    let live = Policy {
        jitter: 0.0,
        max_rounds: 3,
        ..Policy::default()
    };
    let shadow = "max_rounds = 1\n[shadow.budget]\nratio = 0.0\nmin_per_second = 0\n[shadow.health]\ndemote_after = 1";
    let run = async |policy: Policy| {
        let a = Scripted::new("a", script());
        let b = Scripted::new("b", vec![refused(), refused(), Step::Ok]);
        let pool = pool([a, b], policy);
        let mut out = Vec::new();
        for _ in 0..20 {
            let start = Instant::now();
            let r = match call(&pool).await {
                Ok(s) => (true, s.report, None),
                Err(e) => (false, e.report, Some(e.reason)),
            };
            out.push((r, Instant::now() - start));
        }
        (out, pool.stats(), pool.shadow_counts(MODEL).unwrap())
    };
    let (without, stats_without, _) = run(live.clone()).await;
    let (with, stats_with, counted) = run(with_shadow(live, shadow)).await;
    assert_eq!(without, with);
    assert_eq!(stats_without, stats_with);
    // ...while the shadow disagreed plenty
    assert!(
        counted.would_not_retry > 0 && counted.would_demote > 0,
        "{counted:?}"
    );
}
