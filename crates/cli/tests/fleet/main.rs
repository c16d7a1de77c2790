//! A fleet, as `deploy/kubernetes/` runs it: three `retryctl serve`
//! replicas (real processes, each with its configuration in a
//! ConfigMap-style volume), each in front of its own faulty loopback
//! upstreams, and one real Prometheus scraping all three, as the
//! ServiceMonitor has prometheus-operator scrape every pod.
//!
//! Each replica keeps its own retry budget, admission gates and provider
//! health; the dashboard is where the fleet is one. So the test sends
//! different amounts of traffic through each replica (weights 1, 2, 3;
//! fallbacks, retries that work and that fail, client errors, an upstream
//! that refuses connections, unknown models), then checks every panel of
//! `dashboards/retryctl.json` (its PromQL as Grafana would send it for
//! "All") against what the replicas report themselves:
//!
//! * A panel that sums replicas (counters, histogram buckets) must show,
//!   over the three replicas, what the same query shows over one target
//!   that serves the element-wise **sum of the three replicas' own
//!   `/metrics`**: what a single process would report had it served all
//!   the traffic. Ratios, quantiles and filters included: the query is the
//!   panel's, with `rate(X[w])` read as `X` (totals; see `panels.rs`).
//! * A panel that takes the `max` or `min` over replicas (gauges: a
//!   provider demoted or down, gate limits, the reload state, the budget
//!   scale) must show the element-wise max or min of their `/metrics`.
//! * "Active policy" counts replicas per policy hash: 3 on the shipped
//!   policy; 1 and 2 while a `..data` swap has reached two replicas (what
//!   `RetryctlPolicyVersionsDiverge` watches); 3 on the new one after. A
//!   rejected file on one replica turns "Policy file" to FAILING while all
//!   three keep running the last good policy.
//!
//! The comparison is shown to discriminate: the same baseline panel with
//! `max` in place of `sum` must not match. At the end every replica is
//! stopped with SIGTERM, as the kubelet stops a pod, and exits 0.
//!
//! Needs `prometheus` (skipped without it unless `RETRYCTL_REQUIRE_TOOLS=1`).

#[path = "../../../../tests/prometheus/promql.rs"]
#[allow(dead_code)]
mod promql;
#[path = "../../../../tests/prometheus/server.rs"]
#[allow(dead_code)]
mod server;
#[path = "../../../../tests/prometheus/tools.rs"]
#[allow(dead_code)]
mod tools;

#[path = "../kubernetes/volume.rs"]
mod volume;

mod exposition;
mod panels;
mod replica;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use exposition::{Combine, Series};
use panels::Aggregation;
use replica::Replica;
use retryctl::policy::{LivePolicy, Policy};
use retryctl_testkit::{HttpServer, Reply, closed_port};
use server::Prometheus;

/// Writes past the test harness's capture: the report is meant to be read.
fn note(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{text}");
}

const COMPLETION: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}"#;

/// The fleet's policy: the shipped defaults, with waits short enough for
/// a test (20 ms between rounds, 200 ms at most at a gate).
const POLICY: &str = r#"max_rounds = 2
delay = "20ms"
jitter = 0.0

[timeouts]
connect = "200ms"
attempt = "5s"
request = "30s"

[admission]
max_wait = "200ms"
"#;

/// Requests per model for a replica of weight 1.
const TRAFFIC: &[(&str, usize)] = &[
    // 502 from the first provider every third request: served by the
    // second one in the same round (a fallback).
    ("chat-failover", 6),
    // 503, ok, ok, 503, 503: retried in round 2, which works or fails.
    ("chat-flaky", 6),
    // 400: a client error, returned at once, never retried.
    ("chat-strict", 2),
    // Connection refused: waits at the admission gate, then fails.
    ("chat-down", 2),
    // Not configured: 404, counted apart.
    ("no-such-model", 1),
];

/// One replica's upstreams: its own, as each pod reaches the providers
/// through its own connections.
struct Upstreams {
    primary: HttpServer,
    backup: HttpServer,
    flaky: HttpServer,
    strict: HttpServer,
    down: SocketAddr,
}

fn cycle(pattern: &[Reply]) -> Vec<Reply> {
    pattern.iter().cycle().take(300).cloned().collect()
}

impl Upstreams {
    async fn start() -> Self {
        let ok = Reply::json(COMPLETION);
        Upstreams {
            primary: HttpServer::start(cycle(&[Reply::status(502), ok.clone(), ok.clone()])).await,
            backup: HttpServer::always(ok.clone()).await,
            flaky: HttpServer::start(cycle(&[
                Reply::status(503),
                ok.clone(),
                ok.clone(),
                Reply::status(503),
                Reply::status(503),
            ]))
            .await,
            strict: HttpServer::always(Reply::status(400).body(
                r#"{"error":{"message":"messages is required","type":"invalid_request_error"}}"#,
            ))
            .await,
            down: closed_port(),
        }
    }

    /// A replica's gateway.toml: loopback listeners on free ports, the
    /// policy file beside it, as in the ConfigMap.
    fn gateway_toml(&self) -> String {
        format!(
            r#"listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
policy = "policy.toml"
shutdown_timeout = "2s"

[providers.primary]
base_url = "{}/v1"
[providers.backup]
base_url = "{}/v1"
[providers.flaky]
base_url = "{}/v1"
[providers.strict]
base_url = "{}/v1"
[providers.down]
base_url = "http://{}/v1"

[[models]]
name = "chat-failover"
providers = ["primary", "backup"]
[[models]]
name = "chat-flaky"
providers = ["flaky"]
[[models]]
name = "chat-strict"
providers = ["strict"]
[[models]]
name = "chat-down"
providers = ["down"]
"#,
            self.primary.url(),
            self.backup.url(),
            self.flaky.url(),
            self.strict.url(),
            self.down,
        )
    }
}

/// A scrape target serving the text it is given: the replicas' series
/// combined. Stops when dropped.
struct Combined {
    addr: SocketAddr,
    how: Combine,
    text: Arc<Mutex<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Combined {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Combined {
    async fn start(how: Combine) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let text = Arc::new(Mutex::new(String::new()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let shared = text.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = shared.clone();
                // One scrape per connection: read the request head, answer
                // with the current text, close.
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let body = shared.lock().unwrap().clone();
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Combined {
            addr,
            how,
            text,
            task,
        }
    }

    fn serve(&self, replicas: &[Series]) {
        *self.text.lock().unwrap() = exposition::render(&exposition::combine(replicas, self.how));
    }
}

/// `instance=~"a|b|c"` for these targets (a raw string: dots escaped once).
fn instances(addrs: &[SocketAddr]) -> String {
    let alternatives: Vec<String> = addrs
        .iter()
        .map(|a| a.to_string().replace('.', "\\."))
        .collect();
    format!("instance=~`{}`", alternatives.join("|"))
}

/// A query's answer as `labels (JSON) -> value`.
type Answer = BTreeMap<String, f64>;

async fn query(prom: &Prometheus, expr: &str) -> Answer {
    prom.query(expr)
        .await
        .unwrap_or_else(|e| panic!("{expr}: {e}"))
        .into_iter()
        .map(|s| (Value::Object(s.labels).to_string(), s.value))
        .collect()
}

/// Polls `expr` until `done(result)`; the last result either way.
async fn poll(
    prom: &Prometheus,
    expr: &str,
    timeout: Duration,
    done: impl Fn(&Answer) -> bool,
) -> Answer {
    let started = Instant::now();
    loop {
        let result = query(prom, expr).await;
        if done(&result) || started.elapsed() > timeout {
            return result;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn same(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

fn same_result(a: &Answer, b: &Answer) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, va), (kb, vb))| ka == kb && same(*va, *vb))
}

fn labels(pairs: &[(&str, &str)]) -> String {
    let map: serde_json::Map<String, Value> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
        .collect();
    Value::Object(map).to_string()
}

/// One panel query, over the fleet and over the combined target.
struct Check {
    panel: String,
    ref_id: String,
    aggregation: Aggregation,
    query: String,
    fleet: Answer,
    combined: Answer,
}

impl Check {
    fn equal(&self) -> bool {
        same_result(&self.fleet, &self.combined)
    }

    fn has_data(&self) -> bool {
        self.fleet.values().any(|v| v.is_finite() && *v != 0.0)
    }
}

/// The policy hash a replica's `/metrics` reports in force.
fn policy_hash(series: &Series) -> String {
    let hashes: Vec<&str> = series
        .iter()
        .filter(|(k, v)| k.starts_with("retryctl_policy_info{") && **v == 1.0)
        .filter_map(|(k, _)| k.split("hash=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(hashes.len(), 1, "one policy in force: {hashes:?}");
    hashes[0].to_owned()
}

fn version_of(policy: &str) -> String {
    let policy = Policy::from_toml(policy).expect("a valid policy");
    format!("{:016x}", LivePolicy::new(policy).unwrap().load().version())
}

async fn scrape_all(replicas: &[Replica], http: &reqwest::Client) -> Vec<Series> {
    let mut out = Vec::new();
    for r in replicas {
        out.push(exposition::parse(&r.scrape(http).await));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_fleet_as_the_sum_of_its_replicas() {
    const TEST: &str = "the_dashboard_shows_the_fleet_as_the_sum_of_its_replicas";
    let Some(prometheus) = tools::require("prometheus", TEST) else {
        return;
    };
    let started = Instant::now();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    // ---- three replicas, each with its own upstreams
    let mut upstreams = Vec::new();
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let u = Upstreams::start().await;
        replicas.push(Replica::start(&u.gateway_toml(), POLICY).await);
        upstreams.push(u);
    }
    let combined = [
        Combined::start(Combine::Sum).await,
        Combined::start(Combine::Max).await,
        Combined::start(Combine::Min).await,
    ];
    let fleet_addrs: Vec<SocketAddr> = replicas.iter().map(|r| r.metrics).collect();
    let mut targets = fleet_addrs.clone();
    targets.extend(combined.iter().map(|c| c.addr));
    let prom = Prometheus::start_scraping(&prometheus, &targets, &[]).await;
    let fleet = instances(&fleet_addrs);
    let all = instances(&targets);
    let up = poll(
        &prom,
        &format!("count(up{{{all}}} == 1)"),
        Duration::from_secs(20),
        |r| r.values().next() == Some(&6.0),
    )
    .await;
    assert_eq!(
        up.values().next(),
        Some(&6.0),
        "every target up:\n{}",
        prom.log()
    );

    // ---- traffic: weight 1, 2 and 3, through each replica's own listener
    let sends: Vec<_> = replicas
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let http = http.clone();
            let url = format!("http://{}/v1/chat/completions", r.listen);
            tokio::spawn(async move {
                let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
                for (model, n) in TRAFFIC {
                    for _ in 0..n * (i + 1) {
                        let body = serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
                        let status = http
                            .post(&url)
                            .header("content-type", "application/json")
                            .body(body.to_string())
                            .send()
                            .await
                            .expect("the replica answers")
                            .status()
                            .as_u16();
                        *statuses.entry(status).or_default() += 1;
                    }
                }
                statuses
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for send in sends {
        statuses.push(send.await.expect("traffic task"));
    }
    for (i, s) in statuses.iter().enumerate() {
        note(&format!("replica {i} (weight {}): answers {s:?}", i + 1));
        for code in [200, 400, 404] {
            assert!(s.contains_key(&code), "replica {i}: no {code} in {s:?}");
        }
        assert!(
            s.keys().any(|c| *c >= 500),
            "replica {i}: no failure in {s:?}"
        );
    }
    for (i, u) in upstreams.iter().enumerate() {
        assert!(
            u.primary.hits() > 0 && u.backup.hits() > 0 && u.flaky.hits() > 0,
            "replica {i}'s upstreams"
        );
    }

    // ---- the dashboard's queries, as Grafana sends them for "All"
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../dashboards/retryctl.json"
        ))
        .expect("the dashboard"),
    )
    .expect("the dashboard is JSON");
    let vars = promql::variable_values(&dashboard);
    let queries: Vec<(promql::PanelQuery, String)> = promql::dashboard_queries(&dashboard)
        .into_iter()
        .map(|q| {
            let expr =
                promql::substitute(&q.expr, &vars).unwrap_or_else(|e| panic!("{}: {e}", q.panel));
            (q, expr)
        })
        .collect();
    assert!(queries.len() >= 40, "{} dashboard queries", queries.len());

    // ---- a consistent snapshot: the replicas' /metrics, served combined,
    // scraped by Prometheus after both were taken, unchanged at the end
    let mut attempt = 0;
    let (series, checks, skipped) = loop {
        attempt += 1;
        let series = scrape_all(&replicas, &http).await;
        for c in &combined {
            c.serve(&series);
        }
        let taken = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let scraped = poll(
            &prom,
            &format!("min(timestamp(up{{{all}}}))"),
            Duration::from_secs(15),
            |r| r.values().next().is_some_and(|t| *t > taken),
        )
        .await;
        assert!(
            scraped.values().next().is_some_and(|t| *t > taken),
            "no scrape of every target after the snapshot: {scraped:?}"
        );
        let mut checks = Vec::new();
        let mut skipped = Vec::new();
        for (q, expr) in &queries {
            let aggregation = match panels::aggregation(expr) {
                Ok(a) => a,
                Err(why) => {
                    skipped.push(format!("{} {}: {why}", q.panel, q.ref_id));
                    continue;
                }
            };
            let target = match aggregation {
                Aggregation::Sum => &combined[0],
                Aggregation::Max => &combined[1],
                Aggregation::Min => &combined[2],
            };
            let totals = panels::instant(expr);
            let fleet_query = panels::restrict(&totals, &fleet);
            let combined_query =
                panels::restrict(&totals, &format!("instance=\"{}\"", target.addr));
            checks.push(Check {
                panel: q.panel.clone(),
                ref_id: q.ref_id.clone(),
                aggregation,
                fleet: query(&prom, &fleet_query).await,
                combined: query(&prom, &combined_query).await,
                query: fleet_query,
            });
        }
        if scrape_all(&replicas, &http).await == series {
            break (series, checks, skipped);
        }
        // The policy file's 30 s re-read counts an `unchanged` reload.
        assert!(
            attempt < 3,
            "the replicas' metrics kept changing during the comparison"
        );
        note("a replica's metrics changed during the comparison; comparing again");
    };

    // ---- the report, then the verdict
    let mut mismatches = Vec::new();
    for c in &checks {
        let verdict = if c.equal() { "equal" } else { "DIFFERENT" };
        note(&format!(
            "{:?} {} {}: {} series, {verdict}{}",
            c.aggregation,
            c.panel,
            c.ref_id,
            c.fleet.len(),
            if c.has_data() {
                ""
            } else {
                " (no nonzero value)"
            }
        ));
        if c.aggregation != Aggregation::Sum && panels::reads_counters(&c.query) {
            mismatches.push(format!(
                "{} {}: takes the {:?} of counters across replicas; a fleet's counters add up: {}",
                c.panel, c.ref_id, c.aggregation, c.query
            ));
        }
        if !c.equal() {
            mismatches.push(format!(
                "{} {} ({:?}):\n  {}\n  fleet:    {:?}\n  combined: {:?}",
                c.panel, c.ref_id, c.aggregation, c.query, c.fleet, c.combined
            ));
        }
    }
    for s in &skipped {
        note(&format!("not a combination of replicas: {s}"));
    }
    assert!(
        mismatches.is_empty(),
        "panels that do not add up:\n{}",
        mismatches.join("\n")
    );

    // The comparison is not vacuous.
    let count = |a: Aggregation| checks.iter().filter(|c| c.aggregation == a).count();
    let with_data = checks.iter().filter(|c| c.has_data()).count();
    note(&format!(
        "{} panel queries compared ({} sum, {} max, {} min), {with_data} with nonzero values; {} not combinations",
        checks.len(),
        count(Aggregation::Sum),
        count(Aggregation::Max),
        count(Aggregation::Min),
        skipped.len()
    ));
    assert!(
        count(Aggregation::Sum) >= 30
            && count(Aggregation::Max) >= 5
            && count(Aggregation::Min) >= 1
    );
    assert!(with_data >= 25, "only {with_data} panel queries with data");
    let check = |panel: &str, ref_id: &str| {
        checks
            .iter()
            .find(|c| c.panel == panel && c.ref_id == ref_id)
            .unwrap_or_else(|| panic!("no panel {panel:?} {ref_id}"))
    };
    for (panel, ref_id) in [
        ("Failures/day without retry (baseline)", "A"),
        ("Failures/day after retry", "A"),
        ("Retry rate", "A"),
        ("Fallback share", "A"),
        ("Failure reasons", "B"),
        ("Admission outcomes", "A"),
    ] {
        assert!(check(panel, ref_id).has_data(), "{panel} {ref_id}: no data");
    }
    let providers = &check("Attempts by provider", "A").fleet;
    assert_eq!(
        providers.len(),
        5,
        "every provider of every replica's config: {providers:?}"
    );
    let reasons: Vec<&String> = check("Failure reasons", "A").fleet.keys().collect();
    for reason in ["permanent", "rounds_exhausted", "admission_timeout"] {
        assert!(
            reasons
                .iter()
                .any(|k| k.contains(&format!("\"reason\":\"{reason}\""))),
            "failure reason {reason}: {reasons:?}"
        );
    }

    // The replicas differ, so a panel taking the max instead of the sum
    // would not match: the check discriminates.
    let requests: Vec<f64> = series
        .iter()
        .map(|s| {
            s.iter()
                .filter(|(k, _)| k.starts_with("retryctl_requests_total{"))
                .map(|(_, v)| v)
                .sum()
        })
        .collect();
    note(&format!(
        "requests per replica, from its own /metrics: {requests:?}"
    ));
    assert!(
        requests[0] < requests[1] && requests[1] < requests[2],
        "{requests:?}"
    );
    let baseline = &queries
        .iter()
        .find(|(q, _)| q.panel == "Failures/day without retry (baseline)")
        .unwrap()
        .1;
    let as_max = panels::restrict(
        &panels::instant(&baseline.replacen("sum(", "max(", 1)),
        &fleet,
    );
    let summed = &check("Failures/day without retry (baseline)", "A").combined;
    let maxed = query(&prom, &as_max).await;
    assert!(
        !same_result(&maxed, summed),
        "max over replicas {maxed:?} = their sum {summed:?}"
    );

    // ---- "Active policy": the replicas per policy hash
    let active = panels::restrict("count by (hash) (retryctl_policy_info == 1)", &fleet);
    let active_query = queries
        .iter()
        .find(|(q, _)| q.panel == "Active policy")
        .map(|(_, e)| panels::restrict(e, &fleet))
        .expect("the Active policy panel");
    assert_eq!(active_query, active, "the panel counts replicas per hash");
    let shipped = version_of(POLICY);
    for (i, s) in series.iter().enumerate() {
        assert_eq!(policy_hash(s), shipped, "replica {i}'s /metrics");
    }
    assert_eq!(
        query(&prom, &active).await,
        BTreeMap::from([(labels(&[("hash", &shipped)]), 3.0)])
    );

    // A policy change rolls out as the kubelet syncs each pod's volume:
    // two replicas first, the third later.
    let edited = POLICY.replace("max_rounds = 2", "max_rounds = 3");
    let new = version_of(&edited);
    let gateway_tomls: Vec<String> = upstreams.iter().map(Upstreams::gateway_toml).collect();
    for (r, g) in replicas.iter_mut().zip(&gateway_tomls).take(2) {
        r.volume
            .update(&[("gateway.toml", g), ("policy.toml", &edited)]);
    }
    let halfway = BTreeMap::from([
        (labels(&[("hash", &shipped)]), 1.0),
        (labels(&[("hash", &new)]), 2.0),
    ]);
    let seen = poll(&prom, &active, Duration::from_secs(15), |r| *r == halfway).await;
    assert_eq!(
        seen, halfway,
        "two replicas on the new policy, one on the old"
    );
    replicas[2].volume.update(&[
        ("gateway.toml", &gateway_tomls[2]),
        ("policy.toml", &edited),
    ]);
    let done = BTreeMap::from([(labels(&[("hash", &new)]), 3.0)]);
    let seen = poll(&prom, &active, Duration::from_secs(15), |r| *r == done).await;
    assert_eq!(seen, done, "the whole fleet on the new policy");

    // A rejected file on one replica: "Policy file" shows FAILING, and
    // every replica keeps the last good policy.
    let failing_query = queries
        .iter()
        .find(|(q, _)| q.panel == "Policy file")
        .map(|(_, e)| panels::restrict(e, &fleet))
        .expect("the Policy file panel");
    assert_eq!(
        query(&prom, &failing_query)
            .await
            .values()
            .collect::<Vec<_>>(),
        [&0.0]
    );
    replicas[0].volume.update(&[
        ("gateway.toml", &gateway_tomls[0]),
        ("policy.toml", "max_rounds = 99\n"),
    ]);
    let failing = poll(&prom, &failing_query, Duration::from_secs(15), |r| {
        r.values().any(|v| *v == 1.0)
    })
    .await;
    assert_eq!(
        failing.values().collect::<Vec<_>>(),
        [&1.0],
        "Policy file: FAILING"
    );
    assert_eq!(
        query(&prom, &active).await,
        done,
        "the last good policy stays"
    );

    // ---- SIGTERM, as the kubelet stops a pod after preStop
    for (i, r) in replicas.into_iter().enumerate() {
        let (status, log) = r.terminate(Duration::from_secs(10)).await;
        assert!(status.success(), "replica {i}: {status}\n{log}");
        assert!(log.contains("shutting down"), "replica {i}:\n{log}");
    }
    note(&format!("{TEST}: {:.1} s", started.elapsed().as_secs_f64()));
}
