//! A real `prometheus` process for one test: its own config, storage and
//! port in a temporary directory, killed (and reaped) when dropped.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long Prometheus may take to start and report ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One series of an instant query result.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    /// The series' labels.
    pub(crate) labels: serde_json::Map<String, Value>,
    /// Its value (`NaN` and infinities included).
    pub(crate) value: f64,
}

/// A rule as Prometheus loaded and evaluates it.
#[derive(Debug, Clone)]
pub(crate) struct Rule {
    /// The alert's name.
    pub(crate) name: String,
    /// Its expression, as Prometheus parsed and printed it.
    pub(crate) query: String,
    /// `ok`, `err` or `unknown` (not evaluated yet).
    pub(crate) health: String,
    /// The last evaluation error, if any.
    pub(crate) last_error: String,
}

/// A running Prometheus. Dropping it kills the process and waits for it.
pub(crate) struct Prometheus {
    child: Child,
    base: String,
    log: PathBuf,
    http: reqwest::Client,
    // Last: removed after the process is gone.
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago (Prometheus binds it itself).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

impl Prometheus {
    /// Starts `binary` scraping `target`'s `/metrics` every second, with
    /// `rule_files` loaded, and waits until it is ready. Retries on another
    /// port if the one picked was taken in between.
    pub(crate) async fn start(binary: &Path, target: SocketAddr, rule_files: &[PathBuf]) -> Self {
        Self::start_scraping(binary, &[target], rule_files).await
    }

    /// Like [`Prometheus::start`], scraping every one of `targets` (one
    /// job, `retryctl`; each target its own `instance` label), as
    /// Prometheus scrapes a fleet of replicas.
    pub(crate) async fn start_scraping(
        binary: &Path,
        targets: &[SocketAddr],
        rule_files: &[PathBuf],
    ) -> Self {
        let mut last_log = String::new();
        for _ in 0..3 {
            let mut prom = Self::spawn(binary, targets, rule_files);
            match prom.wait_ready().await {
                Ok(()) => return prom,
                Err(log) if log.contains("address already in use") => last_log = log,
                Err(log) => panic!("prometheus did not become ready:\n{log}"),
            }
        }
        panic!("prometheus could not bind a port in 3 tries:\n{last_log}");
    }

    fn spawn(binary: &Path, targets: &[SocketAddr], rule_files: &[PathBuf]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let rules: String = rule_files
            .iter()
            .map(|p| format!("  - {:?}\n", p.display().to_string()))
            .collect();
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let targets = targets.join(", ");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n{rules}\
             scrape_configs:\n  - job_name: retryctl\n    static_configs:\n      - targets: [{targets}]\n"
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let log = dir.path().join("prometheus.log");
        let log_file = File::create(&log).expect("create prometheus.log");
        let port = free_port();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup log"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        Prometheus {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("http client"),
            _dir: dir,
        }
    }

    /// Everything Prometheus logged so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `/-/ready`; `Err(log)` if the process exits or the timeout
    /// passes first.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let started = Instant::now();
        while started.elapsed() < READY_TIMEOUT {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited with {status}\n{}", self.log()));
            }
            let ready = self.http.get(format!("{}/-/ready", self.base)).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!("not ready after {READY_TIMEOUT:?}\n{}", self.log()))
    }

    /// GETs an API path and returns its `data` when `status` is `success`,
    /// or the whole error answer.
    async fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let url = reqwest::Url::parse_with_params(&format!("{}{path}", self.base), params)
            .map_err(|e| e.to_string())?;
        let response = self.http.get(url).send().await.map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response.text().await.map_err(|e| e.to_string())?;
        let json: Value =
            serde_json::from_str(&body).map_err(|e| format!("HTTP {status}: {e}: {body}"))?;
        if json["status"] != "success" {
            return Err(format!("HTTP {status}: {body}"));
        }
        Ok(json["data"].clone())
    }

    /// Evaluates `expr` now. `Err` carries Prometheus's error (a parse
    /// error, a type error) verbatim.
    pub(crate) async fn query(&self, expr: &str) -> Result<Vec<Sample>, String> {
        let data = self.api("/api/v1/query", &[("query", expr)]).await?;
        let number = |v: &Value| -> f64 {
            v.as_str()
                .map(|s| match s {
                    "+Inf" => f64::INFINITY,
                    "-Inf" => f64::NEG_INFINITY,
                    s => s.parse().unwrap_or(f64::NAN),
                })
                .unwrap_or(f64::NAN)
        };
        match data["resultType"].as_str() {
            Some("vector") => Ok(data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| Sample {
                    labels: s["metric"].as_object().cloned().unwrap_or_default(),
                    value: number(&s["value"][1]),
                })
                .collect()),
            Some("scalar") => Ok(vec![Sample {
                labels: serde_json::Map::new(),
                value: number(&data["result"][1]),
            }]),
            other => Err(format!("unexpected result type {other:?} for {expr}")),
        }
    }

    /// The single value of `expr` (e.g. a `sum(...)`), `None` if empty.
    pub(crate) async fn value(&self, expr: &str) -> Option<f64> {
        match self.query(expr).await {
            Ok(samples) if samples.len() == 1 => Some(samples[0].value),
            Ok(samples) if samples.is_empty() => None,
            Ok(samples) => panic!("{expr}: expected one series, got {samples:?}"),
            Err(e) => panic!("{expr}: {e}"),
        }
    }

    /// Every loaded rule.
    pub(crate) async fn rules(&self) -> Vec<Rule> {
        let data = self
            .api("/api/v1/rules", &[])
            .await
            .unwrap_or_else(|e| panic!("/api/v1/rules: {e}"));
        let mut out = Vec::new();
        for group in data["groups"].as_array().into_iter().flatten() {
            for rule in group["rules"].as_array().into_iter().flatten() {
                let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
                out.push(Rule {
                    name: text(&rule["name"]),
                    query: text(&rule["query"]),
                    health: text(&rule["health"]),
                    last_error: text(&rule["lastError"]),
                });
            }
        }
        out
    }

    /// Health of the scrape target: `(health, lastError)` of the first
    /// active target.
    pub(crate) async fn target_health(&self) -> Option<(String, String)> {
        let data = self.api("/api/v1/targets", &[]).await.ok()?;
        let t = data["activeTargets"].as_array()?.first()?.clone();
        Some((
            t["health"].as_str().unwrap_or_default().to_owned(),
            t["lastError"].as_str().unwrap_or_default().to_owned(),
        ))
    }
}
