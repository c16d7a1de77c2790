//! `[budget]`: how many retries the pool may spend ([`BudgetPolicy`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::PolicyError;
use super::validate::{check_duration, check_fraction};

/// Retry budget: retries allowed = `ratio` x requests + `min_per_second` x
/// `window`, counted over a sliding `window`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetPolicy {
    /// `false` removes the budget (retries limited by rounds only).
    pub enabled: bool,
    /// Retries allowed per request over the window (0.0..=1.0).
    pub ratio: f64,
    /// Retries always allowed per second, whatever the traffic.
    pub min_per_second: u32,
    /// The sliding window (1s..=300s).
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for BudgetPolicy {
    fn default() -> Self {
        BudgetPolicy {
            enabled: true,
            ratio: 0.2,
            min_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}

impl BudgetPolicy {
    /// Checks the ratio, the floor and the window.
    pub(super) fn validate(&self) -> Result<(), PolicyError> {
        check_fraction("budget.ratio", self.ratio)?;
        if self.min_per_second > 1_000_000 {
            return Err(PolicyError::field(
                "budget.min_per_second",
                self.min_per_second,
                "an integer within 0..=1000000",
            ));
        }
        check_duration(
            "budget.window",
            self.window,
            Duration::from_secs(1),
            Duration::from_secs(300),
        )?;
        Ok(())
    }
}
