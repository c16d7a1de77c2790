//! The demo's verdict: a table, JSON, and an SVG chart.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::runner::Sample;
use super::schedule::{FaultKind, Schedule, Window};

/// The production reference: baseline failures per day.
pub const PRODUCTION_FAILURES_PER_DAY: f64 = 9_500.0;

/// Width of the timeline bins.
const BIN: Duration = Duration::from_millis(500);

/// One pool's results.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SideReport {
    /// Failed requests.
    pub failures: u64,
    /// Requests whose first round failed.
    pub first_round_failures: u64,
    /// Upstream attempts.
    pub attempts: u64,
    /// Extra attempts over one per request, in %.
    pub amplification_pct: f64,
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
    /// Requests it hit that the retries turned into successes.
    pub absorbed: u64,
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
    /// The fault windows.
    pub windows: Vec<Window>,
    /// Failures over time.
    pub timeline: Vec<TimelinePoint>,
}

/// The `q` quantile of the samples' latency, in ms.
pub(crate) fn percentile(samples: &[Sample], q: f64) -> f64 {
    let mut h = match Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3) {
        Ok(h) => h,
        Err(_) => return 0.0,
    };
    for s in samples {
        h.saturating_record((s.latency.as_micros() as u64).max(1));
    }
    if h.is_empty() {
        0.0
    } else {
        h.value_at_quantile(q) as f64 / 1000.0
    }
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
        first_round_failures: samples.iter().filter(|s| s.first_round_failed()).count() as u64,
        attempts,
        amplification_pct: if n == 0 {
            0.0
        } else {
            (attempts as f64 - n as f64) / n as f64 * 100.0
        },
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
        let reduction_pct = if b.failures == 0 {
            0.0
        } else {
            (b.failures as f64 - r.failures as f64) / b.failures as f64 * 100.0
        };
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
                    absorbed: retrying
                        .iter()
                        .filter(of)
                        .filter(|s| s.ok && s.rounds > 1)
                        .count() as u64,
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
        let _ = writeln!(t, "{:<34}{:>16}{:>16}", "", "baseline", "retryctl");
        let row = |t: &mut String, name: &str, a: String, b: String| {
            let _ = writeln!(t, "{name:<34}{a:>16}{b:>16}");
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
            "first-round failures",
            b.first_round_failures.to_string(),
            r.first_round_failures.to_string(),
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
            "failed: retry budget refused",
            "-".into(),
            r.budget_refused.to_string(),
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
            "\n{:<26}{:>8}{:>12}{:>12}{:>12}",
            "fault", "hit", "failed", "failed", "absorbed"
        );
        let _ = writeln!(
            t,
            "{:<26}{:>8}{:>12}{:>12}{:>12}",
            "", "", "baseline", "retryctl", ""
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
                "{:<26}{:>8}{:>12}{:>12}{:>12}",
                f.description, f.hit, f.baseline_failed, f.retrying_failed, absorbed
            );
        }
        let reasons: Vec<String> = r.reasons.iter().map(|(k, v)| format!("{k} {v}")).collect();
        if !reasons.is_empty() {
            let _ = writeln!(t, "\nretryctl failures by reason: {}", reasons.join(", "));
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
