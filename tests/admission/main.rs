//! The admission gate: requests wait for an unreachable provider instead
//! of failing, only probes reach it while it is down, and it reopens with
//! slow start. Paused tokio time for the timing rules; real sockets on
//! loopback for a restart and an overflowing accept queue.

use retryctl_testkit as support;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use retryctl::policy::{LivePolicy, Policy};
use retryctl::upstream::{self, UpstreamError};
use retryctl::{CallOptions, Cause, FailReason, Pool, Report};
use tokio::time::Instant;

const MODEL: &str = "m";

/// The default policy with the gate on.
fn gated() -> Policy {
    let mut p = Policy::default();
    p.admission.enabled = true;
    p
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

// ---- a provider that is down until a given instant (paused time) ---------

/// Refuses connections (after `fail_after`) until `up_at`, then answers
/// after `answer_after`; counts what it sees, and the most attempts it
/// had in flight at once.
#[derive(Debug)]
struct Upstream {
    up_at: Mutex<Option<Instant>>,
    fail_after: Duration,
    answer_after: Duration,
    in_flight: AtomicU32,
    max_in_flight: AtomicU32,
    /// (started, succeeded) per attempt.
    log: Mutex<Vec<(Instant, bool)>>,
}

impl Upstream {
    fn new(up_at: Option<Instant>, fail_after: Duration, answer_after: Duration) -> Arc<Self> {
        Arc::new(Upstream {
            up_at: Mutex::new(up_at),
            fail_after,
            answer_after,
            in_flight: AtomicU32::new(0),
            max_in_flight: AtomicU32::new(0),
            log: Mutex::new(Vec::new()),
        })
    }

    /// Never up (until `set_up`).
    fn down(fail_after: Duration) -> Arc<Self> {
        Upstream::new(
            Some(Instant::now() + Duration::from_secs(1 << 30)),
            fail_after,
            ms(1),
        )
    }

    fn set_up(&self, at: Instant) {
        *self.up_at.lock().unwrap() = Some(at);
    }

    fn attempt(self: &Arc<Self>) -> impl Future<Output = Result<&'static str, io::Error>> + use<> {
        let me = self.clone();
        async move {
            let now = Instant::now();
            let up = me.up_at.lock().unwrap().is_none_or(|t| now >= t);
            let n = me.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            me.max_in_flight.fetch_max(n, Ordering::SeqCst);
            let i = {
                let mut log = me.log.lock().unwrap();
                log.push((now, false));
                log.len() - 1
            };
            // Decrements on drop too (a cancelled attempt).
            let _guard = InFlight(&me.in_flight);
            if up {
                tokio::time::sleep(me.answer_after).await;
                me.log.lock().unwrap()[i].1 = true;
                Ok("ok")
            } else {
                tokio::time::sleep(me.fail_after).await;
                Err(io::Error::from(io::ErrorKind::ConnectionRefused))
            }
        }
    }

    fn attempts(&self) -> Vec<(Instant, bool)> {
        self.log.lock().unwrap().clone()
    }
}

struct InFlight<'a>(&'a AtomicU32);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

type P = Arc<Upstream>;

fn pool_of(providers: &[(&str, P)], policy: Policy) -> Arc<Pool<P>> {
    let mut b = Pool::builder().policy(LivePolicy::new(policy).unwrap());
    for (name, p) in providers {
        b = b.provider(MODEL, name, p.clone());
    }
    Arc::new(b.build().unwrap())
}

fn gate<Q>(pool: &Pool<Q>, provider: &str) -> retryctl::stats::GateSnapshot {
    pool.stats()
        .into_iter()
        .find(|s| s.provider == provider)
        .unwrap()
        .admission
}

/// Failed attempts in a report that were neither the request's first
/// attempt nor a probe: retries the upstream saw fail.
fn failed_retries(report: &Report) -> usize {
    let first_failed = report.attempts > 0 && !report.failures().is_empty();
    report
        .failures()
        .iter()
        .enumerate()
        .filter(|(k, f)| !(f.probe || (*k == 0 && first_failed)))
        .count()
}

// ---- paused time --------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_restart_is_waited_out_with_probes_and_paced_after_recovery() {
    let t0 = Instant::now();
    let up = t0 + Duration::from_secs(3);
    // Refusals take 1 ms (so the 100 first attempts are in flight at
    // once), answers 10 ms.
    let a = Upstream::new(Some(up), ms(1), ms(10));
    let pool = pool_of(&[("a", a.clone())], gated());
    let budget = pool.budget_available(MODEL).unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let pool = pool.clone();
        let a = a.clone();
        tasks.spawn(async move {
            pool.call(MODEL, |p: &P| p.attempt())
                .await
                .map(|s| s.report)
        });
        let _ = &a;
    }
    let mut reports = Vec::new();
    while let Some(r) = tasks.join_next().await {
        reports.push(r.unwrap().expect("every caller is served"));
    }
    assert_eq!(reports.len(), 100);
    let attempts = a.attempts();
    let failed: Vec<_> = attempts.iter().filter(|(_, ok)| !ok).collect();
    let probes_failed: usize = reports
        .iter()
        .map(|r| r.failures().iter().filter(|f| f.probe).count())
        .sum();
    // The first wave (100 attempts in flight when it went down) fails;
    // after that only probes reach the upstream while it is down:
    // 100, 200, 400, 800, 1000, 1000 ms apart.
    assert_eq!(reports.iter().map(failed_retries).sum::<usize>(), 0);
    assert_eq!(failed.len(), 100 + probes_failed);
    assert_eq!(probes_failed, 5, "probes at ~0.1, 0.3, 0.7, 1.5, 2.5 s");
    let probe_times: Vec<u128> = failed[100..]
        .iter()
        .map(|(t, _)| (*t - t0).as_millis())
        .collect();
    assert_eq!(probe_times, vec![101, 302, 703, 1504, 2505]);
    // Waiting spends no retry budget and no round.
    assert_eq!(pool.budget_available(MODEL).unwrap(), budget + 100.0 * 0.2);
    assert!(reports.iter().all(|r| r.rounds == 1));
    // Recovery: the probe at 3.506 s succeeds, then slow start: 1, 2, 4,
    // ... attempts at a time, not 99 at once.
    let first_ok = attempts.iter().find(|(_, ok)| *ok).unwrap().0;
    assert_eq!((first_ok - t0).as_millis(), 3506);
    let within = |d: u64| {
        attempts
            .iter()
            .filter(|(t, ok)| *ok && *t < first_ok + ms(d))
            .count()
    };
    assert_eq!(within(10), 1, "the probe alone");
    assert_eq!(within(20), 2, "then one (the limit starts at 1)");
    assert_eq!(within(30), 4, "then two");
    assert_eq!(within(40), 8, "then four");
    assert!(a.max_in_flight.load(Ordering::SeqCst) <= 100);
    let last = attempts.last().unwrap().0;
    assert!(
        last - first_ok < ms(100),
        "drained in {:?}",
        last - first_ok
    );
    // And the gate is open again.
    let g = gate(&pool, "a");
    assert_eq!((g.limit, g.down, g.waiting), (None, false, 0));
}

#[tokio::test(start_paused = true)]
async fn a_healthy_provider_is_never_delayed_by_another_ones_gate() {
    let down = Upstream::down(Duration::ZERO);
    let healthy = Upstream::new(None, Duration::ZERO, ms(5));
    let pool = pool_of(
        &[("down", down.clone()), ("healthy", healthy.clone())],
        gated(),
    );
    for _ in 0..50 {
        let served = pool.call(MODEL, |p: &P| p.attempt()).await.unwrap();
        assert_eq!(served.provider, "healthy");
        assert_eq!(served.report.queued, Duration::ZERO);
        assert_eq!(served.report.waited, Duration::ZERO);
        tokio::time::sleep(ms(20)).await;
    }
    // 50 requests over ~1.3 s: the down provider saw its first refusal,
    // which marked it down, and then only its probes (0.1, 0.3, 0.7 s
    // later).
    let seen = down.attempts().len();
    assert_eq!(seen, 4, "attempts on the down provider");
    assert!(gate(&pool, "down").down);
}

#[tokio::test(start_paused = true)]
async fn waits_are_bounded_by_max_wait_and_the_deadline() {
    let a = Upstream::down(Duration::ZERO);
    let mut policy = gated();
    policy.admission.max_wait = Duration::from_secs(2);
    let pool = pool_of(&[("a", a.clone())], policy);
    let budget = pool.budget_available(MODEL).unwrap();
    let start = Instant::now();
    let err = pool.call(MODEL, |p: &P| p.attempt()).await.unwrap_err();
    assert_eq!(
        err.reason,
        FailReason::AdmissionTimeout {
            waited: Duration::from_secs(2)
        }
    );
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    assert_eq!(err.report.queued, Duration::from_secs(2));
    assert_eq!(err.report.rounds, 1);
    // First refusal, the one that marks it down, then probes at 0.1, 0.3,
    // 0.7 and 1.5 s.
    assert_eq!(err.report.attempts, 5);
    let message = err.to_string();
    assert!(
        message.contains("did not accept work: waited 2s")
            && message.contains("last error: connection refused"),
        "{message}"
    );
    assert_eq!(pool.budget_available(MODEL).unwrap(), budget + 0.2);

    // The deadline bounds a wait too, and the next request waits no
    // longer than its own deadline.
    let start = Instant::now();
    let err = pool
        .call_with(MODEL, CallOptions::timeout(ms(250)), |p: &P| p.attempt())
        .await
        .unwrap_err();
    assert!(matches!(err.reason, FailReason::AdmissionTimeout { .. }));
    assert_eq!(start.elapsed(), ms(250));
    assert!(err.report.queued <= ms(250));

    // max_wait = 0s: fail at once, never wait.
    let mut policy = gated();
    policy.admission.max_wait = Duration::ZERO;
    pool.policy().store(policy).unwrap();
    let start = Instant::now();
    let err = pool.call(MODEL, |p: &P| p.attempt()).await.unwrap_err();
    assert_eq!(
        err.reason,
        FailReason::AdmissionTimeout {
            waited: Duration::ZERO
        }
    );
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn cancelled_waiters_leave_no_waiter_behind() {
    let a = Upstream::down(Duration::ZERO);
    let pool = pool_of(&[("a", a.clone())], gated());
    // Down: the first request's refusal marks it down; then 1,000
    // requests wait and are cancelled.
    let first = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.call(MODEL, |p: &P| p.attempt()).await.map(|_| ()) })
    };
    tokio::time::sleep(ms(1)).await;
    assert!(gate(&pool, "a").down);
    let mut waiters = Vec::new();
    for _ in 0..1000 {
        let pool = pool.clone();
        waiters.push(tokio::spawn(async move {
            pool.call(MODEL, |p: &P| p.attempt()).await.map(|_| ())
        }));
    }
    tokio::time::sleep(ms(50)).await;
    // The first request waits for a probe too.
    assert_eq!(gate(&pool, "a").waiting, 1001);
    for w in &waiters {
        w.abort();
    }
    for w in waiters {
        assert!(w.await.unwrap_err().is_cancelled());
    }
    let g = gate(&pool, "a");
    assert_eq!((g.waiting, g.in_flight, g.down), (1, 0, true), "{g:?}");
    first.abort();
    let _ = first.await;
    let g = gate(&pool, "a");
    assert_eq!((g.waiting, g.in_flight, g.probing), (0, 0, false), "{g:?}");
    // The provider comes back: the next request probes it and is served.
    a.set_up(Instant::now());
    let served = pool.call(MODEL, |p: &P| p.attempt()).await.unwrap();
    assert_eq!(served.report.attempts, 1);
    let g = gate(&pool, "a");
    assert!(!g.down && g.in_flight == 0, "{g:?}");
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_turns_requests_away_at_once() {
    let a = Upstream::down(Duration::ZERO);
    let mut policy = gated();
    policy.admission.max_waiting = 3;
    let pool = pool_of(&[("a", a.clone())], policy);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let pool = pool.clone();
        tasks.spawn(async move {
            let start = Instant::now();
            let r = pool.call(MODEL, |p: &P| p.attempt()).await;
            (r.map(|_| ()).map_err(|e| e.reason), start.elapsed())
        });
    }
    let mut full = 0;
    while let Some(r) = tasks.join_next().await {
        let (r, took) = r.unwrap();
        if r == Err(FailReason::AdmissionQueueFull) {
            full += 1;
            assert_eq!(took, Duration::ZERO);
        } else {
            assert!(
                matches!(r, Err(FailReason::AdmissionTimeout { .. })),
                "{r:?}"
            );
        }
    }
    // One request marks the provider down and waits, two more fit.
    assert_eq!(full, 3);
}

#[tokio::test(start_paused = true)]
async fn latency_never_limits_and_connection_failures_shrink_from_in_flight() {
    // Slow answers (30 s, an LLM generation) keep the gate open.
    let slow = Upstream::new(None, Duration::ZERO, Duration::from_secs(30));
    let pool = pool_of(&[("a", slow.clone())], gated());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let pool = pool.clone();
        tasks.spawn(async move { pool.call(MODEL, |p: &P| p.attempt()).await.is_ok() });
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(gate(&pool, "a").limit, None, "open while slow");
    while let Some(r) = tasks.join_next().await {
        assert!(r.unwrap());
    }
    assert_eq!(gate(&pool, "a").limit, None);

    // 8 attempts in flight when the upstream starts refusing: the first
    // refusal limits the gate to 4, the next ones to half of what is
    // still in flight.
    let a = Upstream::new(None, Duration::ZERO, ms(100));
    let pool = pool_of(&[("a", a.clone())], gated());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let pool = pool.clone();
        tasks.spawn(async move { pool.call(MODEL, |p: &P| p.attempt()).await.is_ok() });
    }
    tokio::time::sleep(ms(10)).await;
    assert_eq!(a.in_flight.load(Ordering::SeqCst), 8);
    a.set_up(Instant::now() + Duration::from_secs(1));
    let late = pool.clone();
    let refused = tokio::spawn(async move { late.call(MODEL, |p: &P| p.attempt()).await });
    tokio::time::sleep(ms(1)).await;
    // In flight: 8 slow ones + the refused one = 9 → limit 4.
    let g = gate(&pool, "a");
    assert_eq!(g.limit, Some(4), "{g:?}");
    while let Some(r) = tasks.join_next().await {
        assert!(r.unwrap());
    }
    let served = refused.await.unwrap().unwrap();
    assert_eq!(
        served.report.failures()[0].verdict.cause,
        Cause::ConnectRefused
    );
}

#[tokio::test(start_paused = true)]
async fn switching_admission_off_releases_the_waiters() {
    let a = Upstream::down(Duration::ZERO);
    let pool = pool_of(&[("a", a.clone())], gated());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..5 {
        let pool = pool.clone();
        tasks.spawn(async move {
            pool.call(MODEL, |p: &P| p.attempt())
                .await
                .map(|s| s.report.queued)
        });
    }
    tokio::time::sleep(ms(50)).await;
    assert_eq!(gate(&pool, "a").waiting, 5);
    a.set_up(Instant::now());
    let mut off = gated();
    off.admission.enabled = false;
    pool.policy().store(off).unwrap();
    // The next request sees the change and opens the gate for everyone.
    let served = pool.call(MODEL, |p: &P| p.attempt()).await.unwrap();
    assert_eq!(served.report.queued, Duration::ZERO);
    let mut ok = 0;
    while let Some(r) = tasks.join_next().await {
        let queued = r.unwrap().unwrap();
        assert!(queued <= ms(51), "{queued:?}");
        ok += 1;
    }
    assert_eq!(ok, 5);
    assert_eq!(gate(&pool, "a").limit, None);
}

// ---- real sockets -------------------------------------------------------

#[derive(Clone, Debug)]
struct Http {
    client: reqwest::Client,
    url: String,
}

fn http_pool(url: String, connect_timeout: Duration) -> Arc<Pool<Http>> {
    let mut policy = gated();
    policy.timeouts.connect = connect_timeout;
    policy.timeouts.attempt = Duration::from_secs(5);
    let client = upstream::client_builder(&policy.timeouts)
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    Arc::new(
        Pool::builder()
            .provider(MODEL, "a", Http { client, url })
            .policy(LivePolicy::new(policy).unwrap())
            .build()
            .unwrap(),
    )
}

async fn http_call(pool: &Pool<Http>) -> Result<Report, retryctl::PoolError<UpstreamError>> {
    pool.call(MODEL, |p: &Http| {
        let request = p.client.post(&p.url).body("{}");
        async move {
            let response = upstream::check(request.send().await?).await?;
            response.bytes().await.map_err(UpstreamError::from)?;
            Ok::<_, UpstreamError>(())
        }
    })
    .await
    .map(|s| s.report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_of_the_only_provider_on_real_sockets() {
    let mut server = support::ReopeningServer::start(support::Reply::ok("back")).await;
    let pool = http_pool(server.url(), ms(500));
    // The listener is closed for 3 s, then reopened on the same port.
    server.close().await;
    let restart = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        server.reopen();
        server
    });
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let pool = pool.clone();
        tasks.spawn(async move { http_call(&pool).await });
    }
    let mut reports = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            Ok(r) => reports.push(r),
            Err(e) => panic!("{e}: {:?}, gate {:?}", e.report, pool.stats()[0].admission),
        }
    }
    let took = started.elapsed();
    let server = restart.await.unwrap();
    assert_eq!(server.accepted(), 100, "one connection per request");
    // While it was down, the upstream saw the first wave and the probes,
    // and no request re-tried on its own.
    let probes: usize = reports
        .iter()
        .map(|r| r.failures().iter().filter(|f| f.probe).count())
        .sum();
    let retried: usize = reports.iter().map(failed_retries).sum();
    assert!(
        (3..=7).contains(&probes),
        "{probes} failed probes over 3 s (0.1 s doubling to 1 s)"
    );
    assert!(retried <= 2, "{retried} failed retries beside the probes");
    assert!(reports.iter().all(|r| r.rounds == 1));
    assert!(
        took < Duration::from_secs(5),
        "served {took:?} after the start of a 3 s outage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overflowing_accept_queue_is_absorbed_and_settles() {
    // listen(1), one accept every 20 ms; 16 callers, each sending its
    // requests one after another for 3 s, over new connections.
    let server = support::StalledServer::slow_accept(ms(20), support::Reply::ok("vm")).await;
    let pool = http_pool(server.url(), ms(500));
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let pool = pool.clone();
        tasks.spawn(async move {
            let mut reports = Vec::new();
            while started.elapsed() < Duration::from_secs(3) {
                reports.push((started.elapsed(), http_call(&pool).await));
            }
            reports
        });
    }
    let mut timeouts_late = 0;
    let mut timeouts = 0;
    let mut served = 0;
    while let Some(r) = tasks.join_next().await {
        for (sent, r) in r.unwrap() {
            let report = r.expect("every request is served");
            served += 1;
            let n = report
                .failures()
                .iter()
                .filter(|f| f.verdict.cause == Cause::ConnectTimeout)
                .count();
            timeouts += n;
            if sent > Duration::from_secs(1) {
                timeouts_late += n;
            }
        }
    }
    assert!(served >= 50, "{served} served");
    assert!(timeouts >= 1, "the first burst must overflow the queue");
    // Once the limit settled, attempts stay within what the queue holds.
    assert!(
        timeouts_late * 10 <= served,
        "{timeouts_late} connect timeouts after the first second, {timeouts} in all, {served} served"
    );
}

// ---- an accept queue that overflows on bursts (paused time) -----------------

/// How a connect to [`Backlog`] fails.
#[derive(Debug)]
enum ConnectFailed {
    /// The port is closed (a restart).
    Refused,
    /// The accept queue dropped the connect: the client's connect timeout.
    TimedOut,
}

impl std::fmt::Display for ConnectFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConnectFailed::Refused => "connection refused",
            ConnectFailed::TimedOut => "connect timed out",
        })
    }
}

impl retryctl::Classify for ConnectFailed {
    fn classify(&self, _: &retryctl::Rules) -> retryctl::Verdict {
        let cause = match self {
            ConnectFailed::Refused => Cause::ConnectRefused,
            ConnectFailed::TimedOut => Cause::ConnectTimeout,
        };
        retryctl::Verdict::new(retryctl::Classification::Transient, cause)
    }
}

/// Refuses connections until `up_at`; then an accept queue of `queue`: at
/// most that many connects started in the same millisecond complete (and
/// answer 1 ms later), the rest are dropped and time out after
/// `connect_timeout`. A backlog of 1 behind a quick accept loop: fine at
/// a steady pace, overflowing on bursts.
struct Backlog {
    up_at: Instant,
    queue: usize,
    connect_timeout: Duration,
    /// The current millisecond's first connect, and its connects so far.
    burst: Mutex<(Instant, usize)>,
    /// Every connect once up: (started, accepted).
    log: Mutex<Vec<(Instant, bool)>>,
}

impl Backlog {
    fn attempt(self: &Arc<Self>) -> impl Future<Output = Result<(), ConnectFailed>> + use<> {
        let me = self.clone();
        async move {
            let now = Instant::now();
            if now < me.up_at {
                tokio::time::sleep(ms(1)).await;
                return Err(ConnectFailed::Refused);
            }
            let accepted = {
                let mut b = me.burst.lock().unwrap();
                if now - b.0 >= ms(1) {
                    *b = (now, 0);
                }
                b.1 += 1;
                b.1 <= me.queue
            };
            me.log.lock().unwrap().push((now, accepted));
            if accepted {
                tokio::time::sleep(ms(1)).await;
                Ok(())
            } else {
                tokio::time::sleep(me.connect_timeout).await;
                Err(ConnectFailed::TimedOut)
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn recovery_waits_for_slow_connects_before_growing() {
    // 300 callers wait out a 1 s restart; the upstream comes back behind
    // an accept queue of 2 that drops bursts (250 ms connect timeout).
    // Slow start grows on successes, which come back in 1 ms; a dropped
    // connect is known only 250 ms later. Growing on successes alone
    // would send bursts of 4, 8, 16 ... connects into the full queue for
    // those 250 ms; the gate waits for the outcome of every attempt
    // admitted before it last changed the limit.
    let t0 = Instant::now();
    let b = Arc::new(Backlog {
        up_at: t0 + Duration::from_secs(1),
        queue: 2,
        connect_timeout: ms(250),
        burst: Mutex::new((t0, 0)),
        log: Mutex::new(Vec::new()),
    });
    let mut policy = gated();
    policy.timeouts.connect = ms(250);
    let mut pb = Pool::builder().policy(LivePolicy::new(policy).unwrap());
    pb = pb.provider(MODEL, "a", b.clone());
    let pool: Arc<Pool<Arc<Backlog>>> = Arc::new(pb.build().unwrap());
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..300u64 {
        let pool = pool.clone();
        tasks.spawn(async move {
            // Arriving over the first 300 ms, as traffic does.
            tokio::time::sleep(ms(k)).await;
            pool.call(MODEL, |p: &Arc<Backlog>| p.attempt())
                .await
                .is_ok()
        });
    }
    let mut served = 0;
    while let Some(r) = tasks.join_next().await {
        served += usize::from(r.unwrap());
    }
    assert_eq!(served, 300, "every caller is served");
    let log = b.log.lock().unwrap().clone();
    let dropped = log.iter().filter(|(_, ok)| !ok).count();
    let accepted = log.iter().filter(|(_, ok)| *ok).count();
    assert_eq!(accepted, 300);
    // Slow start's first bursts overflow once (1, 2, then 4 at once: 2
    // dropped), and growth waits for that outcome: the connects the queue
    // dropped stay a handful, not one per caller.
    assert!(
        dropped <= 6,
        "{dropped} connects dropped after the restart (accepted {accepted})"
    );
    let g = gate(&pool, "a");
    assert_eq!((g.waiting, g.in_flight), (0, 0), "{g:?}");
}

/// An upstream down for the first second that then answers after 30 s
/// (an LLM generation), and a policy whose limits let it: the connect
/// phase `connect`.
fn llm_restart(connect: Duration) -> (Instant, P, Policy) {
    let t0 = Instant::now();
    let a = Upstream::new(
        Some(t0 + Duration::from_secs(1)),
        ms(1),
        Duration::from_secs(30),
    );
    let mut policy = gated();
    policy.timeouts.connect = connect;
    policy.timeouts.attempt = Duration::from_secs(120);
    policy.timeouts.request = Duration::from_secs(300);
    policy.admission.max_wait = Duration::from_secs(60);
    (t0, a, policy)
}

/// When each successful attempt started, in ms from `t0`.
fn served_at(a: &Upstream, t0: Instant) -> Vec<u128> {
    a.attempts()
        .iter()
        .filter(|(_, ok)| *ok)
        .map(|(t, _)| (*t - t0).as_millis())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_connect_is_a_success_for_the_gate_even_before_the_answer() {
    // An LLM answer takes 30 s, the connect phase 1 s. After a restart,
    // the probe that reaches the upstream reopens the gate once its
    // connect phase is over, and each attempt past its connect phase
    // grows the limit: waiting for 30 s answers would admit one request
    // per 30 s.
    let (t0, a, policy) = llm_restart(Duration::from_secs(1));
    let pool = pool_of(&[("a", a.clone())], policy);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let pool = pool.clone();
        tasks.spawn(async move { pool.call(MODEL, |p: &P| p.attempt()).await.is_ok() });
    }
    let mut served = 0;
    while let Some(r) = tasks.join_next().await {
        served += usize::from(r.unwrap());
    }
    assert_eq!(served, 50);
    let ok = served_at(&a, t0);
    assert_eq!(ok.len(), 50);
    // The probe that finds it back (1.5 s), then slow start one connect
    // phase (1 s) at a time: 1, 2, 4, 8, 16, 32 ... all 50 under way
    // within seconds, not one per 30 s answer.
    // (Each wait rounds up to the millisecond and the connect phase ends
    // 5 ms after `timeouts.connect`.)
    assert_eq!(ok[0], 1504, "{ok:?}");
    assert_eq!(
        ok[1], 2509,
        "the next one after the probe's connect phase: {ok:?}"
    );
    assert_eq!(&ok[2..4], &[3514, 3514], "then two: {ok:?}");
    assert_eq!(
        *ok.last().unwrap(),
        7534,
        "all 50 under way by 7.5 s: {ok:?}"
    );
    let g = gate(&pool, "a");
    assert_eq!((g.waiting, g.in_flight), (0, 0), "{g:?}");
}

#[tokio::test(start_paused = true)]
async fn a_provider_with_its_own_connect_timeout_has_its_own_connect_phase() {
    // The client connects within 100 ms (the gateway's per-provider
    // `connect_timeout`), the policy says 5 s: the gate follows the
    // provider's, so an attempt past 100 ms counts as connected.
    let (t0, a, policy) = llm_restart(Duration::from_secs(5));
    let pool = Arc::new(
        Pool::builder()
            .policy(LivePolicy::new(policy).unwrap())
            .provider(MODEL, "a", a.clone())
            .connect_timeout("a", ms(100))
            .build()
            .unwrap(),
    );
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let pool = pool.clone();
        tasks.spawn(async move { pool.call(MODEL, |p: &P| p.attempt()).await.is_ok() });
    }
    while let Some(r) = tasks.join_next().await {
        assert!(r.unwrap());
    }
    let ok = served_at(&a, t0);
    // The probe at 1.5 s, then 1, 2, 4 attempts 105 ms apart (not 5 s).
    assert_eq!(
        ok,
        vec![1504, 1609, 1714, 1714, 1819, 1819, 1819, 1819],
        "{ok:?}"
    );
}

// ---- a restart under steady load (paused time, real sockets) ------------

/// An HTTP/1.1 upstream on 127.0.0.1 that answers every request after
/// `service` on keep-alive connections, and can be closed and reopened on
/// the same port: killed (its connections cut) or shut down gracefully
/// (the requests in flight answered first).
struct RestartingUpstream {
    addr: std::net::SocketAddr,
    service: Duration,
    /// The accept loop while open; it owns the listener and the
    /// connections, and says when it has closed the listener.
    task: Option<(
        tokio::task::JoinHandle<()>,
        tokio::sync::oneshot::Receiver<()>,
    )>,
    /// Tells the accept loop and the connections to shut down.
    stop: tokio::sync::watch::Sender<bool>,
    /// The port while closed: bound, not listening (a connect is refused).
    parked: Option<socket2::Socket>,
}

/// A socket bound to `addr` (with `SO_REUSEADDR`, so the server's own
/// connections in `TIME_WAIT` do not block the rebind), not listening.
fn bound_socket(addr: std::net::SocketAddr) -> socket2::Socket {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket.bind(&addr.into()).unwrap();
    socket
}

impl RestartingUpstream {
    fn start(service: Duration) -> Self {
        let parked = bound_socket("127.0.0.1:0".parse().unwrap());
        let addr = parked.local_addr().unwrap().as_socket().unwrap();
        let mut upstream = RestartingUpstream {
            addr,
            service,
            task: None,
            stop: tokio::sync::watch::Sender::new(false),
            parked: Some(parked),
        };
        upstream.open();
        upstream
    }

    fn open(&mut self) {
        let Some(socket) = self.parked.take() else {
            return;
        };
        socket.listen(1024).unwrap();
        socket.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(socket.into()).unwrap();
        let service = self.service;
        self.stop = tokio::sync::watch::Sender::new(false);
        let mut stop = self.stop.subscribe();
        let (closed, listener_closed) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                while conns.try_join_next().is_some() {}
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            conns.spawn(Self::serve(stream, service, stop.clone()));
                        }
                        // e.g. EMFILE: back off instead of spinning.
                        Err(_) => tokio::time::sleep(ms(10)).await,
                    },
                    _ = stop.changed() => break,
                }
            }
            drop(listener);
            let _ = closed.send(());
            while conns.join_next().await.is_some() {}
        });
        self.task = Some((task, listener_closed));
    }

    async fn serve(
        mut stream: tokio::net::TcpStream,
        service: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        use tokio::io::AsyncWriteExt;
        let mut reader = support::http::RequestReader::default();
        loop {
            let request = tokio::select! {
                request = reader.next(&mut stream) => request,
                // Shutting down: an idle connection is closed at once.
                _ = stop.changed() => return,
            };
            if !matches!(request, Ok(Some(_))) {
                return;
            }
            tokio::time::sleep(service).await;
            let last = *stop.borrow();
            let answer: &[u8] = if last {
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
            } else {
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
            };
            if stream.write_all(answer).await.is_err() || last {
                return;
            }
        }
    }

    /// Closes the listener and every connection at once, as when the
    /// process is killed.
    async fn kill(&mut self) {
        if let Some((task, _)) = self.task.take() {
            task.abort();
            let _ = task.await;
            self.parked = Some(bound_socket(self.addr));
        }
    }

    /// Closes the listener at once and each connection once it has
    /// answered the request it is serving (idle ones at once), as a
    /// graceful shutdown.
    async fn shut_down(&mut self) {
        if let Some((_, listener_closed)) = self.task.take() {
            self.stop.send_replace(true);
            listener_closed.await.unwrap();
            self.parked = Some(bound_socket(self.addr));
        }
    }
}

/// One attempt as the test saw it: when it started and ended, and the
/// gate as it started (just after its admission).
#[derive(Clone, Copy, Debug)]
struct Seen {
    start: Instant,
    end: Instant,
    gate: retryctl::stats::GateSnapshot,
}

/// The failed attempts that started during an outage, by why they were
/// made.
#[derive(Debug, Default, PartialEq, Eq)]
struct OutageAttempts {
    /// Cut in flight by the close: the upstream had received them (a
    /// reset), so they are not connects to the closed port.
    cut: usize,
    /// The first refused connect: it told the gate.
    first: usize,
    /// Admitted while the gate was open, before the first refusal came
    /// back.
    alongside_first: usize,
    /// Admitted after the first refusal came back, not as a probe: the
    /// gate knew and let them through.
    after_first: usize,
    /// The gate's probes while down.
    probes: usize,
}

impl OutageAttempts {
    /// Connects to the closed port.
    fn connects(&self) -> usize {
        self.first + self.alongside_first + self.after_first + self.probes
    }
}

/// How many probe intervals an outage of `outage` spans: the first
/// refused connect opens one, then each probe (after `probe_delay`,
/// doubling up to `probe_max_delay`) the next.
fn probe_intervals(policy: &Policy, outage: Duration) -> usize {
    let (mut at, mut wait, mut n) = (Duration::ZERO, policy.admission.probe_delay, 1);
    loop {
        at += wait;
        if at >= outage {
            return n;
        }
        n += 1;
        wait = (wait * 2).min(policy.admission.probe_max_delay);
    }
}

/// Whether the upstream never received the attempt: the gate's
/// connection-level failures.
fn never_received(cause: Cause) -> bool {
    matches!(
        cause,
        Cause::ConnectRefused | Cause::Connect | Cause::ConnectTimeout | Cause::NotSent
    )
}

#[tokio::test(start_paused = true)]
async fn a_restart_under_steady_load_costs_one_connect_per_probe_interval() {
    // The only provider's upstream (keep-alive, 20 ms per answer) is
    // closed for 3 s at 2 s (killed) and at 10 s (shut down gracefully),
    // under 100 calls/s. Every call is served; while the port is closed,
    // the gate sends one connect per probe interval: the refusal that
    // tells it, then its probes. Each edge of the outage cost a second
    // connect in the first interval: the refused request's re-attempt,
    // admitted at once by a limit of 1, and after a graceful shutdown, an
    // answer on an older connection taken for a recovery.
    const OUTAGE: Duration = Duration::from_secs(3);
    let t0 = Instant::now();
    let outages = [t0 + Duration::from_secs(2), t0 + Duration::from_secs(10)];
    let end = t0 + Duration::from_secs(16);
    let mut server = RestartingUpstream::start(ms(20));
    let mut policy = gated();
    policy.timeouts.connect = ms(500);
    let client = upstream::client_builder(&policy.timeouts).build().unwrap();
    let url = format!("http://{}/v1/chat/completions", server.addr);
    let pool = Arc::new(
        Pool::builder()
            .provider(MODEL, "a", Http { client, url })
            .policy(LivePolicy::new(policy.clone()).unwrap())
            .build()
            .unwrap(),
    );
    let restarts = tokio::spawn(async move {
        for (k, at) in outages.into_iter().enumerate() {
            tokio::time::sleep_until(at).await;
            if k == 0 {
                server.kill().await;
            } else {
                server.shut_down().await;
            }
            tokio::time::sleep_until(at + OUTAGE).await;
            server.open();
        }
        server
    });
    let mut calls = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(ms(10));
    while tick.tick().await < end {
        let pool = pool.clone();
        calls.spawn(async move {
            let log = Arc::new(Mutex::new(Vec::new()));
            let sent = Instant::now();
            let result = pool
                .call(MODEL, |p: &Http| {
                    let request = p.client.post(&p.url).body("{}");
                    let (log, gate) = (log.clone(), gate(&pool, "a"));
                    async move {
                        let start = Instant::now();
                        let result = async {
                            let response = upstream::check(request.send().await?).await?;
                            response.bytes().await.map_err(UpstreamError::from)?;
                            Ok::<_, UpstreamError>(())
                        }
                        .await;
                        let end = Instant::now();
                        log.lock().unwrap().push(Seen { start, end, gate });
                        result
                    }
                })
                .await;
            let report = result.map(|s| s.report).map_err(|e| e.to_string());
            let seen = log.lock().unwrap().clone();
            (sent, report, seen)
        });
    }
    let mut calls = calls.join_all().await;
    let _server = restarts.await.unwrap();
    calls.sort_by_key(|(sent, _, _)| *sent);
    assert_eq!(calls.len(), 1600);
    let calls: Vec<(Instant, Report, Vec<Seen>)> = calls
        .into_iter()
        .map(|(sent, r, seen)| (sent, r.expect("every call is served"), seen))
        .collect();
    // Before the first outage, the gate stayed open: one attempt per
    // call, no wait.
    let before = calls
        .iter()
        .filter(|(_, _, attempts)| attempts.last().unwrap().end < outages[0]);
    assert!(before.clone().count() >= 190);
    for (sent, report, _) in before {
        assert_eq!(
            (report.attempts, report.queued),
            (1, Duration::ZERO),
            "{:?}",
            *sent - t0
        );
    }

    let intervals = probe_intervals(&policy, OUTAGE);
    assert_eq!(intervals, 6, "0, 0.1, 0.3, 0.7, 1.5 and 2.5 s into it");
    let mut seen = Vec::new();
    for at in outages {
        // Each failed attempt that started during the outage.
        let mut failed: Vec<(Seen, &retryctl::FailedAttempt)> = Vec::new();
        for (_, report, attempts) in &calls {
            // The failures are the attempts before the one that served.
            let failures = report.failures();
            assert_eq!(attempts.len(), failures.len() + 1);
            failed.extend(
                attempts
                    .iter()
                    .zip(failures)
                    .filter(|(a, _)| a.start >= at && a.start < at + OUTAGE)
                    .map(|(a, f)| (*a, f)),
            );
        }
        failed.sort_by_key(|(a, _)| a.end);
        let mut counts = OutageAttempts::default();
        let mut first_back = None;
        for (a, f) in &failed {
            if !never_received(f.verdict.cause) {
                counts.cut += 1;
            } else if f.probe {
                assert!(a.gate.down, "a probe admitted while not down: {a:?}");
                counts.probes += 1;
            } else if first_back.is_none() {
                first_back = Some(a.end);
                counts.first += 1;
            } else if first_back.is_some_and(|t| a.start < t) {
                counts.alongside_first += 1;
            } else {
                counts.after_first += 1;
            }
        }
        seen.push(counts);
    }
    for counts in &seen {
        assert!(
            counts.connects() <= intervals,
            "{} connects to the closed port in a {OUTAGE:?} outage of {intervals} probe \
             intervals: {seen:?}",
            counts.connects()
        );
        assert_eq!(
            (counts.first, counts.alongside_first, counts.after_first),
            (1, 0, 0),
            "{seen:?}"
        );
        assert_eq!(counts.probes, intervals - 1, "{seen:?}");
    }
    // The kill cut what was in flight (the upstream had received it: a
    // round-2 retry, not a connect). The graceful shutdown answers what it
    // has read, but a request written as it stops listening can still be
    // cut: its count is not asserted, only that it costs no connect.
    assert!(seen[0].cut >= 1, "{seen:?}");
    let g = gate(&pool, "a");
    assert_eq!((g.limit, g.down, g.waiting), (None, false, 0), "{g:?}");
}
