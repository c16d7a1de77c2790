//! The pool against real faulty sockets on loopback, through `reqwest`:
//! every fault is classified as expected and recovered or failed as the
//! policy says. Real time, short durations (tens of milliseconds).
//!
//! The policy here retries in rounds (`admission.enabled = false`), so a
//! connection-level failure is retried after the round's delay: what the
//! gate does with the same faults is in tests/admission.

use retryctl_testkit as support;

mod classification;

use std::time::Duration;

use retryctl::policy::{LivePolicy, Policy};
use retryctl::upstream::{self, UpstreamError};
use retryctl::{Cause, Classification, FailReason, Pool, PoolError, Served};
use support::{HttpServer, Reply, ResetMode, ResetServer, StalledServer, closed_port};

const MODEL: &str = "openai/gpt-oss-120b";

#[derive(Clone, Debug)]
struct Provider {
    client: reqwest::Client,
    url: String,
}

type Outcome = Result<Served<String>, PoolError<UpstreamError>>;

/// Fast policy for real sockets: 20 ms delay, 200 ms connect timeout.
fn policy() -> Policy {
    let mut p = Policy {
        delay: Duration::from_millis(20).into(),
        ..Policy::default()
    };
    p.timeouts.connect = Duration::from_millis(200);
    p.timeouts.attempt = Duration::from_secs(2);
    p.admission.enabled = false;
    p
}

fn pool(urls: &[String], policy: Policy) -> Pool<Provider> {
    let client = upstream::client_builder(&policy.timeouts)
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut b = Pool::builder().policy(LivePolicy::new(policy).unwrap());
    for (i, url) in urls.iter().enumerate() {
        b = b.provider(
            MODEL,
            &format!("p{i}"),
            Provider {
                client: client.clone(),
                url: url.clone(),
            },
        );
    }
    b.build().unwrap()
}

async fn call(pool: &Pool<Provider>) -> Outcome {
    pool.call(MODEL, |p: &Provider| {
        let request = p.client.post(&p.url).body("{}");
        async move {
            let response = upstream::check(request.send().await?).await?;
            Ok(response.text().await?)
        }
    })
    .await
}

fn causes(report: &retryctl::Report) -> Vec<Cause> {
    report.failures().iter().map(|f| f.verdict.cause).collect()
}

#[tokio::test]
async fn refused_connection_is_retried_then_fails() {
    let url = format!("http://{}/v1/chat/completions", closed_port());
    let err = call(&pool(&[url], policy())).await.unwrap_err();
    assert_eq!(err.reason, FailReason::RoundsExhausted);
    assert_eq!(causes(&err.report), vec![Cause::ConnectRefused; 2]);
    assert!(matches!(err.upstream(), Some(UpstreamError::Transport(e)) if e.is_connect()));
}

#[tokio::test]
async fn refused_connection_falls_back_to_a_healthy_provider() {
    let ok = HttpServer::always(Reply::ok("fine")).await;
    let dead = format!("http://{}/", closed_port());
    let served = call(&pool(&[dead, ok.url()], policy())).await.unwrap();
    assert_eq!(served.value, "fine");
    assert!(served.fell_back);
    assert_eq!((served.attempts(), served.rounds()), (2, 1));
    assert_eq!(ok.hits(), 1);
}

#[tokio::test]
async fn reset_on_accept_is_transient() {
    let server = ResetServer::start(ResetMode::OnAccept).await;
    let err = call(&pool(&[server.url()], policy())).await.unwrap_err();
    assert_eq!(err.reason, FailReason::RoundsExhausted);
    assert_eq!(err.report.attempts, 2);
    assert_eq!(server.accepted(), 2);
    for f in err.report.failures() {
        assert_eq!(f.verdict.class, Classification::Transient);
        // hyper hands the request back unsent when the connection dies
        // before it was written; a reset seen while writing is a reset.
        assert!(
            matches!(f.verdict.cause, Cause::NotSent | Cause::Reset),
            "{:?}",
            f.verdict
        );
    }
}

#[tokio::test]
async fn reset_after_the_request_was_written_is_transient_and_recovers() {
    let server = ResetServer::start(ResetMode::AfterRequest).await;
    let ok = HttpServer::always(Reply::ok("second")).await;
    let err = call(&pool(&[server.url()], policy())).await.unwrap_err();
    assert_eq!(causes(&err.report), vec![Cause::Reset; 2]);
    assert_eq!(server.requests(), 2);
    // the same fault with a healthy second provider is absorbed
    let served = call(&pool(&[server.url(), ok.url()], policy()))
        .await
        .unwrap();
    assert_eq!(served.value, "second");
}

#[tokio::test]
async fn scripted_reset_then_success_recovers_in_round_two() {
    let server = HttpServer::start(vec![Reply::reset(), Reply::ok("after reset")]).await;
    let served = call(&pool(&[server.url()], policy())).await.unwrap();
    assert_eq!(served.value, "after reset");
    assert_eq!((served.attempts(), served.rounds()), (2, 2));
    assert_eq!(causes(&served.report), vec![Cause::Reset]);
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn close_without_response_is_transient() {
    let server = HttpServer::start(vec![Reply::close(), Reply::ok("ok")]).await;
    let served = call(&pool(&[server.url()], policy())).await.unwrap();
    assert_eq!(served.value, "ok");
    assert_eq!(causes(&served.report), vec![Cause::Reset]);
}

#[tokio::test]
async fn stalled_accept_queue_is_a_connect_timeout_and_retried() {
    let stalled = StalledServer::start().await;
    let started = std::time::Instant::now();
    let err = call(&pool(&[stalled.url()], policy())).await.unwrap_err();
    assert_eq!(err.reason, FailReason::RoundsExhausted);
    assert_eq!(causes(&err.report), vec![Cause::ConnectTimeout; 2]);
    // two connect timeouts of 200 ms, not the 2 s attempt timeout
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn slow_accepting_backlog_of_one_is_absorbed_by_spread_retries() {
    // A VM network stack: listen(1), one accept every 50 ms. A burst of 6
    // new connections overflows it; without retries some fail.
    let server = StalledServer::slow_accept(Duration::from_millis(50), Reply::ok("vm")).await;
    let burst = |policy: Policy| {
        let pool = std::sync::Arc::new(pool(&[server.url()], policy));
        async move {
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..6 {
                let pool = pool.clone();
                set.spawn(async move { call(&pool).await });
            }
            let mut failed = Vec::new();
            while let Some(r) = set.join_next().await {
                if let Err(e) = r.unwrap() {
                    failed.push(e.report.failures()[0].verdict.cause);
                }
            }
            failed
        }
    };
    let baseline = burst(Policy {
        max_rounds: 1,
        ..policy()
    })
    .await;
    assert!(!baseline.is_empty(), "the burst must overflow the queue");
    assert!(
        baseline.iter().all(|c| *c == Cause::ConnectTimeout),
        "{baseline:?}"
    );
    let with_retries = burst(Policy {
        max_rounds: 10,
        delay: Duration::from_millis(150).into(),
        jitter: 0.5,
        backoff: 1.0,
        ..policy()
    })
    .await;
    assert!(with_retries.is_empty(), "{with_retries:?}");
}

#[tokio::test]
async fn status_502_then_200_succeeds_in_round_two() {
    let server = HttpServer::start(vec![Reply::status(502), Reply::ok("hello")]).await;
    let served = call(&pool(&[server.url()], policy())).await.unwrap();
    assert_eq!(served.value, "hello");
    assert_eq!((served.attempts(), served.rounds()), (2, 2));
    assert_eq!(causes(&served.report), vec![Cause::Unavailable]);
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn status_503_without_retry_after_waits_the_policy_delay() {
    let server = HttpServer::always(Reply::status(503)).await;
    let p = Policy {
        delay: Duration::from_millis(100).into(),
        jitter: 0.0,
        ..policy()
    };
    let err = call(&pool(&[server.url()], p)).await.unwrap_err();
    assert_eq!(err.reason, FailReason::RoundsExhausted);
    assert_eq!(server.hits(), 2);
    assert!(err.report.waited >= Duration::from_millis(100));
    assert!(matches!(
        err.upstream(),
        Some(UpstreamError::Status { status, .. }) if status.as_u16() == 503
    ));
}

#[tokio::test]
async fn status_503_retry_after_is_read_from_the_wire() {
    // Retry-After: 1 is over this policy's 500 ms cap: not retried, and the
    // error says why (no real one-second wait in the test).
    let server = HttpServer::always(Reply::status(503).header("Retry-After", "1")).await;
    let p = Policy {
        max_retry_after: Duration::from_millis(500),
        ..policy()
    };
    let err = call(&pool(&[server.url()], p)).await.unwrap_err();
    assert_eq!(server.hits(), 1);
    match err.upstream() {
        Some(UpstreamError::Status { retry_after, .. }) => {
            assert_eq!(*retry_after, Some(Duration::from_secs(1)))
        }
        other => panic!("{other:?}"),
    }
    // a 5xx that says when to come back is handled like a rate limit
    assert_eq!(
        err.report.failures()[0].verdict,
        retryctl::Verdict::new(
            Classification::RateLimited {
                retry_after: Some(Duration::from_secs(1))
            },
            Cause::Unavailable
        )
    );
    assert_eq!(
        err.reason,
        FailReason::RetryAfterTooLong {
            retry_after: Duration::from_secs(1)
        }
    );
}

#[tokio::test]
async fn status_429_with_retry_after_beyond_the_cap_is_not_retried() {
    let server = HttpServer::always(Reply::status(429).header("Retry-After", "120")).await;
    let err = call(&pool(&[server.url()], policy())).await.unwrap_err();
    assert_eq!(
        err.reason,
        FailReason::RetryAfterTooLong {
            retry_after: Duration::from_secs(120)
        }
    );
    assert_eq!(server.hits(), 1);
    assert_eq!(
        err.report.failures()[0].verdict.class,
        Classification::RateLimited {
            retry_after: Some(Duration::from_secs(120))
        }
    );
}

#[tokio::test]
async fn status_429_with_short_retry_after_is_retried() {
    let server = HttpServer::start(vec![
        Reply::status(429).header("Retry-After", "0"),
        Reply::ok("made it"),
    ])
    .await;
    let p = Policy {
        rate_limited_delay: Duration::from_millis(30),
        ..policy()
    };
    let served = call(&pool(&[server.url()], p)).await.unwrap();
    assert_eq!(served.value, "made it");
    assert_eq!(causes(&served.report), vec![Cause::RateLimited]);
}

#[tokio::test]
async fn client_error_is_returned_at_once_with_its_body() {
    let server = HttpServer::always(Reply::status(400).body("{\"error\":\"bad messages\"}")).await;
    let other = HttpServer::always(Reply::ok("never")).await;
    let err = call(&pool(&[server.url(), other.url()], policy()))
        .await
        .unwrap_err();
    assert_eq!(err.reason, FailReason::Permanent);
    assert_eq!(err.report.attempts, 1);
    assert_eq!(other.hits(), 0);
    match err.upstream() {
        Some(UpstreamError::Status { status, body, .. }) => {
            assert_eq!(status.as_u16(), 400);
            assert!(body.contains("bad messages"));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn five_xx_caused_by_the_clients_input_is_not_retried() {
    let server = HttpServer::always(
        Reply::status(500).body("{\"error\":\"Failed to fetch image from http://x/y.png\"}"),
    )
    .await;
    let err = call(&pool(&[server.url()], policy())).await.unwrap_err();
    assert_eq!(err.reason, FailReason::Permanent);
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn model_not_found_moves_to_the_next_provider() {
    let missing = HttpServer::always(Reply::status(404).body("model not found")).await;
    let ok = HttpServer::always(Reply::ok("has it")).await;
    let served = call(&pool(&[missing.url(), ok.url()], policy()))
        .await
        .unwrap();
    assert_eq!(served.value, "has it");
    assert_eq!(causes(&served.report), vec![Cause::NextProvider]);
}

#[tokio::test]
async fn slow_response_past_the_attempt_timeout_is_not_retried_by_default() {
    let server = HttpServer::always(Reply::ok("late").delay(Duration::from_millis(600))).await;
    let mut p = policy();
    p.timeouts.attempt = Duration::from_millis(250);
    let err = call(&pool(&[server.url()], p)).await.unwrap_err();
    assert_eq!(err.reason, FailReason::NotRetryable);
    assert_eq!(causes(&err.report), vec![Cause::ResponseTimeout]);
    assert!(
        matches!(err.last, Some(retryctl::AttemptError::TimedOut(d)) if d == Duration::from_millis(250))
    );
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn slow_response_is_retried_when_the_policy_says_so() {
    let server = HttpServer::start(vec![
        Reply::ok("late").delay(Duration::from_millis(600)),
        Reply::ok("quick"),
    ])
    .await;
    let mut p = policy();
    p.timeouts.attempt = Duration::from_millis(250);
    p.classify.retry_response_timeout = true;
    let served = call(&pool(&[server.url()], p)).await.unwrap();
    assert_eq!(served.value, "quick");
    assert_eq!(causes(&served.report), vec![Cause::ResponseTimeout]);
}

#[tokio::test]
async fn reqwest_timeout_reading_the_body_is_a_response_timeout() {
    // The client's own timer (not the pool's) fires while the upstream is
    // still generating: is_timeout() without is_connect().
    let server = HttpServer::always(Reply::ok("late").delay(Duration::from_millis(600))).await;
    let p = policy();
    let client = upstream::client_builder(&p.timeouts)
        .timeout(Duration::from_millis(150))
        .build()
        .unwrap();
    let err = client.get(server.url()).send().await.unwrap_err();
    let rules = retryctl::Rules::default();
    let v = retryctl::Classify::classify(&err, &rules);
    assert_eq!(v.cause, Cause::ResponseTimeout);
    assert_eq!(v.class, Classification::TryNext);
}
