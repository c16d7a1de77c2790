//! `[timeouts]`: per-attempt and per-request time limits ([`Timeouts`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::PolicyError;
use super::validate::{check_duration, secs};

/// Time limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// TCP connect limit for HTTP clients built by
    /// `upstream::client_builder` (reqwest) or `upstream::http_connector`
    /// (hyper-util). It must be set below `attempt`: without it, a stalled
    /// connect is indistinguishable from a slow response and is not
    /// retried.
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// Limit for one attempt: until the operation returns (response headers).
    #[serde(with = "humantime_serde")]
    pub attempt: Duration,
    /// Default deadline of a whole request, all rounds and waits included.
    #[serde(with = "humantime_serde")]
    pub request: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            attempt: Duration::from_secs(90),
            request: Duration::from_secs(600),
        }
    }
}

impl Timeouts {
    /// Checks each limit, and that `connect` is below `attempt`.
    pub(super) fn validate(&self) -> Result<(), PolicyError> {
        check_duration(
            "timeouts.connect",
            self.connect,
            Duration::from_millis(1),
            Duration::from_secs(300),
        )?;
        check_duration(
            "timeouts.attempt",
            self.attempt,
            Duration::from_millis(1),
            Duration::from_secs(86_400),
        )?;
        check_duration(
            "timeouts.request",
            self.request,
            Duration::from_millis(1),
            Duration::from_secs(86_400),
        )?;
        if self.connect >= self.attempt {
            return Err(PolicyError::field(
                "timeouts.connect",
                secs(self.connect),
                format!(
                    "less than timeouts.attempt ({}), or a stalled connect looks like a slow response",
                    secs(self.attempt)
                ),
            ));
        }
        Ok(())
    }
}
