//! The demo's verdict: a table, JSON, and an SVG chart.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::runner::{ReloadSummary, Sample};
use retryctl_testkit::schedule::{FaultKind, Schedule, Window};

/// The production reference: baseline failures per day.
pub const PRODUCTION_FAILURES_PER_DAY: f64 = 9_500.0;

/// Width of the timeline bins.
const BIN: Duration = Duration::from_millis(500);

/// One pool's results.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SideReport {
    /// Failed requests.
    pub failures: u64,
    /// Requests with a failed attempt, or that failed without one: what
    /// would have failed without retries.
    pub any_attempt_failed: u64,
    /// Upstream attempts.
    pub attempts: u64,
    /// Extra attempts over one per request, in %.
    pub amplification_pct: f64,
    /// Attempts that failed and were not the request's first, plus failed
    /// admission probes: what the retries cost the upstream for nothing.
    pub wasted_attempts: u64,
    /// Requests that waited at an admission gate.
    pub queued_requests: u64,
    /// 99th percentile of the time requests waited at admission gates
    /// (all requests, those that did not wait count as 0), ms.
    pub queued_p99_ms: f64,
    /// Requests that failed because the retry budget refused a retry.
    pub budget_refused: u64,
    /// Failures per day, scaled so the baseline is the production figure.
    pub failures_per_day: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Failed requests by reason.
    pub reasons: Vec<(String, u64)>,
}

/// One fault type's effect.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FaultRow {
    /// The fault.
    pub kind: FaultKind,
    /// What it is.
    pub description: &'static str,
    /// Requests it hit in the first attempt (baseline).
    pub hit: u64,
    /// Baseline failures it caused.
    pub baseline_failed: u64,
    /// Failures it caused with retries.
    pub retrying_failed: u64,
    /// Requests it made fail on the baseline that the retrying side
    /// served (after failed attempts, or after waiting at the gate).
    pub absorbed: u64,
    /// The retrying side's wasted attempts (failed retries and failed
    /// probes) in requests sent while it was active.
    pub wasted: u64,
}

/// Failures in one time bin.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TimelinePoint {
    /// Bin start, seconds.
    pub t: f64,
    /// Baseline failures per second in the bin.
    pub baseline: f64,
    /// Failures per second with retries.
    pub retrying: f64,
}

/// The whole report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DemoReport {
    /// Seed used.
    pub seed: u64,
    /// Requests per second, each pool.
    pub rps: u32,
    /// Traffic duration, seconds.
    pub duration_s: f64,
    /// Requests sent to each pool.
    pub requests: u64,
    /// Without retries.
    pub baseline: SideReport,
    /// With the policy.
    pub retrying: SideReport,
    /// Failure reduction, %.
    pub reduction_pct: f64,
    /// Per fault type.
    pub faults: Vec<FaultRow>,
    /// Requests retried after a client error: must be 0.
    pub client_errors_retried: u64,
    /// The retrying side's wasted attempts per failure it absorbed
    /// (baseline failures - retrying failures); `None` when it absorbed
    /// none.
    pub wasted_per_absorbed: Option<f64>,
    /// What the policy file watcher did, when the retrying side followed
    /// a file (`retryctl demo --policy FILE`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reloads: Option<ReloadSummary>,
    /// The fault windows.
    pub windows: Vec<Window>,
    /// Failures over time.
    pub timeline: Vec<TimelinePoint>,
}

/// The `q` quantile of the samples' latency, in ms.
pub(crate) fn percentile(samples: &[Sample], q: f64) -> f64 {
    quantile_ms(samples.iter().map(|s| s.latency), q)
}

/// The `q` quantile of `values`, in ms (0 when empty; zero values count
/// as zero).
pub(crate) fn quantile_ms(values: impl Iterator<Item = Duration>, q: f64) -> f64 {
    let mut h = match Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3) {
        Ok(h) => h,
        Err(_) => return 0.0,
    };
    let mut zeros = 0u64;
    let mut n = 0u64;
    for v in values {
        n += 1;
        match v.as_micros() as u64 {
            0 => zeros += 1,
            us => h.saturating_record(us),
        }
    }
    if n == 0 || (zeros as f64) >= q * n as f64 {
        return 0.0;
    }
    // The quantile among the non-zero values that puts it at `q` overall.
    let q = (q * n as f64 - zeros as f64) / (n - zeros) as f64;
    h.value_at_quantile(q.clamp(0.0, 1.0)) as f64 / 1000.0
}

/// One side's figures.
pub(crate) fn side(samples: &[Sample]) -> SideReport {
    let n = samples.len() as u64;
    let failures = samples.iter().filter(|s| !s.ok).count() as u64;
    let attempts: u64 = samples.iter().map(|s| u64::from(s.attempts)).sum();
    let mut reasons: Vec<(String, u64)> = Vec::new();
    for s in samples.iter().filter_map(|s| s.reason) {
        match reasons.iter_mut().find(|(r, _)| r == s) {
            Some((_, c)) => *c += 1,
            None => reasons.push((s.to_owned(), 1)),
        }
    }
    reasons.sort();
    SideReport {
        failures,
        any_attempt_failed: samples.iter().filter(|s| s.any_attempt_failed()).count() as u64,
        attempts,
        amplification_pct: if n == 0 {
            0.0
        } else {
            (attempts as f64 - n as f64) / n as f64 * 100.0
        },
        wasted_attempts: samples.iter().map(|s| u64::from(s.wasted)).sum(),
        queued_requests: samples.iter().filter(|s| !s.queued.is_zero()).count() as u64,
        queued_p99_ms: quantile_ms(samples.iter().map(|s| s.queued), 0.99),
        budget_refused: samples
            .iter()
            .filter(|s| s.reason == Some("budget_exhausted"))
            .count() as u64,
        failures_per_day: 0.0,
        p50_ms: percentile(samples, 0.5),
        p99_ms: percentile(samples, 0.99),
        reasons,
    }
}

/// What fault a request's first attempt met: the window active when it was
/// sent, else the noise of its first attempt.
pub fn attribute(schedule: &Schedule, sample: &Sample) -> Option<FaultKind> {
    schedule
        .window_at(sample.sent)
        .map(|w| w.kind)
        .or_else(|| schedule.noise(sample.id, 1).kind())
}

impl DemoReport {
    /// Builds the report from both sides' samples (sorted by id, same ids).
    pub fn new(
        schedule: &Schedule,
        rps: u32,
        duration: Duration,
        baseline: &[Sample],
        retrying: &[Sample],
    ) -> DemoReport {
        let mut b = side(baseline);
        let mut r = side(retrying);
        b.failures_per_day = if b.failures == 0 {
            0.0
        } else {
            PRODUCTION_FAILURES_PER_DAY
        };
        r.failures_per_day = if b.failures == 0 {
            0.0
        } else {
            PRODUCTION_FAILURES_PER_DAY * r.failures as f64 / b.failures as f64
        };
        let absorbed = b.failures.saturating_sub(r.failures);
        let wasted_per_absorbed =
            (absorbed > 0).then(|| r.wasted_attempts as f64 / absorbed as f64);
        let reduction_pct = if b.failures == 0 {
            0.0
        } else {
            (b.failures as f64 - r.failures as f64) / b.failures as f64 * 100.0
        };
        let served: std::collections::HashSet<u64> =
            retrying.iter().filter(|s| s.ok).map(|s| s.id).collect();
        let faults = FaultKind::ALL
            .iter()
            .map(|&kind| {
                let of = |s: &&Sample| attribute(schedule, s) == Some(kind);
                FaultRow {
                    kind,
                    description: kind.describe(),
                    hit: baseline
                        .iter()
                        .filter(of)
                        .filter(|s| s.first_failure.is_some())
                        .count() as u64,
                    baseline_failed: baseline.iter().filter(of).filter(|s| !s.ok).count() as u64,
                    retrying_failed: retrying.iter().filter(of).filter(|s| !s.ok).count() as u64,
                    // The same request failed on the baseline and was
                    // served with retries: whether after a failed attempt
                    // or after waiting at the admission gate without one.
                    absorbed: baseline
                        .iter()
                        .filter(of)
                        .filter(|s| !s.ok && served.contains(&s.id))
                        .count() as u64,
                    wasted: retrying
                        .iter()
                        .filter(of)
                        .map(|s| u64::from(s.wasted))
                        .sum(),
                }
            })
            .collect();
        let bins = (duration.as_secs_f64() / BIN.as_secs_f64()).ceil() as usize;
        let mut timeline: Vec<TimelinePoint> = (0..bins)
            .map(|i| TimelinePoint {
                t: i as f64 * BIN.as_secs_f64(),
                baseline: 0.0,
                retrying: 0.0,
            })
            .collect();
        let per_second = 1.0 / BIN.as_secs_f64();
        for (samples, pick) in [(baseline, 0), (retrying, 1)] {
            for s in samples.iter().filter(|s| !s.ok) {
                let i = ((s.sent.as_secs_f64() / BIN.as_secs_f64()) as usize)
                    .min(bins.saturating_sub(1));
                if let Some(p) = timeline.get_mut(i) {
                    if pick == 0 {
                        p.baseline += per_second;
                    } else {
                        p.retrying += per_second;
                    }
                }
            }
        }
        DemoReport {
            seed: schedule.seed,
            rps,
            duration_s: duration.as_secs_f64(),
            requests: baseline.len() as u64,
            baseline: b,
            retrying: r,
            reduction_pct,
            faults,
            client_errors_retried: retrying.iter().filter(|s| s.retried_client_error).count()
                as u64,
            wasted_per_absorbed,
            reloads: None,
            windows: schedule.windows.clone(),
            timeline,
        }
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let (b, r) = (&self.baseline, &self.retrying);
        let mut t = String::new();
        let _ = writeln!(
            t,
            "retryctl demo: seed {}, {} req/s for {:.0} s, {} requests per pool\n",
            self.seed, self.rps, self.duration_s, self.requests
        );
        let _ = writeln!(t, "{:<42}{:>14}{:>14}", "", "baseline", "retryctl");
        let row = |t: &mut String, name: &str, a: String, b: String| {
            let _ = writeln!(t, "{name:<42}{a:>14}{b:>14}");
        };
        row(
            &mut t,
            "failed requests",
            b.failures.to_string(),
            r.failures.to_string(),
        );
        row(
            &mut t,
            "failure reduction",
            String::new(),
            format!("{:.1}%", self.reduction_pct),
        );
        row(
            &mut t,
            "failures/day (baseline = 9,500)",
            format!("{:.0}", b.failures_per_day),
            format!("{:.0}", r.failures_per_day),
        );
        row(
            &mut t,
            "requests with a failed attempt",
            b.any_attempt_failed.to_string(),
            r.any_attempt_failed.to_string(),
        );
        row(
            &mut t,
            "upstream attempts",
            b.attempts.to_string(),
            r.attempts.to_string(),
        );
        row(
            &mut t,
            "extra attempts (amplification)",
            format!("{:+.1}%", b.amplification_pct),
            format!("{:+.1}%", r.amplification_pct),
        );
        row(
            &mut t,
            "wasted attempts (failed retries + probes)",
            b.wasted_attempts.to_string(),
            r.wasted_attempts.to_string(),
        );
        row(
            &mut t,
            "wasted per absorbed failure",
            "-".into(),
            self.wasted_per_absorbed
                .map_or_else(|| "-".to_owned(), |w| format!("{w:.2}")),
        );
        row(
            &mut t,
            "failed: retry budget refused",
            "-".into(),
            r.budget_refused.to_string(),
        );
        row(
            &mut t,
            "waited at the gate (p99)",
            "-".into(),
            format!("{:.1} ms", r.queued_p99_ms),
        );
        row(
            &mut t,
            "latency p50",
            format!("{:.1} ms", b.p50_ms),
            format!("{:.1} ms", r.p50_ms),
        );
        row(
            &mut t,
            "latency p99",
            format!("{:.1} ms", b.p99_ms),
            format!("{:.1} ms", r.p99_ms),
        );
        row(
            &mut t,
            "client errors retried (must be 0)",
            "-".into(),
            self.client_errors_retried.to_string(),
        );
        let _ = writeln!(
            t,
            "\n{:<26}{:>8}{:>12}{:>12}{:>12}{:>8}",
            "fault", "hit", "failed", "failed", "absorbed", "wasted"
        );
        let _ = writeln!(
            t,
            "{:<26}{:>8}{:>12}{:>12}{:>12}{:>8}",
            "", "", "baseline", "retryctl", "", ""
        );
        for f in &self.faults {
            let absorbed = if f.hit == 0 {
                "-".to_owned()
            } else {
                format!(
                    "{} ({:.0}%)",
                    f.absorbed,
                    f.absorbed as f64 / f.hit as f64 * 100.0
                )
            };
            let _ = writeln!(
                t,
                "{:<26}{:>8}{:>12}{:>12}{:>12}{:>8}",
                f.description, f.hit, f.baseline_failed, f.retrying_failed, absorbed, f.wasted
            );
        }
        let reasons: Vec<String> = r.reasons.iter().map(|(k, v)| format!("{k} {v}")).collect();
        if !reasons.is_empty() {
            let _ = writeln!(t, "\nretryctl failures by reason: {}", reasons.join(", "));
        }
        if let Some(reloads) = &self.reloads {
            let _ = writeln!(t, "\n{}", reloads.line());
        }
        t
    }

    /// Writes the report as JSON.
    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, text)
    }

    /// Draws failures per second over time, baseline vs retryctl, with the
    /// fault windows shaded, as SVG.
    pub fn write_svg(&self, path: &Path) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        use plotters::prelude::*;
        let root = SVGBackend::new(path, (1100, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        let y_max = self
            .timeline
            .iter()
            .map(|p| p.baseline.max(p.retrying))
            .fold(1.0f64, f64::max)
            * 1.4; // headroom for the legend
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "Failed requests per second: baseline {} vs retryctl {} (-{:.1}%)",
                    self.baseline.failures, self.retrying.failures, self.reduction_pct
                ),
                ("sans-serif", 20),
            )
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..self.duration_s, 0f64..y_max)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("failed requests / s")
            .draw()?;
        for w in &self.windows {
            let color = match w.kind {
                FaultKind::Reload => RGBColor(255, 165, 0),
                FaultKind::Backlog => RGBColor(150, 80, 200),
                _ => RGBColor(220, 50, 50),
            };
            chart.draw_series(std::iter::once(Rectangle::new(
                [
                    (w.start.as_secs_f64(), 0.0),
                    (w.end.as_secs_f64().max(w.start.as_secs_f64() + 0.05), y_max),
                ],
                color.mix(0.2).filled(),
            )))?;
        }
        let step = |f: fn(&TimelinePoint) -> f64| {
            let mut pts = Vec::with_capacity(self.timeline.len() * 2);
            for p in &self.timeline {
                pts.push((p.t, f(p)));
                pts.push((p.t + BIN.as_secs_f64(), f(p)));
            }
            pts
        };
        chart
            .draw_series(LineSeries::new(
                step(|p| p.baseline),
                RGBColor(90, 90, 90).stroke_width(2),
            ))?
            .label("baseline (no retry)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RGBColor(90, 90, 90)));
        chart
            .draw_series(LineSeries::new(step(|p| p.retrying), BLUE.stroke_width(2)))?
            .label("retryctl")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        for (kind, color) in [
            (FaultKind::Reload, RGBColor(255, 165, 0)),
            (FaultKind::Backlog, RGBColor(150, 80, 200)),
            (FaultKind::Restart, RGBColor(220, 50, 50)),
        ] {
            chart
                .draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())?
                .label(format!("window: {}", kind.describe()))
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 20, y + 5)], color.mix(0.3).filled())
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
        root.present()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use retryctl::Cause;
    use retryctl_testkit::schedule::NoiseRates;

    fn quiet(windows: Vec<Window>) -> Schedule {
        Schedule {
            seed: 1,
            windows,
            noise: NoiseRates {
                bad_gateway: 0.0,
                unavailable: 0.0,
                client_error: 0.0,
                slow: 0.0,
                slow_delay: Duration::ZERO,
            },
        }
    }

    fn sample(id: u64, ok: bool, attempts: u32, failed_first: bool, wasted: u32) -> Sample {
        Sample {
            id,
            sent: Duration::from_millis(id * 10),
            ok,
            latency: Duration::from_millis(5),
            attempts,
            rounds: 1,
            first_failure: failed_first.then_some(Cause::ConnectRefused),
            reason: (!ok).then_some("rounds_exhausted"),
            retried_client_error: false,
            wasted,
            queued: Duration::ZERO,
        }
    }

    #[test]
    fn wasted_attempts_per_absorbed_failure_and_absorbed_without_a_second_round() {
        // ids 0..10 sent in a reload window (0..100 ms)
        let schedule = quiet(vec![Window {
            kind: FaultKind::Reload,
            start: Duration::ZERO,
            end: Duration::from_millis(100),
            reset: false,
        }]);
        let baseline: Vec<_> = (0..100)
            .map(|id| sample(id, id >= 10, 1, id < 10, 0))
            .collect();
        // 8 served in round 1 after a failed attempt (re-attempted at the
        // gate), 2 failed after wasting 2 attempts each, 1 more wasted on a
        // request that was served
        let mut retrying: Vec<_> = (0..100)
            .map(|id| match id {
                // served after waiting at the gate, no attempt failed
                7 => sample(id, true, 1, false, 0),
                0..8 => sample(id, true, 2, true, 0),
                8..10 => sample(id, false, 3, true, 2),
                10 => sample(id, true, 2, false, 1),
                _ => sample(id, true, 1, false, 0),
            })
            .collect();
        for s in retrying.iter_mut().take(10) {
            s.queued = Duration::from_millis(200);
        }
        let r = DemoReport::new(&schedule, 100, Duration::from_secs(1), &baseline, &retrying);
        assert_eq!((r.baseline.failures, r.retrying.failures), (10, 2));
        assert_eq!(r.baseline.any_attempt_failed, 10);
        assert_eq!(r.retrying.any_attempt_failed, 9);
        assert_eq!(
            (r.baseline.wasted_attempts, r.retrying.wasted_attempts),
            (0, 5)
        );
        assert_eq!(r.wasted_per_absorbed, Some(5.0 / 8.0));
        let reload = r
            .faults
            .iter()
            .find(|f| f.kind == FaultKind::Reload)
            .unwrap();
        assert_eq!(
            (reload.hit, reload.absorbed, reload.retrying_failed),
            (10, 8, 2)
        );
        assert_eq!(r.retrying.queued_requests, 10);
        assert!(
            (r.retrying.queued_p99_ms - 200.0).abs() < 1.0,
            "{}",
            r.retrying.queued_p99_ms
        );
        assert_eq!(r.baseline.queued_p99_ms, 0.0);

        let table = r.table();
        for line in [
            "requests with a failed attempt                        10             9",
            "wasted attempts (failed retries + probes)              0             5",
            "wasted per absorbed failure                            -          0.62",
            "waited at the gate (p99)                               -      200.1 ms",
            "client errors retried (must be 0)                      -             0",
        ] {
            assert!(table.contains(line), "{line:?} in\n{table}");
        }
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["retrying"]["wasted_attempts"], 5);
        assert_eq!(json["wasted_per_absorbed"], 0.625);
        assert_eq!(json["retrying"]["any_attempt_failed"], 9);
        assert_eq!(json["retrying"]["queued_requests"], 10);
        assert!(json.get("reloads").is_none());

        // nothing absorbed: "-" and null
        let r = DemoReport::new(&schedule, 100, Duration::from_secs(1), &baseline, &baseline);
        assert_eq!(r.wasted_per_absorbed, None);
        assert!(
            r.table()
                .contains("wasted per absorbed failure                            -             -")
        );
        assert!(serde_json::to_value(&r).unwrap()["wasted_per_absorbed"].is_null());
    }

    #[test]
    fn quantiles_count_zero_waits_as_zero() {
        let ms = Duration::from_millis;
        let waits = |n_zero: usize, v: Duration| {
            std::iter::repeat_n(Duration::ZERO, n_zero).chain(std::iter::repeat_n(v, 100 - n_zero))
        };
        assert_eq!(quantile_ms(waits(100, ms(1)), 0.99), 0.0);
        assert_eq!(quantile_ms(waits(99, ms(300)), 0.99), 0.0);
        assert!((quantile_ms(waits(98, ms(300)), 0.99) - 300.0).abs() < 1.0);
        assert!((quantile_ms(waits(0, ms(300)), 0.5) - 300.0).abs() < 1.0);
        assert_eq!(quantile_ms(std::iter::empty(), 0.99), 0.0);
    }
}
