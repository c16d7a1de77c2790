//! `retryctl serve` as a process: its configuration, its `/metrics`, and
//! what `/proc` says about it (resident memory, open file descriptors,
//! threads).

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::Error;
use crate::nginx::Nginx;

/// The model whose providers answer JSON, and the one whose providers
/// stream.
pub(crate) const JSON_MODEL: &str = "soak-json";
pub(crate) const STREAM_MODEL: &str = "soak-sse";

/// A free port on loopback (bound, read, released).
pub(crate) fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}

/// The gateway configuration: per nginx instance one JSON provider and
/// one streaming provider (`json-a`, `sse-a`, ...), and two models each
/// served by all instances in failover order.
pub(crate) fn config_text(
    listen: SocketAddr,
    metrics: SocketAddr,
    policy: &Path,
    upstreams: &[Nginx],
) -> String {
    let mut text = format!(
        "listen = \"{listen}\"\n\
         metrics_listen = \"{metrics}\"\n\
         policy = \"{}\"\n\
         request_timeout = \"20s\"\n",
        policy.display()
    );
    let (mut json, mut sse) = (Vec::new(), Vec::new());
    for n in upstreams {
        for (location, names) in [("json", &mut json), ("sse", &mut sse)] {
            let name = format!("{location}-{}", n.name);
            text.push_str(&format!(
                "\n[providers.{name}]\n\
                 base_url = \"{}\"\n\
                 connect_timeout = \"500ms\"\n",
                n.base_url(location)
            ));
            names.push(format!("\"{name}\""));
        }
    }
    for (model, names) in [(JSON_MODEL, json), (STREAM_MODEL, sse)] {
        text.push_str(&format!(
            "\n[[models]]\nname = \"{model}\"\nproviders = [{}]\n",
            names.join(", ")
        ));
    }
    text
}

/// The running gateway.
#[derive(Debug)]
pub(crate) struct Gateway {
    child: Child,
    pid: u32,
    pub(crate) url: String,
    pub(crate) metrics_url: String,
    pub(crate) log: PathBuf,
}

impl Gateway {
    /// Starts `bin serve --config config`, logging to `log`; returns once
    /// `/healthz` answers.
    pub(crate) async fn start(
        bin: &Path,
        config: &Path,
        listen: SocketAddr,
        metrics: SocketAddr,
        log: PathBuf,
    ) -> Result<Gateway, Error> {
        let child = Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()?;
        let pid = child
            .id()
            .ok_or("the gateway exited as soon as it started")?;
        let mut gateway = Gateway {
            child,
            pid,
            url: format!("http://{listen}"),
            metrics_url: format!("http://{metrics}/metrics"),
            log,
        };
        gateway.wait_ready().await?;
        Ok(gateway)
    }

    async fn wait_ready(&mut self) -> Result<(), Error> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                return Err(format!("the gateway exited ({status}):\n{log}").into());
            }
            let ready = client
                .get(format!("{}/healthz", self.url))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err("the gateway does not answer /healthz after 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the process is still running.
    pub(crate) fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Resident memory, open descriptors and threads, from `/proc`.
    pub(crate) fn process(&self) -> Result<Process, Error> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        let field = |name: &str| -> Result<u64, Error> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .ok_or_else(|| format!("no {name} in /proc/{}/status", self.pid).into())
        };
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.pid))?.count() as u64;
        Ok(Process {
            rss: field("VmRSS")? * 1024,
            fds,
            threads: field("Threads")?,
            tasks: 0,
        })
    }

    /// CPU time used by the process so far (user and system, all its
    /// threads), from `/proc/PID/stat`.
    pub(crate) fn cpu_time(&self) -> Result<Duration, Error> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))?;
        // Fields after the command name (which may hold spaces, and ends
        // at the last ')'): state is the first, utime the 12th, stime the
        // 13th.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |i: usize| -> Result<u64, Error> {
            fields
                .get(i)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("/proc/{}/stat has no field {i}", self.pid).into())
        };
        let total = ticks(11)? + ticks(12)?;
        Ok(Duration::from_secs_f64(total as f64 / clock_ticks() as f64))
    }

    /// One `/metrics` scrape.
    pub(crate) async fn metrics(&self, client: &reqwest::Client) -> Result<Metrics, Error> {
        let response = client.get(&self.metrics_url).send().await?;
        if !response.status().is_success() {
            return Err(format!("/metrics answered {}", response.status()).into());
        }
        Ok(Metrics::parse(&response.text().await?))
    }

    /// SIGTERM, then up to 10 s for the graceful stop; a kill after that.
    pub(crate) async fn stop(mut self) -> Result<(), Error> {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status();
        match tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if status.success() {
                    Ok(())
                } else {
                    Err(format!("the gateway exited with {status} on SIGTERM").into())
                }
            }
            Err(_) => {
                let _ = self.child.kill().await;
                Err("the gateway did not stop within 10 s of SIGTERM".into())
            }
        }
    }
}

/// Clock ticks per second of `/proc`'s CPU times (`getconf CLK_TCK`;
/// Linux's user-visible tick is 100 everywhere it runs when that fails).
fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// What `/proc` says about the gateway at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Process {
    pub(crate) rss: u64,
    pub(crate) fds: u64,
    pub(crate) threads: u64,
    /// Tasks alive in the gateway's runtime, from its `/metrics`
    /// (`retryctl_runtime_alive_tasks`); 0 where not scraped.
    pub(crate) tasks: u64,
}

/// The figures of one `/metrics` scrape that the soak reads.
#[derive(Clone, Debug, Default)]
pub(crate) struct Metrics {
    /// `retryctl_policy_reloads_total` by `result`.
    pub(crate) reloads: BTreeMap<String, f64>,
    /// `retryctl_unknown_model_requests_total`.
    pub(crate) unknown_models: f64,
    /// `retryctl_attempts_total` by `result`, all models and providers.
    pub(crate) attempts: BTreeMap<String, f64>,
    /// `retryctl_requests_total` by `reason`, all models.
    pub(crate) requests: BTreeMap<String, f64>,
    /// `retryctl_runtime_alive_tasks`.
    pub(crate) tasks: Option<f64>,
    /// Series in the scrape (lines that are not comments).
    pub(crate) series: usize,
    /// Series whose labels carry a name the soak sent as an unknown
    /// model (must be none).
    pub(crate) unknown_model_series: usize,
}

fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
    let len = labels[start..].find('"')?;
    Some(&labels[start..start + len])
}

impl Metrics {
    pub(crate) fn parse(text: &str) -> Metrics {
        let mut m = Metrics::default();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            m.series += 1;
            if line.contains(crate::load::UNKNOWN_PREFIX) {
                m.unknown_model_series += 1;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let (map, key) = match name {
                "retryctl_policy_reloads_total" => (&mut m.reloads, "result"),
                "retryctl_attempts_total" => (&mut m.attempts, "result"),
                "retryctl_requests_total" => (&mut m.requests, "reason"),
                "retryctl_unknown_model_requests_total" => {
                    m.unknown_models += value;
                    continue;
                }
                "retryctl_runtime_alive_tasks" => {
                    m.tasks = Some(value);
                    continue;
                }
                _ => continue,
            };
            if let Some(key) = label(labels, key) {
                *map.entry(key.to_owned()).or_default() += value;
            }
        }
        m
    }

    pub(crate) fn reloads(&self, result: &str) -> f64 {
        self.reloads.get(result).copied().unwrap_or(0.0)
    }
}
