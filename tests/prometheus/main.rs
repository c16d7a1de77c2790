//! The Grafana dashboard and the Prometheus alert rules in `dashboards/`,
//! checked with the real tools.
//!
//! * `promtool check rules` and `promtool test rules` on the alert rules
//!   and their unit tests.
//! * The dashboard's structure (no tool needed): variables, descriptions,
//!   data sources, and every metric name it uses is one the library
//!   exports.
//! * End to end: this process installs the library's Prometheus exporter
//!   (`retryctl_gateway::metrics_endpoint::serve`) on an ephemeral loopback port, drives
//!   faulty traffic through real `retryctl::Pool`s (fault servers from
//!   `retryctl-testkit`), and a real `prometheus` scrapes it every second with
//!   `dashboards/alerts.yml` loaded. Then every PromQL expression of the
//!   dashboard (variables substituted as for "All", 1-minute intervals) and
//!   of the alert rules (as Prometheus loaded them, from `/api/v1/rules`)
//!   is evaluated through `/api/v1/query`: each must parse and return data
//!   (at least one series with a finite value; a `histogram_quantile` is NaN
//!   for a model with no observation, so NaN series alone do not count).
//!   An alert's expression ends in a threshold and is legitimately empty
//!   while the alert does not fire, so its full expression must parse and
//!   its left-hand side (the final top-level comparison with a number
//!   stripped, see `promql::strip_final_comparison`) must return data. The
//!   baseline and post-retry series must equal what the driver counted from
//!   the pool's own `Served` / `PoolError` reports, and `promtool check
//!   metrics` must find nothing to say about the `/metrics` text.
//!
//! Tests that need `promtool` or `prometheus` skip (with a message on
//! stderr) when it is not installed, unless `RETRYCTL_REQUIRE_TOOLS=1`
//! (`.ci/run` sets it), in which case they fail.

use retryctl_testkit as support;

mod promql;
mod server;
mod tools;
mod traffic;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use retryctl::reload::ReloadCounts;
use server::Prometheus;
use tools::{dashboards, describe, require, run};
use traffic::Driver;

/// Every metric the library exports (histograms by their base name).
const METRICS: &[&str] = &[
    "retryctl_requests_total",
    "retryctl_first_round_failures_total",
    "retryctl_fallbacks_total",
    "retryctl_attempts_total",
    "retryctl_retries_total",
    "retryctl_retries_skipped_total",
    "retryctl_provider_demotions_total",
    "retryctl_provider_recoveries_total",
    "retryctl_unknown_model_requests_total",
    "retryctl_policy_reloads_total",
    "retryctl_provider_demoted",
    "retryctl_retry_budget_scale",
    "retryctl_policy_info",
    "retryctl_policy_reload_failing",
    "retryctl_policy_last_reload_success_timestamp_seconds",
    "retryctl_attempt_duration_seconds",
    "retryctl_request_duration_seconds",
    "retryctl_attempts_per_request",
    "retryctl_retry_delay_seconds",
    "retryctl_order_decisions_total",
    "retryctl_retry_delay_decisions_total",
    "retryctl_learned_retry_delay_seconds",
    "retryctl_shadow_decisions_total",
    "retryctl_shadow_failures_total",
    "retryctl_admission_limit",
    "retryctl_admission_down",
    "retryctl_admission_in_flight",
    "retryctl_admission_waiting",
    "retryctl_admission_wait_seconds",
    "retryctl_admission_total",
    "retryctl_admission_transitions_total",
    "retryctl_admission_max_wait_seconds",
];

const HISTOGRAMS: &[&str] = &[
    "retryctl_attempt_duration_seconds",
    "retryctl_request_duration_seconds",
    "retryctl_attempts_per_request",
    "retryctl_retry_delay_seconds",
    "retryctl_admission_wait_seconds",
];

/// Lint messages of `promtool check metrics` accepted on the exporter's
/// output: none. (Add `(metric, message)` pairs here, with the reason, only
/// for something the exporter cannot avoid.)
const ACCEPTED_METRIC_LINTS: &[(&str, &str)] = &[];

/// PENDING LIBRARY WORK, not accepted behaviour: metrics the dashboard and
/// the alerts are built on that `retryctl::telemetry` does not export yet.
/// While one of them is absent from `/metrics`, a query that has no data
/// *only because of it* is reported as PENDING on stderr instead of
/// failing. The allowance ends by itself, metric by metric, as soon as the
/// exporter serves the metric.
///
/// The admission gate's metrics (the Admission row, the
/// `RetryctlAdmission*` alerts): the gate is not in the pool yet. Once it
/// is, the end-to-end test also checks what `traffic::Driver::admission`
/// must have produced at the gate.
const PENDING_METRICS: &[&str] = &[
    "retryctl_admission_limit",
    "retryctl_admission_down",
    "retryctl_admission_in_flight",
    "retryctl_admission_waiting",
    "retryctl_admission_wait_seconds",
    "retryctl_admission_total",
    "retryctl_admission_transitions_total",
    "retryctl_admission_max_wait_seconds",
];

/// PENDING LIBRARY WORK: `promtool check metrics` lints tolerated while the
/// exporter does not describe its metrics (`metrics::describe_*!`, which
/// renders `# HELP`). Reported as PENDING on stderr; empty this list once
/// the library describes them.
const PENDING_METRIC_LINTS: &[&str] = &[];

/// Writes straight to the process's stderr, past the test harness's
/// capture: a PENDING note must be seen even when the test passes.
fn note(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{text}");
}

fn dashboard() -> Value {
    let path = dashboards().join("retryctl.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every `retryctl_*` metric name in `text`, histogram series reduced to
/// their base name.
fn metric_names(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("retryctl_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| HISTOGRAMS.contains(b)))
            .unwrap_or(name);
        out.push(base.to_owned());
        rest = &tail[end..];
    }
    out
}

// ------------------------------------------------------------------ promtool

#[test]
fn alert_rules_pass_promtool_check() {
    let Some(promtool) = require("promtool", "alert_rules_pass_promtool_check") else {
        return;
    };
    let args = ["check", "rules", "alerts.yml"];
    let out = run(&promtool, &args, &dashboards(), None);
    let log = describe(&promtool, &args, &out);
    eprintln!("{log}");
    assert!(out.status.success(), "{log}");
}

#[test]
fn alert_rules_pass_their_unit_tests() {
    let Some(promtool) = require("promtool", "alert_rules_pass_their_unit_tests") else {
        return;
    };
    let args = ["test", "rules", "alerts.test.yml"];
    let out = run(&promtool, &args, &dashboards(), None);
    let log = describe(&promtool, &args, &out);
    eprintln!("{log}");
    assert!(out.status.success(), "{log}");
}

// ------------------------------------------------------------------ structure

#[test]
fn dashboard_is_well_formed() {
    let d = dashboard();
    assert!(
        d["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion"
    );
    assert!(d["uid"].is_string() && d["title"].is_string());

    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no variable {name}"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for (name, source) in [
        ("model", "retryctl_requests_total"),
        ("provider", "retryctl_attempts_total"),
    ] {
        let v = var(name);
        assert_eq!(v["type"], "query", "{name}");
        assert_eq!(v["multi"], true, "{name}");
        assert_eq!(v["includeAll"], true, "{name}");
        assert_eq!(v["allValue"], ".*", "{name}");
        let definition = v["definition"].as_str().unwrap_or_default();
        assert!(
            definition.starts_with(&format!("label_values({source}"))
                && definition.ends_with(&format!(", {name})")),
            "{name}: {definition}"
        );
        assert_eq!(v["query"]["query"], definition, "{name}");
    }
    let reference = var("reference_failures_per_day");
    assert!(matches!(
        reference["type"].as_str(),
        Some("textbox" | "constant")
    ));
    assert_eq!(reference["query"], "9500");

    let mut ids = Vec::new();
    let mut used = Vec::new();
    let mut panels: Vec<&Value> = d["panels"].as_array().expect("panels").iter().collect();
    while let Some(p) = panels.pop() {
        panels.extend(p["panels"].as_array().into_iter().flatten());
        let title = p["title"].as_str().unwrap_or("<untitled>");
        ids.push(p["id"].as_u64().unwrap_or_else(|| panic!("{title}: no id")));
        let grid = &p["gridPos"];
        let (x, w) = (
            grid["x"].as_u64().unwrap_or(99),
            grid["w"].as_u64().unwrap_or(99),
        );
        assert!(
            x + w <= 24 && grid["h"].as_u64().is_some(),
            "{title}: gridPos {grid}"
        );
        if p["type"] == "row" {
            continue;
        }
        let description = p["description"].as_str().unwrap_or_default();
        assert!(
            description.len() > 60,
            "{title}: needs a description saying how to read it"
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        let mut refs: Vec<&str> = targets
            .iter()
            .map(|t| t["refId"].as_str().unwrap_or(""))
            .collect();
        refs.sort_unstable();
        refs.dedup();
        assert_eq!(refs.len(), targets.len(), "{title}: duplicate refId");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(!expr.trim().is_empty(), "{title}: empty expr");
            promql::check_variable_matchers(expr, &["model", "provider"]).unwrap();
            used.extend(metric_names(expr));
        }
    }
    let n = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "panel ids must be unique");

    used.sort();
    used.dedup();
    let unknown: Vec<&String> = used
        .iter()
        .filter(|m| !METRICS.contains(&m.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "the dashboard uses metrics the library does not export: {unknown:?}"
    );
    let unused: Vec<&&str> = METRICS
        .iter()
        .filter(|m| !used.iter().any(|u| u == *m))
        .collect();
    assert!(unused.is_empty(), "metrics with no panel: {unused:?}");
}

#[test]
fn alert_rules_use_exported_metrics_only() {
    let path = dashboards().join("alerts.yml");
    let text = std::fs::read_to_string(&path).expect("alerts.yml");
    let unknown: Vec<String> = metric_names(&text)
        .into_iter()
        .filter(|m| !METRICS.contains(&m.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "alerts.yml uses metrics the library does not export: {unknown:?}"
    );
}

// ------------------------------------------------------------------ end to end

/// Polls `expr` until `done(value)` or `timeout`; returns the last value.
async fn poll(
    prom: &Prometheus,
    expr: &str,
    timeout: Duration,
    done: impl Fn(Option<f64>) -> bool,
) -> Option<f64> {
    let started = Instant::now();
    loop {
        let v = prom.value(expr).await;
        if done(v) || started.elapsed() > timeout {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `expr`'s series as `label values joined by "/" -> value`.
async fn by_labels(prom: &Prometheus, expr: &str, labels: &[&str]) -> BTreeMap<String, f64> {
    prom.query(expr)
        .await
        .unwrap_or_else(|e| panic!("{expr}: {e}"))
        .into_iter()
        .map(|s| {
            let key = labels
                .iter()
                .map(|l| s.labels.get(*l).and_then(Value::as_str).unwrap_or(""))
                .collect::<Vec<_>>()
                .join("/");
            (key, s.value)
        })
        .collect()
}

/// A line of the evaluation report.
fn summarize(samples: &[server::Sample]) -> String {
    let finite = samples.iter().filter(|s| s.value.is_finite()).count();
    format!("{} series ({finite} finite)", samples.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_against_a_real_prometheus() {
    const TEST: &str = "dashboard_and_alerts_against_a_real_prometheus";
    let Some(prometheus) = require("prometheus", TEST) else {
        return;
    };
    let Some(promtool) = require("promtool", TEST) else {
        return;
    };
    let started = Instant::now();

    // The exporter first: the pools resolve their metric handles when built.
    let exporter = retryctl_gateway::metrics_endpoint::serve("127.0.0.1:0".parse().unwrap())
        .expect("install the Prometheus exporter");
    let mut driver = Driver::new().await;
    let prom = Prometheus::start(
        &prometheus,
        exporter.local_addr(),
        &[dashboards().join("alerts.yml")],
    )
    .await;

    // Every series exists (at 0) from the first scrape on, so the traffic
    // below shows up as increases that `rate` and `increase` can see.
    let up = poll(&prom, "up", Duration::from_secs(20), |v| v == Some(1.0)).await;
    assert_eq!(
        up,
        Some(1.0),
        "target never up: {:?}\n{}",
        prom.target_health().await,
        prom.log()
    );

    for n in 0..4 {
        driver.wave().await;
        driver.reload_step(n).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    driver.admission().await;
    let tally = driver.tally.clone();
    eprintln!(
        "admission phase ({}): {:?}",
        traffic::ADMISSION,
        tally.models.get(traffic::ADMISSION)
    );
    let health = driver.health();
    let reloads = driver.watcher.counts();
    // Start (same policy), changed policy, same file again, broken file.
    assert_eq!(
        reloads,
        ReloadCounts {
            applied: 1,
            unchanged: 2,
            rejected: 1
        },
        "the policy file's story"
    );
    let active_hash = format!("{:016x}", driver.live.load().version());

    // ---- exact values: what the pool returned = what Prometheus stored
    let total = |f: fn(&traffic::ModelTally) -> u64| tally.total(f) as f64;
    let exact: Vec<(String, f64)> = vec![
        (
            "sum(retryctl_first_round_failures_total)",
            total(|t| t.first_round_failed),
        ),
        (
            r#"sum(retryctl_requests_total{outcome=~"failed_.*"})"#,
            total(|t| t.failed),
        ),
        ("sum(retryctl_requests_total)", total(|t| t.requests)),
        ("sum(retryctl_attempts_total)", total(|t| t.attempts)),
        ("sum(retryctl_retries_total)", total(|t| t.retries)),
        ("sum(retryctl_fallbacks_total)", total(|t| t.fallbacks)),
        (
            "sum(retryctl_unknown_model_requests_total)",
            tally.unknown as f64,
        ),
        (
            "sum(retryctl_attempts_per_request_count)",
            total(|t| t.requests),
        ),
        (
            "sum(retryctl_attempts_per_request_sum)",
            total(|t| t.attempts),
        ),
        (
            "sum(retryctl_request_duration_seconds_count)",
            total(|t| t.requests),
        ),
        (
            "sum(retryctl_attempt_duration_seconds_count)",
            total(|t| t.attempts),
        ),
        // The policy file's story: see traffic.rs.
        (
            r#"sum(retryctl_policy_reloads_total{result="applied"})"#,
            reloads.applied as f64,
        ),
        (
            r#"sum(retryctl_policy_reloads_total{result="unchanged"})"#,
            reloads.unchanged as f64,
        ),
        (
            r#"sum(retryctl_policy_reloads_total{result="rejected"})"#,
            reloads.rejected as f64,
        ),
        ("max(retryctl_policy_reload_failing)", 1.0),
        // Two pools with their own policies: each reports the policy it
        // runs (the watched one's replaced version goes to 0).
        (r#"count(retryctl_policy_info == 1)"#, 2.0),
        (r#"count(retryctl_policy_info == 0)"#, 1.0),
    ]
    .into_iter()
    .map(|(e, v)| (e.to_owned(), v))
    .chain([(
        format!(r#"max(retryctl_policy_info{{hash="{active_hash}"}})"#),
        1.0,
    )])
    .collect();
    // Wait for a scrape taken after the last request (the last one of the
    // list is a histogram, which the exporter folds in on render).
    for (expr, want) in &exact {
        poll(&prom, expr, Duration::from_secs(10), |v| v == Some(*want)).await;
    }
    let mut mismatches = Vec::new();
    for (expr, want) in &exact {
        let got = prom.value(expr).await;
        eprintln!("exact: {expr} = {got:?} (driver: {want})");
        if got != Some(*want) {
            mismatches.push(format!("{expr}: prometheus {got:?}, driver {want}"));
        }
    }
    // Per model: the baseline, the failures, and each outcome/reason pair.
    let first = by_labels(
        &prom,
        "sum by (model) (retryctl_first_round_failures_total)",
        &["model"],
    )
    .await;
    let failed = by_labels(
        &prom,
        r#"sum by (model) (retryctl_requests_total{outcome=~"failed_.*"})"#,
        &["model"],
    )
    .await;
    let outcomes = by_labels(
        &prom,
        "sum by (model, outcome, reason) (retryctl_requests_total) > 0",
        &["model", "outcome", "reason"],
    )
    .await;
    let mut want_outcomes = BTreeMap::new();
    for (model, t) in &tally.models {
        if first.get(model) != Some(&(t.first_round_failed as f64)) {
            mismatches.push(format!(
                "{model}: first-round failures {:?}, driver {}",
                first.get(model),
                t.first_round_failed
            ));
        }
        if failed.get(model) != Some(&(t.failed as f64)) {
            mismatches.push(format!(
                "{model}: failures {:?}, driver {}",
                failed.get(model),
                t.failed
            ));
        }
        for ((outcome, reason), n) in &t.by_outcome {
            want_outcomes.insert(format!("{model}/{outcome}/{reason}"), *n as f64);
        }
    }
    if outcomes != want_outcomes {
        mismatches.push(format!("requests by model/outcome/reason:\n prometheus {outcomes:?}\n driver     {want_outcomes:?}"));
    }
    // Skips: each single-provider request that a skip ended is one skip.
    let skips = by_labels(
        &prom,
        "sum by (reason) (retryctl_retries_skipped_total)",
        &["reason"],
    )
    .await;
    for (skip, reason) in [
        ("budget", "budget_exhausted"),
        ("deadline", "deadline_exceeded"),
        ("retry_after", "retry_after_too_long"),
    ] {
        let want: u64 = tally
            .models
            .values()
            .flat_map(|t| &t.by_outcome)
            .filter(|((_, r), _)| r == reason)
            .map(|(_, n)| n)
            .sum();
        if want == 0 || skips.get(skip) != Some(&(want as f64)) {
            mismatches.push(format!(
                "skips {skip}: prometheus {:?}, driver {want} requests failed with {reason}",
                skips.get(skip)
            ));
        }
    }
    // Health: the gauge and both counters per route, as the pool reports them.
    let demoted = by_labels(&prom, "retryctl_provider_demoted", &["model", "provider"]).await;
    let demotions = by_labels(
        &prom,
        "retryctl_provider_demotions_total",
        &["model", "provider"],
    )
    .await;
    let recoveries = by_labels(
        &prom,
        "retryctl_provider_recoveries_total",
        &["model", "provider"],
    )
    .await;
    for h in &health {
        let key = format!("{}/{}", h.model, h.provider);
        let got = (demoted.get(&key), demotions.get(&key), recoveries.get(&key));
        let want = (
            f64::from(u8::from(h.demoted)),
            h.demotions as f64,
            h.recoveries as f64,
        );
        if got != (Some(&want.0), Some(&want.1), Some(&want.2)) {
            mismatches.push(format!(
                "{key}: (demoted, demotions, recoveries) prometheus {got:?}, pool {want:?}"
            ));
        }
    }
    for must in [traffic::QWEN, traffic::GLM] {
        assert!(
            health.iter().any(|h| h.model == must && h.demotions > 0),
            "the traffic must demote {must}'s provider: {health:?}"
        );
    }
    assert!(
        health.iter().any(|h| h.recoveries > 0),
        "the traffic must recover a provider: {health:?}"
    );
    assert!(
        mismatches.is_empty(),
        "metrics differ from the driver's counts:\n{}",
        mismatches.join("\n")
    );

    // ---- what the exporter serves
    let text = reqwest::get(format!("http://{}/metrics", exporter.local_addr()))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("/metrics body");
    let exported: Vec<String> = metric_names(
        &text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let missing: Vec<&str> = METRICS
        .iter()
        .copied()
        .filter(|m| !exported.iter().any(|e| e == m))
        .collect();
    let unexpected: Vec<&str> = missing
        .iter()
        .copied()
        .filter(|m| !PENDING_METRICS.contains(m))
        .collect();
    assert!(
        unexpected.is_empty(),
        "the exporter does not serve {unexpected:?}; /metrics:\n{text}"
    );
    let mut pending = Vec::new();
    // The metrics of `expr` that are missing, if the missing ones explain
    // an empty result (all pending); `None` if the emptiness is a bug.
    let pending_only = |expr: &str| -> Option<Vec<String>> {
        let absent: Vec<String> = metric_names(expr)
            .into_iter()
            .filter(|m| missing.contains(&m.as_str()))
            .collect();
        (!absent.is_empty()).then_some(absent)
    };

    // ---- every dashboard expression parses and returns data
    let d = dashboard();
    let vars = promql::variable_values(&d);
    let mut problems = Vec::new();
    let queries = promql::dashboard_queries(&d);
    assert!(
        queries.len() >= 20,
        "only {} dashboard queries",
        queries.len()
    );
    for q in &queries {
        let expr =
            promql::substitute(&q.expr, &vars).unwrap_or_else(|e| panic!("{}: {e}", q.panel));
        match prom.query(&expr).await {
            Ok(samples) => {
                eprintln!(
                    "dashboard: [{} / {}] {}\n    {expr}",
                    q.panel,
                    q.ref_id,
                    summarize(&samples)
                );
                if !samples.iter().any(|s| s.value.is_finite()) {
                    match pending_only(&expr) {
                        Some(absent) => pending.push(format!(
                            "[{} / {}] no data: {absent:?} not exported yet",
                            q.panel, q.ref_id
                        )),
                        None => {
                            problems.push(format!("[{} / {}] no data: {expr}", q.panel, q.ref_id))
                        }
                    }
                }
            }
            Err(e) => problems.push(format!("[{} / {}] {e}: {expr}", q.panel, q.ref_id)),
        }
    }

    // ---- every alert rule, as Prometheus loaded it
    let rules = prom.rules().await;
    let yaml = std::fs::read_to_string(dashboards().join("alerts.yml")).expect("alerts.yml");
    let declared = yaml
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    assert_eq!(rules.len(), declared, "Prometheus loaded {rules:?}");
    for rule in &rules {
        let (name, expr) = (&rule.name, &rule.query);
        if rule.health == "err" {
            problems.push(format!(
                "alert {name}: evaluation failed: {}",
                rule.last_error
            ));
        }
        if let Err(e) = prom.query(expr).await {
            problems.push(format!("alert {name}: {e}: {expr}"));
            continue;
        }
        let (lhs, threshold) = match promql::strip_final_comparison(expr) {
            Some((lhs, op, rhs)) => (lhs, format!("{op} {rhs}")),
            None => (expr.as_str(), "(no final comparison)".to_owned()),
        };
        match prom.query(lhs).await {
            Ok(samples) => {
                let values: Vec<String> =
                    samples.iter().map(|s| format!("{:.4}", s.value)).collect();
                eprintln!(
                    "alert: {name}: {} [{}], threshold {threshold}\n    {lhs}",
                    summarize(&samples),
                    values.join(", ")
                );
                if !samples.iter().any(|s| s.value.is_finite()) {
                    match pending_only(lhs) {
                        Some(absent) => pending.push(format!(
                            "alert {name}: no data: {absent:?} not exported yet"
                        )),
                        None => problems.push(format!("alert {name}: no data for {lhs}")),
                    }
                }
            }
            Err(e) => problems.push(format!("alert {name}: {e}: {lhs}")),
        }
    }

    // ---- the admission phase (traffic::Driver::admission) did what it is
    // for: requests waited at the gate, probes failed and then succeeded,
    // the provider went down and recovered, the request with a tiny
    // deadline gave up at the gate. Checked once the gate exports its
    // metrics.
    if missing.iter().any(|m| m.starts_with("retryctl_admission_")) {
        pending.push(
            "admission phase: its effects at the gate are checked once retryctl_admission_* is exported"
                .to_owned(),
        );
    } else {
        let m = traffic::ADMISSION;
        let adm = tally.models.get(m).cloned().unwrap_or_default();
        let gave_up: u64 = adm
            .by_outcome
            .iter()
            .filter(|((_, reason), _)| reason == "admission_timeout")
            .map(|(_, n)| n)
            .sum();
        if adm.queued == 0 || gave_up == 0 {
            problems.push(format!(
                "admission phase: the pool reported {} requests that waited at the gate and {gave_up} admission_timeout failures, want both > 0",
                adm.queued
            ));
        }
        // (expression, the least value, the most value)
        let mut checks = vec![
            (
                format!(r#"sum(retryctl_admission_wait_seconds_count{{model="{m}"}})"#),
                adm.queued.max(1) as f64,
                f64::INFINITY,
            ),
            (
                format!(r#"max(retryctl_admission_max_wait_seconds{{model="{m}"}})"#),
                traffic::ADMISSION_MAX_WAIT.as_secs_f64(),
                traffic::ADMISSION_MAX_WAIT.as_secs_f64(),
            ),
            // Recovered, nobody left waiting.
            (
                format!(r#"max(retryctl_admission_down{{model="{m}"}})"#),
                0.0,
                0.0,
            ),
            (
                format!(r#"sum(retryctl_admission_waiting{{model="{m}"}})"#),
                0.0,
                0.0,
            ),
        ];
        for (metric, label, value) in [
            ("admission_total", "outcome", "admitted_after_wait"),
            ("admission_total", "outcome", "timed_out"),
            ("admission_total", "outcome", "probe_failed"),
            ("admission_total", "outcome", "probe_succeeded"),
            ("admission_transitions_total", "event", "down"),
            ("admission_transitions_total", "event", "recovered"),
        ] {
            checks.push((
                format!(r#"sum(retryctl_{metric}{{model="{m}", {label}="{value}"}})"#),
                1.0,
                f64::INFINITY,
            ));
        }
        for (expr, least, most) in &checks {
            let got = prom.value(expr).await;
            eprintln!("admission: {expr} = {got:?} (want {least} ..= {most})");
            if !got.is_some_and(|v| (*least..=*most).contains(&v)) {
                problems.push(format!(
                    "admission phase: {expr} = {got:?}, want {least} ..= {most}"
                ));
            }
        }
    }

    // ---- the exposition format, as served on /metrics
    let args = ["check", "metrics"];
    let out = run(&promtool, &args, &dashboards(), Some(text.as_bytes()));
    let log = describe(&promtool, &args, &out);
    eprintln!("{log}");
    // promtool exits 1 with one line per problem; every line must be an
    // accepted lint.
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lints: Vec<&str> = output
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .filter(|l| {
            !ACCEPTED_METRIC_LINTS
                .iter()
                .any(|(m, msg)| l.contains(m) && l.contains(msg))
        })
        .collect();
    let (tolerated, lints): (Vec<&str>, Vec<&str>) = lints
        .into_iter()
        .partition(|l| PENDING_METRIC_LINTS.iter().any(|msg| l.contains(msg)));
    if !out.status.success() && !lints.is_empty() {
        problems.push(format!("promtool check metrics:\n{log}"));
    }
    if !tolerated.is_empty() {
        pending.push(format!(
            "promtool check metrics: {} lints \"{}\" (e.g. {})",
            tolerated.len(),
            PENDING_METRIC_LINTS.join("\", \""),
            tolerated[0]
        ));
    }

    eprintln!(
        "{} dashboard queries and {} alert rules evaluated in {:?}",
        queries.len(),
        rules.len(),
        started.elapsed()
    );
    if !pending.is_empty() {
        note(&format!(
            "PENDING LIBRARY WORK ({TEST}), tolerated for now \
             (see PENDING_METRICS / PENDING_METRIC_LINTS in tests/prometheus/main.rs):\n  {}",
            pending.join("\n  ")
        ));
    }
    assert!(
        problems.is_empty(),
        "{}\n\nprometheus log:\n{}",
        problems.join("\n"),
        prom.log()
    );
    drop(prom);
}
