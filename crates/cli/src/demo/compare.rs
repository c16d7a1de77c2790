//! `retryctl demo --compare`: each adaptive option, and the admission gate,
//! against the fixed rule, on a fault schedule made for it.
//!
//! A scenario is a seeded fault schedule per provider and two policies:
//! the fixed one (the defaults) and the one with the option on. The
//! adaptive options are options of the retry rounds, so both sides of their
//! scenarios run without the admission gate (`admission.enabled = false`):
//! the gate would take the connection-level failures out of the rounds and
//! measure itself instead. The `admission` scenario measures the gate: the
//! demo's fault mix, the defaults with the gate off against the defaults. Both run at
//! the same time, each against its own set of [`FaultServer`]s on loopback
//! following the same schedule from the same moment, with the same
//! requests (the same ids, so the same per-request noise). The report
//! compares failures, upstream attempts (amplification), wasted attempts
//! (failed retries and probes) and latency.
//!
//! The scenarios are built where each option should matter, so a win here
//! says "it does what it claims", not "turn it on everywhere": the default
//! demo (`retryctl demo`) is the general workload. The shadow scenario is
//! different: its "adaptive" side runs the shadow's candidate for real, so
//! the shadow's estimate (live failures - saved + caused) can be checked
//! against what the candidate actually does.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::time::{Instant, MissedTickBehavior};

use super::report::{SideReport, side};
use super::runner::{DemoError, MODEL, Upstream, client, one};
use retryctl::Pool;
use retryctl::policy::LivePolicy;
use retryctl::policy::{Policy, RetryDelay};
use retryctl::stats::ShadowCounts;
use retryctl_testkit::faults::FaultServer;
use retryctl_testkit::schedule::{FaultKind, NoiseRates, Schedule, Window};

/// One comparison: what runs, on which faults.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// A short name (`latency_order`, ...).
    pub name: &'static str,
    /// The policy option it is about, as written in the policy file.
    pub option: &'static str,
    /// What the faults are, in a few words.
    pub faults: &'static str,
    /// One schedule per provider, in order.
    pub providers: Vec<Schedule>,
    /// Requests per second (to each side).
    pub rps: u32,
    /// How long traffic runs.
    pub duration: Duration,
    /// Each request's deadline.
    pub deadline: Duration,
    /// The fixed rule.
    pub fixed: Policy,
    /// The option on (for the shadow scenario: the candidate, run for real).
    pub adaptive: Policy,
}

/// Both sides of one scenario.
#[derive(Clone, Debug, Serialize)]
pub struct ScenarioReport {
    /// The scenario's name.
    pub name: &'static str,
    /// Its option.
    pub option: &'static str,
    /// Its faults.
    pub faults: &'static str,
    /// Requests sent to each side.
    pub requests: u64,
    /// The fixed rule's results.
    pub fixed: SideReport,
    /// The option's results.
    pub adaptive: SideReport,
    /// 90th percentile latency, ms: fixed, adaptive.
    pub p90_ms: (f64, f64),
    /// Mean latency, ms: fixed, adaptive.
    pub mean_ms: (f64, f64),
    /// For the shadow scenario: what the fixed side's `[shadow]` counted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowEstimate>,
}

/// The shadow's counts on the live side, and the failures they predict.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ShadowEstimate {
    /// Failed requests the candidate would have retried.
    pub would_retry: u64,
    /// Of which the provider's next attempt after the wait succeeded.
    pub saved: u64,
    /// Of which it failed.
    pub retried_in_vain: u64,
    /// Served requests the candidate would have failed.
    pub caused: u64,
    /// Live failures - saved + caused.
    pub predicted_failures: u64,
}

impl ScenarioReport {
    /// Whether the option beat the fixed rule: fewer failures, or as many
    /// with fewer attempts, fewer wasted attempts, or a lower mean, p90 or
    /// p99 latency (each by more than 5%).
    pub fn adaptive_wins(&self) -> bool {
        let (f, a) = (&self.fixed, &self.adaptive);
        a.failures < f.failures || (a.failures == f.failures && !self.gains().is_empty())
    }

    /// What the option did better, by more than 5% (and more than one
    /// attempt or millisecond), besides failures.
    fn gains(&self) -> Vec<&'static str> {
        let (f, a) = (&self.fixed, &self.adaptive);
        let better = |x: f64, y: f64| x < y * 0.95 && y - x >= 1.0;
        let mut out = Vec::new();
        if better(a.attempts as f64, f.attempts as f64) {
            out.push("fewer attempts");
        }
        if better(a.wasted_attempts as f64, f.wasted_attempts as f64) {
            out.push("fewer wasted attempts");
        }
        if better(self.mean_ms.1, self.mean_ms.0) {
            out.push("lower mean latency");
        }
        if better(self.p90_ms.1, self.p90_ms.0) {
            out.push("lower p90");
        }
        if better(a.p99_ms, f.p99_ms) {
            out.push("lower p99");
        }
        out
    }

    /// One line: who won and how.
    pub fn verdict(&self) -> String {
        let (f, a) = (&self.fixed, &self.adaptive);
        let gains = self.gains();
        let pct = |a: f64, b: f64| if b == 0.0 { 0.0 } else { (a - b) / b * 100.0 };
        let failures = format!(
            "failures {} -> {} ({:+.0}%)",
            f.failures,
            a.failures,
            pct(a.failures as f64, f.failures as f64)
        );
        let also = if gains.is_empty() {
            String::new()
        } else {
            format!(", {}", gains.join(", "))
        };
        if self.adaptive_wins() {
            format!("the option wins: {failures}{also}")
        } else {
            format!("no win: {failures}{also}")
        }
    }
}

fn quiet() -> NoiseRates {
    NoiseRates {
        bad_gateway: 0.0,
        unavailable: 0.0,
        client_error: 0.0,
        slow: 0.0,
        slow_delay: Duration::ZERO,
    }
}

/// Every answer after `delay`.
fn latency(seed: u64, delay: Duration) -> Schedule {
    Schedule {
        seed,
        windows: Vec::new(),
        noise: NoiseRates {
            slow: 1.0,
            slow_delay: delay,
            ..quiet()
        },
    }
}

/// Windows of `kind` of `len`, the first at `first`, one every `every`
/// (each moved by up to 200 ms from the seed), within `duration`.
fn windows(
    seed: u64,
    kind: FaultKind,
    first: u64,
    len: u64,
    every: u64,
    duration: Duration,
) -> Schedule {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = Vec::new();
    let mut t = first;
    while Duration::from_millis(t + len) < duration {
        let start = t + rng.u64(0..=200);
        out.push(Window {
            kind,
            start: Duration::from_millis(start),
            end: Duration::from_millis(start + len),
            reset: false,
        });
        t += every;
    }
    Schedule {
        seed,
        windows: out,
        noise: quiet(),
    }
}

/// The demo's fault mix (as [`Schedule::generate`] makes it, in a shorter
/// run): a reload that refuses, a restart of 2-5 s, a backlog-1
/// slow-accept window and a reload that resets, each window's length drawn
/// from the seed, at least 1.5 s apart, with the demo's per-request noise.
pub fn demo_mix(seed: u64) -> Schedule {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut windows = Vec::new();
    let mut t = Duration::from_millis(500);
    for (kind, lo, hi, reset) in [
        (FaultKind::Reload, 100, 300, false),
        (FaultKind::Restart, 2000, 5000, false),
        (FaultKind::Backlog, 300, 600, false),
        (FaultKind::Reload, 100, 300, true),
    ] {
        let end = t + Duration::from_millis(rng.u64(lo..=hi));
        windows.push(Window {
            kind,
            start: t,
            end,
            reset,
        });
        t = end + Duration::from_millis(1500 + rng.u64(0..=500));
    }
    Schedule {
        seed,
        windows,
        noise: NoiseRates::default(),
    }
}

/// The scenarios, one per adaptive option and one for the admission gate,
/// from `seed`.
pub fn scenarios(seed: u64) -> Vec<Scenario> {
    // The adaptive options' scenarios: both sides without the gate.
    let mut base = Policy::default();
    base.admission.enabled = false;
    let with = |f: &dyn Fn(&mut Policy)| {
        let mut p = base.clone();
        f(&mut p);
        p
    };
    let secs = Duration::from_secs;
    let mix = demo_mix(seed);
    let mix_duration = mix.windows.last().map_or(secs(10), |w| w.end) + secs(1);
    vec![
        Scenario {
            name: "latency_order",
            option: "[adaptive] latency_order = true",
            faults: "2 providers: 800 ms and 20 ms per answer",
            providers: vec![
                latency(seed, Duration::from_millis(800)),
                latency(seed, Duration::from_millis(20)),
            ],
            rps: 100,
            duration: secs(10),
            deadline: secs(10),
            fixed: base.clone(),
            adaptive: with(&|p| {
                p.adaptive.latency_order = true;
                p.adaptive.min_samples = 10;
            }),
        },
        Scenario {
            name: "learned_delay",
            option: "delay = \"auto\"",
            faults: "1 provider refusing for 1.5 s every 3.5 s",
            providers: vec![windows(seed, FaultKind::Reload, 500, 1500, 3500, secs(11))],
            rps: 100,
            duration: secs(11),
            deadline: secs(10),
            fixed: base.clone(),
            adaptive: with(&|p| p.delay = RetryDelay::Auto),
        },
        Scenario {
            name: "shadow",
            option: "[shadow] max_rounds = 3 (live: 2)",
            faults: "1 provider refusing for 1.2 s every 3 s",
            providers: vec![windows(seed, FaultKind::Reload, 500, 1200, 3000, secs(9))],
            rps: 100,
            duration: secs(9),
            deadline: secs(10),
            fixed: with(&|p| {
                p.shadow = Some(retryctl::policy::PolicyOverride {
                    max_rounds: Some(3),
                    ..Default::default()
                });
            }),
            adaptive: with(&|p| p.max_rounds = 3),
        },
        Scenario {
            name: "deadline_aware",
            option: "[adaptive] deadline_aware = true",
            faults: "1 provider: answers take 2 s, 20% are 502; 2.3 s deadlines",
            providers: vec![Schedule {
                seed,
                windows: Vec::new(),
                noise: NoiseRates {
                    bad_gateway: 0.2,
                    slow: 0.8,
                    slow_delay: secs(2),
                    ..quiet()
                },
            }],
            rps: 50,
            duration: secs(6),
            deadline: Duration::from_millis(2300),
            fixed: base.clone(),
            adaptive: with(&|p| {
                p.adaptive.deadline_aware = true;
                p.adaptive.min_samples = 20;
            }),
        },
        Scenario {
            name: "attempt_timeout",
            option: "[adaptive] attempt_timeout = true",
            faults: "1 provider: 3% of answers stall; 3 s deadlines",
            providers: vec![Schedule {
                seed,
                windows: Vec::new(),
                noise: NoiseRates {
                    slow: 0.03,
                    slow_delay: secs(30),
                    ..quiet()
                },
            }],
            rps: 100,
            duration: secs(6),
            deadline: secs(3),
            fixed: base.clone(),
            adaptive: with(&|p| p.adaptive.attempt_timeout = true),
        },
        Scenario {
            name: "budget",
            option: "[adaptive] budget = true",
            faults: "1 provider down (port closed) from 1 s to 5 s",
            providers: vec![Schedule {
                seed,
                windows: vec![Window {
                    kind: FaultKind::Restart,
                    start: secs(1),
                    end: secs(5),
                    reset: false,
                }],
                noise: quiet(),
            }],
            rps: 100,
            duration: secs(6),
            deadline: secs(10),
            fixed: base.clone(),
            adaptive: with(&|p| p.adaptive.budget = true),
        },
        Scenario {
            name: "admission",
            option: "[admission] enabled = true",
            faults: "the demo's mix: reloads (refuse, reset), a restart of 2-5 s, backlog 1",
            providers: vec![mix],
            rps: 100,
            duration: mix_duration,
            deadline: secs(15),
            adaptive: with(&|p| p.admission.enabled = true),
            fixed: base,
        },
    ]
}

fn build(
    policy: &Policy,
    urls: &[String],
    prefix: &str,
    connect_timeout: Duration,
) -> Result<Pool<Upstream>, DemoError> {
    let client = client(&policy.timeouts, connect_timeout)?;
    let mut b = Pool::builder()
        .policy(LivePolicy::new(policy.clone())?)
        .metrics_prefix(prefix);
    for (i, url) in urls.iter().enumerate() {
        b = b.provider(
            MODEL,
            &format!("p{i}"),
            Upstream {
                client: client.clone(),
                url: url.clone(),
            },
        );
    }
    Ok(b.build()?)
}

/// Runs one scenario: both sides at once, on their own fault servers.
pub async fn run(
    scenario: &Scenario,
    connect_timeout: Duration,
) -> Result<ScenarioReport, DemoError> {
    let epoch = Instant::now() + Duration::from_millis(300);
    let mut servers = Vec::new();
    let mut urls: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    for side in &mut urls {
        for schedule in &scenario.providers {
            let server = FaultServer::start(Arc::new(schedule.clone()), epoch).await?;
            side.push(server.url());
            servers.push(server);
        }
    }
    let pools = [
        Arc::new(build(
            &scenario.fixed,
            &urls[0],
            "retryctl_compare_fixed_",
            connect_timeout,
        )?),
        Arc::new(build(
            &scenario.adaptive,
            &urls[1],
            "retryctl_compare_adaptive_",
            connect_timeout,
        )?),
    ];
    let total = (u128::from(scenario.rps) * scenario.duration.as_millis() / 1000) as u64;
    let period = Duration::from_secs_f64(1.0 / f64::from(scenario.rps.max(1)));
    let mut tick = tokio::time::interval_at(epoch, period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    for id in 0..total {
        tick.tick().await;
        let sent = Instant::now().saturating_duration_since(epoch);
        for (side, pool) in pools.iter().enumerate() {
            let pool = pool.clone();
            let deadline = scenario.deadline;
            tasks.spawn(async move { (side, one(&pool, id, sent, deadline).await) });
        }
    }
    let mut samples = [Vec::new(), Vec::new()];
    while let Some(joined) = tasks.join_next().await {
        if let Ok((side, sample)) = joined {
            samples[side].push(sample);
        }
    }
    drop(servers);
    let shadow = pools[0]
        .shadow_counts(MODEL)
        .filter(|_| scenario.fixed.shadow.is_some());
    let fixed = side(&samples[0]);
    let p90 = |s: &[super::runner::Sample]| super::report::percentile(s, 0.9);
    let mean = |s: &[super::runner::Sample]| {
        let total: f64 = s.iter().map(|x| x.latency.as_secs_f64() * 1000.0).sum();
        total / s.len().max(1) as f64
    };
    Ok(ScenarioReport {
        name: scenario.name,
        option: scenario.option,
        faults: scenario.faults,
        requests: total,
        p90_ms: (p90(&samples[0]), p90(&samples[1])),
        mean_ms: (mean(&samples[0]), mean(&samples[1])),
        shadow: shadow.map(|c: ShadowCounts| ShadowEstimate {
            would_retry: c.would_retry,
            saved: c.saved,
            retried_in_vain: c.retried_in_vain,
            caused: c.caused,
            predicted_failures: (fixed.failures + c.caused).saturating_sub(c.saved),
        }),
        fixed,
        adaptive: side(&samples[1]),
    })
}

/// The comparison table.
pub fn table(seed: u64, reports: &[ScenarioReport]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "retryctl demo --compare: seed {seed}; each scenario runs the fixed policy and the\n\
         option side by side on the same faults (real loopback sockets, same requests)\n"
    );
    let _ = writeln!(
        t,
        "{:<16}{:<10}{:>9}{:>8}{:>8}{:>8}{:>10}{:>10}{:>10}{:>10}",
        "scenario", "policy", "requests", "failed", "ampl.", "wasted", "mean", "p50", "p90", "p99"
    );
    let ms = |v: f64| {
        if v >= 1000.0 {
            format!("{:.2} s", v / 1000.0)
        } else {
            format!("{v:.0} ms")
        }
    };
    for r in reports {
        let sides = [
            ("fixed", &r.fixed, r.p90_ms.0, r.mean_ms.0),
            ("adaptive", &r.adaptive, r.p90_ms.1, r.mean_ms.1),
        ];
        for (label, s, p90, mean) in sides {
            let name = if label == "fixed" { r.name } else { "" };
            let _ = writeln!(
                t,
                "{:<16}{:<10}{:>9}{:>8}{:>8}{:>8}{:>10}{:>10}{:>10}{:>10}",
                name,
                label,
                r.requests,
                s.failures,
                format!("{:+.0}%", s.amplification_pct),
                s.wasted_attempts,
                ms(mean),
                ms(s.p50_ms),
                ms(p90),
                ms(s.p99_ms),
            );
        }
        let _ = writeln!(t, "  option: {}; faults: {}", r.option, r.faults);
        if r.fixed.queued_requests + r.adaptive.queued_requests > 0 {
            let _ = writeln!(
                t,
                "  waited at the gate: fixed {} requests (p99 {}), adaptive {} requests (p99 {})",
                r.fixed.queued_requests,
                ms(r.fixed.queued_p99_ms),
                r.adaptive.queued_requests,
                ms(r.adaptive.queued_p99_ms)
            );
        }
        if let Some(e) = r.shadow {
            let _ = writeln!(
                t,
                "  shadow (on the fixed side): would retry {}, saved {}, in vain {}, caused {}: predicted failures {} (actual {})",
                e.would_retry,
                e.saved,
                e.retried_in_vain,
                e.caused,
                e.predicted_failures,
                r.adaptive.failures
            );
        }
        let _ = writeln!(t, "  verdict: {}\n", r.verdict());
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(fixed: SideReport, adaptive: SideReport) -> ScenarioReport {
        ScenarioReport {
            name: "admission",
            option: "[admission] enabled = true",
            faults: "",
            requests: 1000,
            p90_ms: (10.0, 10.0),
            mean_ms: (10.0, 10.0),
            shadow: None,
            fixed,
            adaptive,
        }
    }

    fn side(failures: u64, attempts: u64, wasted_attempts: u64) -> SideReport {
        SideReport {
            failures,
            attempts,
            wasted_attempts,
            p50_ms: 5.0,
            p99_ms: 50.0,
            ..SideReport::default()
        }
    }

    #[test]
    fn fewer_wasted_attempts_at_equal_failures_is_a_win_and_more_failures_is_not() {
        let r = report(side(10, 1100, 100), side(10, 1090, 20));
        assert!(r.adaptive_wins());
        assert_eq!(
            r.verdict(),
            "the option wins: failures 10 -> 10 (+0%), fewer wasted attempts"
        );
        let r = report(side(10, 1100, 100), side(11, 1010, 0));
        assert!(!r.adaptive_wins());
        assert!(
            r.verdict().starts_with("no win: failures 10 -> 11"),
            "{}",
            r.verdict()
        );
        // within 5%: no gain
        let r = report(side(10, 1100, 100), side(10, 1100, 96));
        assert!(!r.adaptive_wins(), "{}", r.verdict());
        let r = report(side(10, 1100, 100), side(9, 1100, 300));
        assert!(r.adaptive_wins(), "{}", r.verdict());
    }

    #[test]
    fn only_the_admission_scenario_turns_the_gate_on() {
        let all = scenarios(3);
        let names: Vec<_> = all.iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            [
                "latency_order",
                "learned_delay",
                "shadow",
                "deadline_aware",
                "attempt_timeout",
                "budget",
                "admission"
            ]
        );
        for s in &all {
            assert!(!s.fixed.admission.enabled, "{}", s.name);
            assert_eq!(
                s.adaptive.admission.enabled,
                s.name == "admission",
                "{}",
                s.name
            );
        }
        let admission = all.iter().find(|s| s.name == "admission").unwrap();
        let mut adaptive = admission.adaptive.clone();
        adaptive.admission.enabled = false;
        assert_eq!(adaptive, admission.fixed, "the gate is the only difference");
        let mut gated = Policy::default();
        gated.admission.enabled = true;
        assert_eq!(admission.adaptive, gated);
    }

    #[test]
    fn the_admission_scenario_runs_the_demo_mix() {
        for seed in 0..50 {
            let s = demo_mix(seed);
            let kinds: Vec<_> = s.windows.iter().map(|w| (w.kind, w.reset)).collect();
            assert_eq!(
                kinds,
                [
                    (FaultKind::Reload, false),
                    (FaultKind::Restart, false),
                    (FaultKind::Backlog, false),
                    (FaultKind::Reload, true)
                ]
            );
            let restart = s.windows[1].end - s.windows[1].start;
            assert!(
                (Duration::from_secs(2)..=Duration::from_secs(5)).contains(&restart),
                "{restart:?}"
            );
            for pair in s.windows.windows(2) {
                assert!(pair[1].start >= pair[0].end + Duration::from_millis(1500));
            }
            assert_eq!(s.noise, NoiseRates::default());
            assert_eq!(demo_mix(seed), s);
        }
        let all = scenarios(1);
        let admission = all.iter().find(|s| s.name == "admission").unwrap();
        let last = admission.providers[0].windows.last().unwrap().end;
        assert!(admission.duration > last, "the run covers every window");
    }
}
