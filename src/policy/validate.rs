//! Validation of a whole policy: the top-level values, each table (whose
//! ranges live with the table), then every model's resolved policy and the
//! shadow candidate on top of each.

use std::time::Duration;

use super::error::Invalid;
use super::{MAX_MODEL_OVERRIDES, MAX_ROUNDS_LIMIT, Policy, PolicyError, RetryDelay};

/// A duration as the policy file writes it, quoted: `"1m 30s"`.
pub(super) fn secs(d: Duration) -> String {
    format!("\"{}\"", humantime::format_duration(d))
}

impl Policy {
    /// Checks every value against its allowed range: the top-level values
    /// first, then each model's *resolved* policy (an override is valid
    /// when the policy it produces is). A model error names the full path,
    /// e.g. `models."openai/gpt-oss-120b".budget.ratio`.
    pub fn validate(&self) -> Result<(), PolicyError> {
        self.check().map_err(Invalid::into_error)
    }

    /// [`Policy::validate`], keeping the scope of the error apart from its
    /// field, so that a parsed file can locate it.
    pub(super) fn check(&self) -> Result<(), Invalid<'_>> {
        self.validate_values().map_err(|error| Invalid {
            scope: Vec::new(),
            error,
        })?;
        if self.models.len() > MAX_MODEL_OVERRIDES {
            return Err(Invalid {
                scope: Vec::new(),
                error: PolicyError::field(
                    "models",
                    format!("{} models", self.models.len()),
                    format!("at most {MAX_MODEL_OVERRIDES} model overrides"),
                ),
            });
        }
        let base = self.without_models();
        // The shadow candidate must be valid on top of every policy it is
        // compared with: the top level and each model's.
        let shadow_of = |resolved: &Policy, model: Option<&str>| -> Result<(), Invalid<'static>> {
            let Some(candidate) = resolved.shadow_candidate() else {
                return Ok(());
            };
            candidate.validate_values().map_err(|mut error| {
                if let Some(model) = model {
                    error
                        .allowed
                        .push_str(&format!(" (with the override of model {model:?})"));
                }
                Invalid {
                    scope: vec!["shadow"],
                    error,
                }
            })
        };
        shadow_of(&base, None)?;
        for (name, o) in &self.models {
            let model = vec!["models", name.as_str()];
            if name.trim().is_empty() || name.len() > 256 {
                return Err(Invalid {
                    scope: model,
                    error: PolicyError::field(
                        "",
                        format!("{name:?}"),
                        "a non-blank model name of at most 256 bytes",
                    ),
                });
            }
            let mut resolved = base.clone();
            o.apply_to(&mut resolved);
            resolved.validate_values().map_err(|error| Invalid {
                scope: model,
                error,
            })?;
            shadow_of(&resolved, Some(name))?;
        }
        Ok(())
    }

    /// Checks the top-level values and each table (not the model overrides).
    fn validate_values(&self) -> Result<(), PolicyError> {
        if !(1..=MAX_ROUNDS_LIMIT).contains(&self.max_rounds) {
            return Err(PolicyError::field(
                "max_rounds",
                self.max_rounds,
                format!("an integer within 1..={MAX_ROUNDS_LIMIT} (1 disables retries)"),
            ));
        }
        if let RetryDelay::Fixed(delay) = self.delay {
            check_duration("delay", delay, Duration::ZERO, Duration::from_secs(60)).map_err(
                |e| PolicyError {
                    allowed: format!("{}, or \"auto\"", e.allowed),
                    ..e
                },
            )?;
        }
        if !(self.backoff.is_finite() && (1.0..=10.0).contains(&self.backoff)) {
            return Err(PolicyError::field(
                "backoff",
                format!("{:?}", self.backoff),
                "a number within 1.0..=10.0",
            ));
        }
        check_duration(
            "max_delay",
            self.max_delay,
            self.base_delay(),
            Duration::from_secs(300),
        )
        .map_err(|e| PolicyError {
            allowed: format!(
                "{} and at least `delay` (with \"auto\": `adaptive.delay_auto_fallback`)",
                e.allowed
            ),
            ..e
        })?;
        check_fraction("jitter", self.jitter)?;
        check_duration(
            "rate_limited_delay",
            self.rate_limited_delay,
            Duration::ZERO,
            Duration::from_secs(300),
        )?;
        check_duration(
            "max_retry_after",
            self.max_retry_after,
            Duration::ZERO,
            Duration::from_secs(3600),
        )?;
        self.classify.validate()?;
        self.timeouts.validate()?;
        self.budget.validate()?;
        self.health.validate()?;
        self.adaptive.validate()?;
        self.admission.validate()?;
        Ok(())
    }
}

/// `value` within `min..=max`, or an error naming `field`.
pub(super) fn check_duration(
    field: &str,
    value: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), PolicyError> {
    if value < min || value > max {
        return Err(PolicyError::field(
            field,
            secs(value),
            format!("a duration within {}..={}", secs(min), secs(max)),
        ));
    }
    Ok(())
}

/// A finite `value` within 0.0..=1.0, or an error naming `field`.
pub(super) fn check_fraction(field: &str, value: f64) -> Result<(), PolicyError> {
    if !(value.is_finite() && (0.0..=1.0).contains(&value)) {
        return Err(PolicyError::field(
            field,
            format!("{value:?}"),
            "a number within 0.0..=1.0",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::policy::{Policy, PolicyOverride};

    #[test]
    fn out_of_range_names_field_value_allowed_and_line() {
        let e = Policy::from_toml("jitter = 0.1\n\n[budget]\nratio = 1.5\n").unwrap_err();
        assert_eq!(e.field, "budget.ratio");
        assert_eq!(e.value, "1.5");
        assert!(e.allowed.contains("0.0..=1.0"));
        assert_eq!(e.location, Some((4, 9)));
        let e = Policy::from_toml("max_rounds = 1000").unwrap_err();
        assert_eq!(e.field, "max_rounds");
        assert_eq!(e.location, Some((1, 14)));
        assert!(e.to_string().contains("1..=10"), "{e}");
    }

    #[test]
    fn cross_field_rules_hold() {
        let e = Policy::from_toml("[timeouts]\nconnect = \"10s\"\nattempt = \"5s\"\n").unwrap_err();
        assert_eq!(e.field, "timeouts.connect");
        assert_eq!(e.location, Some((2, 11)));
        let e =
            Policy::from_toml("[health]\ncooldown = \"10m\"\nmax_cooldown = \"1m\"\n").unwrap_err();
        assert_eq!(e.field, "health.max_cooldown");
        let e = Policy::from_toml("[classify]\nretryable_statuses = [429]\n").unwrap_err();
        assert_eq!(e.field, "classify.retryable_statuses");
        let e = Policy::from_toml("[classify]\ntransient_keywords = [\"  \"]\n").unwrap_err();
        assert_eq!(e.field, "classify.transient_keywords");
    }

    #[test]
    fn resolved_model_policy_is_what_is_validated() {
        // The override sets `attempt` below the inherited `connect`: the
        // error names the inherited field and points at the override.
        let e =
            Policy::from_toml("jitter = 0.1\n[models.x.timeouts]\nattempt = \"1s\"\n").unwrap_err();
        assert_eq!(e.field, "models.\"x\".timeouts.connect");
        assert_eq!(e.location, Some((2, 1)));
        assert!(e.allowed.contains("inherited"), "{e}");
        // Valid on its own, valid with the base: accepted.
        Policy::from_toml("[timeouts]\nconnect = \"1s\"\n[models.x.timeouts]\nattempt = \"2s\"\n")
            .unwrap();
        let e = Policy::from_toml("[models.\" \"]\njitter = 0.1\n").unwrap_err();
        assert_eq!(e.field, "models.\" \"");
        // Built in code, not parsed: the same path, no location.
        let mut p = Policy::default();
        let mut o = PolicyOverride::default();
        o.health.demote_after = Some(0);
        p.models.insert("openai/gpt-oss-120b".into(), o);
        let e = p.validate().unwrap_err();
        assert_eq!(
            e.field,
            "models.\"openai/gpt-oss-120b\".health.demote_after"
        );
        assert_eq!(e.location, None);
    }
}
