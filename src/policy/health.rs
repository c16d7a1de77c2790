//! `[health]`: when a provider is demoted and how it comes back
//! ([`HealthPolicy`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::PolicyError;
use super::validate::check_duration;

/// Demotion and recovery of providers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthPolicy {
    /// Consecutive failed *requests* (not attempts) that demote a provider.
    pub demote_after: u32,
    /// Time before a demoted provider gets its first probe.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// The cool-down doubles after each failed probe, up to this.
    #[serde(with = "humantime_serde")]
    pub max_cooldown: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            demote_after: 10,
            cooldown: Duration::from_secs(30),
            max_cooldown: Duration::from_secs(300),
        }
    }
}

impl HealthPolicy {
    /// Checks the threshold and the cool-downs.
    pub(super) fn validate(&self) -> Result<(), PolicyError> {
        if !(1..=1_000_000).contains(&self.demote_after) {
            return Err(PolicyError::field(
                "health.demote_after",
                self.demote_after,
                "an integer within 1..=1000000",
            ));
        }
        check_duration(
            "health.cooldown",
            self.cooldown,
            Duration::from_millis(1),
            Duration::from_secs(86_400),
        )?;
        check_duration(
            "health.max_cooldown",
            self.max_cooldown,
            self.cooldown,
            Duration::from_secs(86_400),
        )
        .map_err(|e| PolicyError {
            allowed: format!("{} and at least `health.cooldown`", e.allowed),
            ..e
        })?;
        Ok(())
    }
}
