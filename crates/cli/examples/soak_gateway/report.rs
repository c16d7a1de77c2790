//! The figures of a run, as a table, and the checks that decide it.
//!
//! Every check prints its figure and its bound whether it passes or not,
//! so a failed run says by how much.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::faults::{Action, Window};
use crate::gateway::{Metrics, Process};
use crate::load::{Bad, Failure, Kind, Tally};
use crate::nginx::Stop;

/// Allowed growth from warm-up to the end: the larger of this share of
/// the warm-up figure and the absolute slack of each figure. The slack
/// covers small values, where one more pooled upstream connection or one
/// more blocking-pool thread is already 10%. Resident memory has two
/// bounds: from the rest after warm-up to the rest at the end, 6 MiB (in
/// the first 10-minute run it rose 2.8 MiB in the minute after warm-up,
/// to the plateau of the most connections open at once, then stayed
/// within 0.8 MiB for eight minutes and 1.2 million requests; in four
/// 60 s runs of two builds it rose 0, 3.2, 3.6 and 4.2 MiB, to 35.7-40.1
/// MiB at rest against 38.5-40.9 at the peak under load, as the bursts
/// after restarts reached 280-330 descriptors before or after the rest
/// after warm-up); and over the second half of the load, under load,
/// 2 MiB (a leak of 4 bytes per request shows in a 10-minute run).
pub(crate) const GROWTH_RATIO: f64 = 0.10;
pub(crate) const RSS_SLACK: u64 = 6 << 20;
pub(crate) const RSS_SECOND_HALF_SLACK: u64 = 2 << 20;
pub(crate) const FDS_SLACK: u64 = 8;
pub(crate) const THREADS_SLACK: u64 = 2;
/// Tasks at rest: the gauge's own, the metrics server's, the policy
/// watcher's, and a connection or two closing.
pub(crate) const TASKS_SLACK: u64 = 4;

/// Attempt causes that only a closed port explains.
const CONNECT_CAUSES: [&str; 3] = ["connect_refused", "connect", "connect_timeout"];

/// The gateway process at the points the report compares.
///
/// The checks compare the process *at rest* (the load paused, its
/// connections closed, idle upstream connections expired) after warm-up
/// and after the load: under load, the descriptors count the clients'
/// and the upstream pool's connections, which swing between about 70 and
/// 300 with the bursts that follow a restart; at rest they are the
/// gateway's own. The figures under load are printed beside them.
#[derive(Clone, Debug)]
pub(crate) struct ProcessFigures {
    /// Before the load started.
    pub(crate) idle_start: Process,
    /// Under load: the median of the samples over the last seconds of
    /// warm-up.
    pub(crate) warm: Process,
    /// At rest after warm-up.
    pub(crate) warm_rest: Process,
    /// Under load: the median over the seconds before the middle of the
    /// load after warm-up.
    pub(crate) middle: Process,
    /// Under load: the median over the last seconds of the load.
    pub(crate) end: Process,
    /// At rest after the load.
    pub(crate) end_rest: Process,
    /// The highest of each figure over the run.
    pub(crate) peak: Process,
    /// Ten samples spread over the run: when, and the figures then.
    pub(crate) timeline: Vec<(Duration, Process)>,
}

/// Everything the report needs.
#[derive(Debug)]
pub(crate) struct Run {
    /// Seconds of load.
    pub(crate) secs: f64,
    /// Seconds over which faults ran (the load and the rest after
    /// warm-up).
    pub(crate) fault_secs: f64,
    pub(crate) target_rate: f64,
    pub(crate) min_rate: f64,
    pub(crate) workers: usize,
    pub(crate) seed: u64,
    pub(crate) tally: Tally,
    pub(crate) windows: Vec<Window>,
    pub(crate) instances: Vec<&'static str>,
    /// Provider name to the index of its nginx instance.
    pub(crate) providers: BTreeMap<String, usize>,
    pub(crate) metrics: Metrics,
    pub(crate) valid_writes: u64,
    pub(crate) invalid_writes: u64,
    pub(crate) process: ProcessFigures,
    pub(crate) stopped_cleanly: Result<(), String>,
    /// CPU time the gateway used from the start of the load to the end
    /// (the rests included, where it is idle).
    pub(crate) cpu: Duration,
}

/// One check: its description, the figure, and whether it holds.
struct Check {
    what: String,
    ok: bool,
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

fn ms(micros: u64) -> String {
    format!("{:.2} ms", micros as f64 / 1000.0)
}

fn action(a: Action) -> &'static str {
    match a {
        Action::Reload => "reload",
        Action::Restart { stop, .. } => stop.describe(),
    }
}

impl Run {
    /// The fault windows that explain a failure, if it is explained:
    /// each provider it names had a window overlapping the request, and
    /// a restart window when the cause is a connect failure (nginx's port
    /// is closed only then; a reload never refuses a connection). A
    /// failure naming no provider is explained only when the admission
    /// gate gave up, by a restart window on any instance. An unknown
    /// model's wrong answer, a connection error to the gateway and a hang
    /// are never explained: no upstream fault can cause them.
    fn explained(&self, bad: &Bad) -> Option<Vec<Window>> {
        if bad.kind == Kind::Unknown
            || matches!(bad.failure, Failure::Connection(_) | Failure::Hang)
        {
            return None;
        }
        let overlapping = |instance: Option<usize>, restart_only: bool| -> Vec<Window> {
            self.windows
                .iter()
                .filter(|w| instance.is_none_or(|i| w.instance == i))
                .filter(|w| !restart_only || matches!(w.action, Action::Restart { .. }))
                .filter(|w| w.overlaps(bad.start, bad.end))
                .copied()
                .collect()
        };
        let needs = match &bad.failure {
            // Only the admission gate fails a request without naming a
            // provider's failure: the port was closed for as long as it
            // could wait.
            Failure::Status {
                failures, reason, ..
            } if failures.is_empty() => {
                if !reason.starts_with("admission") {
                    return None;
                }
                vec![(None, true)]
            }
            Failure::Status { failures, .. } => failures
                .iter()
                .map(|(p, cause)| (Some(p.as_str()), CONNECT_CAUSES.contains(&cause.as_str())))
                .collect(),
            Failure::Body {
                provider: Some(p), ..
            } => vec![(Some(p.as_str()), false)],
            Failure::Body { provider: None, .. } | Failure::Connection(_) | Failure::Hang => {
                return None;
            }
        };
        let mut found = Vec::new();
        for (provider, restart_only) in needs {
            let instance = match provider {
                Some(p) => Some(*self.providers.get(p)?),
                None => None,
            };
            let w = overlapping(instance, restart_only);
            if w.is_empty() {
                return None;
            }
            found.extend(w);
        }
        found.sort_by_key(|w| (w.start, w.instance));
        found.dedup_by_key(|w| (w.start, w.instance));
        Some(found)
    }

    /// Answers per second of load after warm-up (paced throughout), the
    /// time to the last answer included.
    fn achieved_rate(&self) -> f64 {
        let (answered, time) = self.tally.phases.last().copied().unwrap_or_default();
        answered as f64 / time.as_secs_f64().max(1e-9)
    }

    /// Prints the report; returns whether every check held.
    pub(crate) fn print(&self) -> bool {
        println!(
            "\n== gateway soak: {:.0} s, seed {} ==",
            self.secs, self.seed
        );
        let (warm, warm_time) = self.tally.phases.first().copied().unwrap_or_default();
        println!(
            "load: {} workers, target {:.0} requests/s; achieved {:.0} requests/s after warm-up \
             ({:.0}/s in warm-up, its unpaced burst included; {} answered in {:.1} s of load)",
            self.workers,
            self.target_rate,
            self.achieved_rate(),
            warm as f64 / warm_time.as_secs_f64().max(1e-9),
            self.tally.answered(),
            self.tally.load_time.as_secs_f64()
        );
        self.print_requests();
        self.print_statuses();
        self.print_faults();
        let unexplained = self.print_failures();
        self.print_policy();
        self.print_process();
        let checks = self.checks(unexplained);
        println!("\nchecks:");
        for c in &checks {
            println!("  [{}] {}", if c.ok { "ok" } else { "FAILED" }, c.what);
        }
        let ok = checks.iter().all(|c| c.ok);
        println!("\ngateway soak: {}", if ok { "passed" } else { "FAILED" });
        ok
    }

    fn print_requests(&self) {
        let t = &self.tally;
        println!(
            "\n{:<22}{:>10}{:>12}{:>10}{:>12}{:>12}{:>12}",
            "requests", "sent", "expected", "other", "p50", "p99", "max"
        );
        for k in Kind::ALL {
            let i = k as usize;
            let h = &t.latency[i];
            println!(
                "{:<22}{:>10}{:>12}{:>10}{:>12}{:>12}{:>12}",
                k.describe(),
                t.sent[i],
                t.ok[i],
                t.sent[i] - t.ok[i],
                ms(h.value_at_quantile(0.5)),
                ms(h.value_at_quantile(0.99)),
                ms(h.max())
            );
        }
        println!(
            "{:<22}{:>10}{:>12}{:>10}",
            "all",
            t.total_sent(),
            t.ok.iter().sum::<u64>(),
            t.total_sent() - t.ok.iter().sum::<u64>()
        );
        println!(
            "answered {} of {} (connection errors {}, no answer within the timeout {}); \
             {} distinct unknown model names",
            t.answered(),
            t.total_sent(),
            t.connection_errors(),
            t.hangs(),
            t.unknown_names
        );
    }

    fn print_statuses(&self) {
        let statuses: Vec<String> = self
            .tally
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .collect();
        println!("statuses: {}", statuses.join(", "));
    }

    fn print_faults(&self) {
        println!("\nfaults (seeded schedule, as carried out):");
        println!(
            "{:<10}{:>10}{:>16}{:>14}{:>22}{:>22}",
            "nginx",
            "reloads",
            "restarts",
            "port closed",
            "in any fault window",
            "in restart windows"
        );
        for (i, name) in self.instances.iter().enumerate() {
            let mine: Vec<&Window> = self.windows.iter().filter(|w| w.instance == i).collect();
            let reloads = mine.iter().filter(|w| w.action == Action::Reload).count();
            let restarts: Vec<&&Window> = mine
                .iter()
                .filter(|w| matches!(w.action, Action::Restart { .. }))
                .collect();
            let fast = restarts
                .iter()
                .filter(|w| {
                    matches!(
                        w.action,
                        Action::Restart {
                            stop: Stop::Fast,
                            ..
                        }
                    )
                })
                .count();
            let closed: Duration = restarts.iter().map(|w| w.end - w.start).sum();
            let in_any = covered(&mine, self.fault_secs) / self.fault_secs;
            let restart_windows: Vec<&Window> = restarts.iter().map(|w| **w).collect();
            let in_restarts = covered(&restart_windows, self.fault_secs) / self.fault_secs;
            println!(
                "{:<10}{:>10}{:>16}{:>14}{:>21.0}%{:>21.0}%",
                name,
                reloads,
                format!("{} ({fast} stop)", restarts.len()),
                format!("{:.1} s", closed.as_secs_f64()),
                in_any * 100.0,
                in_restarts * 100.0
            );
        }
        println!(
            "(a window runs from the command to its return, or to nginx listening again, \
             plus {} s)",
            crate::faults::GRACE.as_secs()
        );
    }

    /// Prints each kind of failure with its count, how many fall in a
    /// fault window, and an example; returns the unexplained ones.
    fn print_failures(&self) -> u64 {
        let t = &self.tally;
        if t.bad.is_empty() {
            println!("\nfailures: none");
            return 0;
        }
        #[derive(Default)]
        struct Group {
            n: u64,
            explained: u64,
            /// The first of the group, and the first not explained.
            example: String,
            unexplained: Option<String>,
            windows: BTreeMap<String, u64>,
        }
        let describe = |bad: &Bad| {
            format!(
                "at {:.3}-{:.3} s: {}",
                bad.start.as_secs_f64(),
                bad.end.as_secs_f64(),
                bad.failure.detail()
            )
        };
        let mut groups: BTreeMap<String, Group> = BTreeMap::new();
        for bad in &t.bad {
            let g = groups
                .entry(format!("{} / {}", bad.kind.describe(), bad.failure.label()))
                .or_default();
            g.n += 1;
            if g.example.is_empty() {
                g.example = describe(bad);
            }
            match self.explained(bad) {
                Some(windows) => {
                    g.explained += 1;
                    for w in windows {
                        let name = format!("{} {}", self.instances[w.instance], action(w.action));
                        *g.windows.entry(name).or_default() += 1;
                    }
                }
                None => {
                    g.unexplained.get_or_insert_with(|| describe(bad));
                }
            }
        }
        println!("\nfailures (non-2xx, wrong bodies, errors), by kind:");
        println!("{:<70}{:>8}{:>14}", "kind / answer", "count", "in a fault");
        let mut unexplained = 0;
        for (label, g) in &groups {
            println!("{label:<70}{:>8}{:>14}", g.n, g.explained);
            let windows: Vec<String> = g.windows.iter().map(|(w, n)| format!("{w} {n}")).collect();
            if !windows.is_empty() {
                println!("    overlapping: {}", windows.join(", "));
            }
            match &g.unexplained {
                Some(e) => println!("    NOT EXPLAINED, e.g. {e}"),
                None => println!("    e.g. {}", g.example),
            }
            unexplained += g.n - g.explained;
        }
        unexplained
    }

    fn print_policy(&self) {
        let m = &self.metrics;
        println!(
            "\npolicy file: {} valid and {} invalid writes after the first; the gateway's \
             retryctl_policy_reloads_total: applied {} (the first read included), \
             unchanged {}, rejected {}",
            self.valid_writes,
            self.invalid_writes,
            m.reloads("applied"),
            m.reloads("unchanged"),
            m.reloads("rejected")
        );
        let attempts: Vec<String> = m
            .attempts
            .iter()
            .filter(|(_, n)| **n > 0.0)
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        println!("gateway attempts by result: {}", attempts.join(", "));
        let requests: Vec<String> = m
            .requests
            .iter()
            .filter(|(_, n)| **n > 0.0)
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        println!("gateway requests by reason: {}", requests.join(", "));
        println!(
            "unknown models: {} counted by the gateway; {} metric series in the last scrape, \
             {} naming an unknown model",
            m.unknown_models, m.series, m.unknown_model_series
        );
    }

    fn print_process(&self) {
        let p = &self.process;
        println!("\ngateway process (/proc):");
        let columns = [
            ("before load", &p.idle_start),
            ("warm-up", &p.warm),
            ("rest, warm", &p.warm_rest),
            ("middle", &p.middle),
            ("end", &p.end),
            ("rest, end", &p.end_rest),
            ("peak", &p.peak),
        ];
        print!("{:<24}", "");
        for (name, _) in &columns {
            print!("{name:>13}");
        }
        println!();
        let row = |name: &str, f: &dyn Fn(&Process) -> String| {
            print!("{name:<24}");
            for (_, x) in &columns {
                print!("{:>13}", f(x));
            }
            println!();
        };
        row("resident memory", &|x| mib(x.rss));
        row("open file descriptors", &|x| x.fds.to_string());
        row("threads", &|x| x.threads.to_string());
        row("runtime tasks (at rest)", &|x| {
            if x.tasks == 0 {
                "-".to_owned()
            } else {
                x.tasks.to_string()
            }
        });
        let line: Vec<String> = p
            .timeline
            .iter()
            .map(|(at, x)| {
                format!(
                    "{:.0} s {:.1}/{}/{}",
                    at.as_secs_f64(),
                    x.rss as f64 / f64::from(1 << 20),
                    x.fds,
                    x.threads
                )
            })
            .collect();
        println!("over the run (MiB/fds/threads): {}", line.join(", "));
        println!(
            "CPU: {:.1} s over {:.1} s of load ({:.0}% of one core; {:.0} us per request)",
            self.cpu.as_secs_f64(),
            self.tally.load_time.as_secs_f64(),
            self.cpu.as_secs_f64() / self.tally.load_time.as_secs_f64().max(1e-9) * 100.0,
            self.cpu.as_secs_f64() * 1e6 / self.tally.total_sent().max(1) as f64
        );
    }

    fn checks(&self, unexplained: u64) -> Vec<Check> {
        let t = &self.tally;
        let m = &self.metrics;
        let p = &self.process;
        vec![
            Check {
                what: format!(
                    "every request answered: {} without an answer (hangs)",
                    t.hangs()
                ),
                ok: t.hangs() == 0,
            },
            Check {
                what: format!(
                    "every failure explained by a fault window: {unexplained} of {} unexplained",
                    t.bad.len()
                ),
                ok: unexplained == 0,
            },
            Check {
                what: format!(
                    "every unknown model answered 404: {} of {}; the gateway counted {}",
                    t.ok[Kind::Unknown as usize],
                    t.sent[Kind::Unknown as usize],
                    m.unknown_models
                ),
                ok: t.ok[Kind::Unknown as usize] == t.sent[Kind::Unknown as usize]
                    && m.unknown_models == t.sent[Kind::Unknown as usize] as f64,
            },
            Check {
                what: format!(
                    "no metric series names an unknown model: {}",
                    m.unknown_model_series
                ),
                ok: m.unknown_model_series == 0,
            },
            Check {
                what: format!(
                    "achieved rate after warm-up >= {:.0} requests/s: {:.0}",
                    self.min_rate,
                    self.achieved_rate()
                ),
                ok: self.achieved_rate() >= self.min_rate,
            },
            reload_check("rejected", m.reloads("rejected"), self.invalid_writes),
            reload_check("applied", m.reloads("applied"), self.valid_writes),
            growth(
                "resident memory at rest, warm-up to end",
                p.warm_rest.rss,
                p.end_rest.rss,
                RSS_SLACK,
                mib,
            ),
            growth(
                "resident memory under load, middle to end",
                p.middle.rss,
                p.end.rss,
                RSS_SECOND_HALF_SLACK,
                mib,
            ),
            growth(
                "open file descriptors at rest, warm-up to end",
                p.warm_rest.fds,
                p.end_rest.fds,
                FDS_SLACK,
                |x| x.to_string(),
            ),
            growth(
                "threads at rest, warm-up to end",
                p.warm_rest.threads,
                p.end_rest.threads,
                THREADS_SLACK,
                |x| x.to_string(),
            ),
            growth(
                "runtime tasks at rest, warm-up to end",
                p.warm_rest.tasks,
                p.end_rest.tasks,
                TASKS_SLACK,
                |x| x.to_string(),
            ),
            Check {
                what: match &self.stopped_cleanly {
                    Ok(()) => "the gateway stopped cleanly on SIGTERM".into(),
                    Err(e) => format!("the gateway stopped cleanly on SIGTERM: {e}"),
                },
                ok: self.stopped_cleanly.is_ok(),
            },
        ]
    }
}

/// The policy watcher counted (nearly) every write of a kind: each write
/// replaces the file a second after the last, far beyond the watcher's
/// debounce, so at most the last write (made as the load ended) may not
/// have been read before the final scrape.
fn reload_check(result: &str, counted: f64, writes: u64) -> Check {
    let floor = writes.saturating_sub(1) as f64;
    Check {
        what: format!(
            "policy writes {result}: {counted} counted for {writes} writes (at least {floor})"
        ),
        ok: counted >= floor && (writes == 0 || counted >= 1.0),
    }
}

/// `name` grew from `warm` to `end` by at most [`GROWTH_RATIO`] or
/// `slack`; `name` says over which span.
fn growth(name: &str, warm: u64, end: u64, slack: u64, show: fn(u64) -> String) -> Check {
    let allowed = ((warm as f64 * GROWTH_RATIO) as u64).max(slack);
    Check {
        what: format!(
            "{name}: {} -> {} (at most {} allowed)",
            show(warm),
            show(end),
            show(warm + allowed)
        ),
        ok: end <= warm + allowed,
    }
}

/// Seconds of the run covered by the union of the windows and their
/// grace.
fn covered(windows: &[&Window], secs: f64) -> f64 {
    let run = Duration::from_secs_f64(secs);
    let mut spans: Vec<(Duration, Duration)> = windows
        .iter()
        .map(|w| (w.start.min(run), (w.end + crate::faults::GRACE).min(run)))
        .collect();
    spans.sort();
    let mut total = Duration::ZERO;
    let mut current: Option<(Duration, Duration)> = None;
    for (s, e) in spans {
        current = match current {
            Some((cs, ce)) if s <= ce => Some((cs, ce.max(e))),
            Some((cs, ce)) => {
                total += ce - cs;
                Some((s, e))
            }
            None => Some((s, e)),
        };
    }
    if let Some((cs, ce)) = current {
        total += ce - cs;
    }
    total.as_secs_f64()
}
