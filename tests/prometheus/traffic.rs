//! Traffic with real faults on loopback, through `retryctl::Pool` and
//! `reqwest`, and a tally of what the pool returned: the counts the
//! metrics must show.
//!
//! Every outcome, reason and skip that the dashboard plots is produced:
//!
//! | model | provider(s) | what happens |
//! |---|---|---|
//! | `openai/gpt-oss-120b` | `proxy-a` (resets, 502s, closes between successes), `proxy-b` (healthy) | fallbacks in round 1, retries |
//! | `zai-org/GLM-5-FP8` | `proxy` (eight 502s, then reset/ok pairs) | rounds exhausted, demotion, recovery, success after retry |
//! | `Qwen/Qwen3.5-122B-A10B` | `vm` (refused) | rounds exhausted, stays demoted; deadline skips |
//! | `moonshotai/Kimi-K2` | `proxy` (429 with Retry-After: 3600, 400, ok) | Retry-After too long, permanent |
//! | `budget/starved` (a pool whose budget is 0) | `proxy` (refused) | budget refusals |
//! | `no/such-model` | none | unknown model |
//! | `admission/flapping` | `vm` (its listener closes for 1.5 s, then reopens on the same port) | the admission gate: see [`Driver::admission`] |
//!
//! The admission gate is enabled for `admission/flapping` only (a model
//! override): the other models keep failing in rounds on refused
//! connections, which is what their rows and counts are about.
//!
//! The starved pool's policy follows a file through a real
//! `retryctl::PolicyWatcher` (explicit re-reads, no file events or timer,
//! so the counts are exact): loaded at start (unchanged), then a changed
//! policy (applied), the same file again (unchanged), and a broken file
//! (rejected: the reload is failing at the end).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use retryctl::policy::{AdmissionOverride, BudgetPolicy};
use retryctl::policy::{LivePolicy, Policy, PolicyOverride};
use retryctl::reload::ReloadCounts;
use retryctl::reload::{PolicyWatcher, ReloadOptions};
use retryctl::upstream::{self, UpstreamError};
use retryctl::{CallOptions, Pool, PoolError, Served};

use crate::support::{HttpServer, ReopeningServer, Reply, closed_port};

pub(crate) const GPT: &str = "openai/gpt-oss-120b";
pub(crate) const GLM: &str = "zai-org/GLM-5-FP8";
pub(crate) const QWEN: &str = "Qwen/Qwen3.5-122B-A10B";
pub(crate) const KIMI: &str = "moonshotai/Kimi-K2";
pub(crate) const STARVED: &str = "budget/starved";
pub(crate) const UNKNOWN: &str = "no/such-model";
pub(crate) const ADMISSION: &str = "admission/flapping";

/// `admission.max_wait` of [`ADMISSION`]: well above the outage of
/// [`Driver::admission`], so that only the request with a tiny deadline
/// gives up at the gate.
pub(crate) const ADMISSION_MAX_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub(crate) struct Provider {
    client: reqwest::Client,
    url: String,
}

type Outcome = Result<Served<String>, PoolError<UpstreamError>>;

/// What the driver saw for one model, from the `Served` / `PoolError`
/// values the pool returned.
#[derive(Debug, Default, Clone)]
pub(crate) struct ModelTally {
    pub(crate) requests: u64,
    /// Requests whose first round did not serve them (the baseline).
    pub(crate) first_round_failed: u64,
    /// Requests that returned an error.
    pub(crate) failed: u64,
    /// Requests by `outcome/reason` label pair.
    pub(crate) by_outcome: BTreeMap<(String, String), u64>,
    pub(crate) attempts: u64,
    pub(crate) retries: u64,
    pub(crate) fallbacks: u64,
    /// Requests that waited at an admission gate (`Report::queued` > 0).
    pub(crate) queued: u64,
}

/// Per model, plus requests for models no pool serves.
#[derive(Debug, Default, Clone)]
pub(crate) struct Tally {
    pub(crate) models: BTreeMap<String, ModelTally>,
    pub(crate) unknown: u64,
}

impl Tally {
    fn record(&mut self, model: &str, outcome: &Outcome) {
        if let Err(e) = outcome
            && matches!(e.reason, retryctl::FailReason::UnknownModel { .. })
        {
            self.unknown += 1;
            return;
        }
        let t = self.models.entry(model.to_owned()).or_default();
        t.requests += 1;
        let (report, key) = match outcome {
            Ok(s) => {
                t.fallbacks += u64::from(s.fell_back);
                let outcome = if s.report.retries == 0 {
                    "success_first_try"
                } else {
                    "success_after_retry"
                };
                (&s.report, (outcome, "none"))
            }
            Err(e) => {
                t.failed += 1;
                let outcome = if e.report.retries == 0 {
                    "failed_without_retry"
                } else {
                    "failed_after_retry"
                };
                (&e.report, (outcome, e.reason.as_str()))
            }
        };
        // Served in round 1 (by any provider) = the first round did not fail.
        if outcome.is_err() || report.retries > 0 {
            t.first_round_failed += 1;
        }
        t.attempts += u64::from(report.attempts);
        t.retries += u64::from(report.retries);
        t.queued += u64::from(!report.queued.is_zero());
        *t.by_outcome
            .entry((key.0.to_owned(), key.1.to_owned()))
            .or_default() += 1;
    }

    /// Sum of `f` over every model.
    pub(crate) fn total(&self, f: impl Fn(&ModelTally) -> u64) -> u64 {
        self.models.values().map(f).sum()
    }
}

/// Fast policy for real sockets: 30 ms between rounds, 200 ms connect
/// timeout, demotion after 3 failed requests, 200 ms cool-down, no
/// admission gate (see [`admission_override`] for the model that has one).
fn policy() -> Policy {
    let mut p = Policy {
        delay: Duration::from_millis(30).into(),
        ..Policy::default()
    };
    p.timeouts.connect = Duration::from_millis(200);
    p.timeouts.attempt = Duration::from_secs(2);
    p.health.demote_after = 3;
    p.health.cooldown = Duration::from_millis(200);
    p.health.max_cooldown = Duration::from_millis(400);
    p.admission.enabled = false;
    p
}

/// The admission gate of [`ADMISSION`]: on, waits up to
/// [`ADMISSION_MAX_WAIT`], probes after 100 ms doubling to 400 ms (so the
/// reopened listener is found within 0.4 s).
fn admission_override() -> PolicyOverride {
    PolicyOverride {
        admission: AdmissionOverride {
            enabled: Some(true),
            max_wait: Some(ADMISSION_MAX_WAIT),
            probe_delay: Some(Duration::from_millis(100)),
            probe_max_delay: Some(Duration::from_millis(400)),
            ..AdmissionOverride::default()
        },
        ..PolicyOverride::default()
    }
}

/// The pools, their fault servers (kept alive as long as the driver) and
/// the policy file of the starved pool.
pub(crate) struct Driver {
    /// Shared with the concurrent requests of [`Driver::admission`].
    main: Arc<Pool<Provider>>,
    starved: Pool<Provider>,
    pub(crate) tally: Tally,
    _servers: Vec<HttpServer>,
    /// The only provider of [`ADMISSION`].
    flapping: ReopeningServer,
    starved_policy: Policy,
    pub(crate) live: LivePolicy,
    pub(crate) watcher: PolicyWatcher,
    policy_file: std::path::PathBuf,
    _policy_dir: tempfile::TempDir,
}

fn repeat(pattern: &[Reply], times: usize) -> Vec<Reply> {
    pattern
        .iter()
        .cycle()
        .take(pattern.len() * times)
        .cloned()
        .collect()
}

impl Driver {
    /// Starts the fault servers and builds the pools. The metrics recorder
    /// must already be installed: the pools resolve their handles here.
    pub(crate) async fn new() -> Self {
        let policy = policy();
        let client = upstream::client_builder(&policy.timeouts)
            .pool_max_idle_per_host(0)
            .build()
            .expect("reqwest client");
        let provider = |url: String| Provider {
            client: client.clone(),
            url,
        };

        let flaky = HttpServer::start(repeat(
            &[
                Reply::ok("a"),
                Reply::reset(),
                Reply::ok("a"),
                Reply::status(502),
                Reply::ok("a"),
                Reply::close(),
            ],
            100,
        ))
        .await;
        let healthy = HttpServer::always(Reply::ok("b")).await;
        let mut glm_script = vec![Reply::status(502); 8];
        glm_script.extend(repeat(&[Reply::reset(), Reply::ok("glm")], 200));
        let glm = HttpServer::start(glm_script).await;
        let kimi = HttpServer::start(repeat(
            &[
                Reply::status(429).header("Retry-After", "3600"),
                Reply::ok("kimi"),
                Reply::status(400).body("invalid request: messages must not be empty"),
                Reply::ok("kimi"),
            ],
            100,
        ))
        .await;

        let flapping = ReopeningServer::start(Reply::ok("admitted")).await;

        let mut main_policy = policy.clone();
        main_policy
            .models
            .insert(ADMISSION.to_owned(), admission_override());
        let main = Pool::builder()
            .policy(LivePolicy::new(main_policy).expect("valid policy"))
            .provider(GPT, "proxy-a", provider(flaky.url()))
            .provider(GPT, "proxy-b", provider(healthy.url()))
            .provider(GLM, "proxy", provider(glm.url()))
            .provider(QWEN, "vm", provider(format!("http://{}", closed_port())))
            .provider(KIMI, "proxy", provider(kimi.url()))
            .provider(ADMISSION, "vm", provider(flapping.url()))
            .build()
            .expect("pool");
        let starved_policy = Policy {
            budget: BudgetPolicy {
                ratio: 0.0,
                min_per_second: 0,
                ..BudgetPolicy::default()
            },
            ..policy
        };
        let live = LivePolicy::new(starved_policy.clone()).expect("valid policy");
        let starved = Pool::builder()
            .policy(live.clone())
            .provider(
                STARVED,
                "proxy",
                provider(format!("http://{}", closed_port())),
            )
            .build()
            .expect("pool");
        let policy_dir = tempfile::tempdir().expect("temp dir");
        let policy_file = policy_dir.path().join("policy.toml");
        std::fs::write(&policy_file, starved_policy.to_toml()).expect("write policy.toml");
        let watcher = PolicyWatcher::start(
            &policy_file,
            live.clone(),
            ReloadOptions::default()
                .events(false)
                .poll_interval(None)
                .settle(Duration::ZERO),
        )
        .expect("watch policy.toml");
        Driver {
            main: Arc::new(main),
            starved,
            tally: Tally::default(),
            _servers: vec![flaky, healthy, glm, kimi],
            flapping,
            starved_policy,
            live,
            watcher,
            policy_file,
            _policy_dir: policy_dir,
        }
    }

    /// Reload step `n` of the policy file: 0 a changed policy (applied),
    /// 1 the same file again (unchanged), 2 a broken file (rejected), then
    /// nothing. Waits until the watcher has counted the re-read.
    pub(crate) async fn reload_step(&mut self, n: usize) {
        let text = match n {
            0 => {
                self.starved_policy.jitter = 0.3;
                self.starved_policy.to_toml()
            }
            1 => self.starved_policy.to_toml(),
            2 => "max_rounds = \"two\"\n".to_owned(),
            _ => return,
        };
        std::fs::write(&self.policy_file, text).expect("write policy.toml");
        let before = self.watcher.counts();
        self.watcher.reload_now();
        let total = |c: ReloadCounts| c.applied + c.unchanged + c.rejected;
        for _ in 0..100 {
            if total(self.watcher.counts()) > total(before) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the policy watcher did not re-read the file: {before:?}");
    }

    async fn call(&mut self, starved: bool, model: &str, options: CallOptions) {
        let pool = if starved { &self.starved } else { &*self.main };
        let outcome = request(pool, model, options).await;
        self.tally.record(model, &outcome);
    }

    /// One wave of traffic: a few requests of every kind, one at a time
    /// (the scripted servers answer in order).
    pub(crate) async fn wave(&mut self) {
        let default = CallOptions::default();
        for _ in 0..6 {
            self.call(false, GPT, default).await;
        }
        for _ in 0..3 {
            self.call(false, GLM, default).await;
        }
        for _ in 0..2 {
            self.call(false, QWEN, default).await;
        }
        // Refused in round 1, and the ~30 ms wait does not fit in 10 ms.
        self.call(false, QWEN, CallOptions::timeout(Duration::from_millis(10)))
            .await;
        for _ in 0..4 {
            self.call(false, KIMI, default).await;
        }
        for _ in 0..2 {
            self.call(true, STARVED, default).await;
        }
        self.call(false, UNKNOWN, default).await;
    }
}

impl Driver {
    /// The admission phase, on [`ADMISSION`] (a single provider):
    ///
    /// 1. two requests while the upstream listens: served, the gate open;
    /// 2. the listener closes (connects are refused) and 20 requests
    ///    arrive, one every 70 ms, while the port stays closed for 1.5 s,
    ///    then the listener reopens on the same port. With the gate, the
    ///    first refusals shrink the provider's limit and mark it down; the
    ///    other requests wait at the gate (FIFO) while a probe fails every
    ///    100..400 ms; the first probe after the reopening succeeds, the
    ///    provider recovers and the waiting requests are admitted;
    /// 3. in the middle of the outage, with requests already waiting, one
    ///    request with a 50 ms deadline: it gives up at the gate
    ///    (`admission_timeout`);
    /// 4. three requests after the reopening.
    ///
    /// Without a gate, the outage's requests fail in rounds on refused
    /// connections instead (the provider is demoted, then recovers).
    pub(crate) async fn admission(&mut self) {
        const REQUESTS: u32 = 20;
        const EVERY: Duration = Duration::from_millis(70);
        const OUTAGE: Duration = Duration::from_millis(1500);
        let default = CallOptions::default();
        for _ in 0..2 {
            self.call(false, ADMISSION, default).await;
        }

        self.flapping.close().await;
        let mut requests = tokio::task::JoinSet::new();
        let spawn = |requests: &mut tokio::task::JoinSet<Outcome>, at, options| {
            let pool = self.main.clone();
            requests.spawn(async move {
                tokio::time::sleep(at).await;
                request(&pool, ADMISSION, options).await
            });
        };
        for i in 0..REQUESTS {
            spawn(&mut requests, EVERY * i, default);
        }
        spawn(
            &mut requests,
            EVERY * (REQUESTS / 2) + EVERY / 2,
            CallOptions::timeout(Duration::from_millis(50)),
        );
        tokio::time::sleep(OUTAGE).await;
        self.flapping.reopen();
        while let Some(outcome) = requests.join_next().await {
            self.tally
                .record(ADMISSION, &outcome.expect("admission request task"));
        }

        tokio::time::sleep(Duration::from_millis(100)).await;
        for _ in 0..3 {
            self.call(false, ADMISSION, default).await;
        }
    }
}

/// One request for `model` through `pool`: a POST to the provider's
/// `/v1/chat/completions`.
async fn request(pool: &Pool<Provider>, model: &str, options: CallOptions) -> Outcome {
    pool.call_with(model, options, |p: &Provider| {
        let request = p
            .client
            .post(format!("{}/v1/chat/completions", p.url))
            .body("{}");
        async move {
            let response = upstream::check(request.send().await?).await?;
            Ok(response.text().await?)
        }
    })
    .await
}

/// One route's health as the pool reports it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RouteHealth {
    pub(crate) model: String,
    pub(crate) provider: String,
    pub(crate) demoted: bool,
    pub(crate) demotions: u64,
    pub(crate) recoveries: u64,
}

impl Driver {
    /// Every route's health, from both pools.
    pub(crate) fn health(&self) -> Vec<RouteHealth> {
        self.main
            .stats()
            .into_iter()
            .chain(self.starved.stats())
            .map(|s| RouteHealth {
                model: s.model.to_string(),
                provider: s.provider.to_string(),
                demoted: s.health.demoted,
                demotions: s.health.demotions,
                recoveries: s.health.recoveries,
            })
            .collect()
    }
}
