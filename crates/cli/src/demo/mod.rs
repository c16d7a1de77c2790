//! `retryctl demo`: the retry layer doing its job on real faulty sockets.
//!
//! Two identical sets of faulty upstreams follow one seeded schedule
//! ([`retryctl_testkit::schedule`]): a listen backlog of 1 that accepts slowly, reload
//! windows that refuse or reset connections, a restart, and per-request
//! noise (502/503, some with Retry-After, genuine 400s, slow responses).
//! The same traffic goes through a pool without retries (the baseline, as
//! production was: one round, no admission gate) and a pool under the
//! policy ([`runner`]), which may follow a policy file live as the gateway
//! does; the [`report`] compares them: failures, failures per day at
//! production volume, amplification, wasted attempts, time at the gate,
//! latency, and which faults were absorbed.
//!
//! [`compare`] runs one scenario per adaptive option, and one for the
//! admission gate, the fixed policy against the option on the same faults
//! (`retryctl demo --compare`).

pub mod compare;
pub mod report;
pub mod runner;

use std::sync::Arc;

pub use report::DemoReport;
pub use retryctl_testkit::schedule::{FaultKind, Schedule};
pub use runner::{DemoConfig, DemoError, ReloadEvent, ReloadSummary};

/// Runs the demo on the schedule generated from its seed, and builds its
/// report.
pub async fn run(config: &DemoConfig) -> Result<DemoReport, DemoError> {
    run_schedule(config, Schedule::generate(config.seed, config.duration)).await
}

/// Runs the demo on a given schedule (e.g. one built by hand for a test).
pub async fn run_schedule(
    config: &DemoConfig,
    schedule: Schedule,
) -> Result<DemoReport, DemoError> {
    let schedule = Arc::new(schedule);
    let (baseline, retrying) = runner::run(config, schedule.clone()).await?;
    let mut report = DemoReport::new(
        &schedule,
        config.rps,
        config.duration,
        &baseline.samples,
        &retrying.samples,
    );
    report.reloads = retrying.reloads;
    Ok(report)
}
