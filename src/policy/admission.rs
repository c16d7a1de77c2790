//! `[admission]`: the per-provider admission gate ([`AdmissionPolicy`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::PolicyError;
use super::validate::check_duration;

/// The per-provider admission gate (`[admission]`).
///
/// Every attempt passes its provider's gate, first attempts included. The
/// gate is driven by *connection-level* outcomes only (the upstream was
/// not reached or refused the work: connect refused, connect timeout, a
/// request handed back unsent): such a
/// failure shrinks the provider's in-flight limit to `decrease` x the
/// attempts in flight (at least `min_limit`); successes grow it back (slow
/// start, then additive) until it no longer limits and the gate opens.
/// Latency never shrinks it. A failure at the floor marks the provider
/// down: one attempt at a time probes it (after `probe_delay`, doubling up
/// to `probe_max_delay`) while the other requests wait, in order, for the
/// probe's outcome. A request waits at most `max_wait` in total.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionPolicy {
    /// `true` (the default) puts the gate in front of every attempt;
    /// `false` removes it: attempts are never held, and connection-level
    /// failures are retried in rounds like any other.
    pub enabled: bool,
    /// The longest a request waits at gates in total before it fails with
    /// `admission_timeout` (0s: never wait, fail at once).
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Requests that may wait at one provider's gate; more fail at once
    /// with `admission_queue_full` (linkerd's queue capacity).
    pub max_waiting: u32,
    /// On a connection-level failure, the limit becomes this fraction of
    /// the attempts in flight (0.1..=0.9).
    pub decrease: f64,
    /// The floor of the limit (1..=10000).
    pub min_limit: u32,
    /// The wait before the first probe of a down provider...
    #[serde(with = "humantime_serde")]
    pub probe_delay: Duration,
    /// ...doubling after each failed probe, up to this.
    #[serde(with = "humantime_serde")]
    pub probe_max_delay: Duration,
    /// After a successful probe, reopen with slow start (the limit starts
    /// at `min_limit` and doubles per round trip) rather than at once.
    pub slow_start: bool,
}

impl Default for AdmissionPolicy {
    fn default() -> Self {
        AdmissionPolicy {
            enabled: true,
            max_wait: Duration::from_secs(10),
            max_waiting: 1024,
            decrease: 0.5,
            min_limit: 1,
            probe_delay: Duration::from_millis(100),
            probe_max_delay: Duration::from_secs(1),
            slow_start: true,
        }
    }
}

impl AdmissionPolicy {
    /// Checks the wait, the queue, the limits and the probe delays.
    pub(super) fn validate(&self) -> Result<(), PolicyError> {
        check_duration(
            "admission.max_wait",
            self.max_wait,
            Duration::ZERO,
            Duration::from_secs(600),
        )
        .map_err(|e| PolicyError {
            allowed: format!("{} (\"0s\": never wait, fail at once)", e.allowed),
            ..e
        })?;
        if !(1..=1_000_000).contains(&self.max_waiting) {
            return Err(PolicyError::field(
                "admission.max_waiting",
                self.max_waiting,
                "an integer within 1..=1000000",
            ));
        }
        if !(self.decrease.is_finite() && (0.1..=0.9).contains(&self.decrease)) {
            return Err(PolicyError::field(
                "admission.decrease",
                format!("{:?}", self.decrease),
                "a number within 0.1..=0.9",
            ));
        }
        if !(1..=10_000).contains(&self.min_limit) {
            return Err(PolicyError::field(
                "admission.min_limit",
                self.min_limit,
                "an integer within 1..=10000",
            ));
        }
        check_duration(
            "admission.probe_delay",
            self.probe_delay,
            Duration::from_millis(1),
            Duration::from_secs(60),
        )?;
        check_duration(
            "admission.probe_max_delay",
            self.probe_max_delay,
            self.probe_delay,
            Duration::from_secs(300),
        )
        .map_err(|e| PolicyError {
            allowed: format!("{} and at least `admission.probe_delay`", e.allowed),
            ..e
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::AdmissionPolicy;
    use crate::policy::Policy;

    #[test]
    fn admission_defaults() {
        let a = AdmissionPolicy::default();
        assert!(a.enabled && a.slow_start);
        assert_eq!(a.max_wait, Duration::from_secs(10));
        assert_eq!((a.max_waiting, a.decrease, a.min_limit), (1024, 0.5, 1));
        assert_eq!(a.probe_delay, Duration::from_millis(100));
        assert_eq!(a.probe_max_delay, Duration::from_secs(1));
        assert_eq!(Policy::default().admission, a);
        assert_eq!(
            Policy::from_toml("[admission]\n").unwrap(),
            Policy::default()
        );
        let text = Policy::default().to_toml();
        assert!(
            text.contains("[admission]\nenabled = true\nmax_wait = \"10s\"\n"),
            "{text}"
        );
    }

    #[test]
    fn an_admission_table_parses() {
        let p = Policy::from_toml(
            "[admission]\n\
             enabled = false\n\
             max_wait = \"0s\"\n\
             max_waiting = 16\n\
             decrease = 0.7\n\
             min_limit = 4\n\
             probe_delay = \"250ms\"\n\
             probe_max_delay = \"250ms\"\n\
             slow_start = false\n",
        )
        .unwrap();
        assert_eq!(
            p.admission,
            AdmissionPolicy {
                enabled: false,
                max_wait: Duration::ZERO,
                max_waiting: 16,
                decrease: 0.7,
                min_limit: 4,
                probe_delay: Duration::from_millis(250),
                probe_max_delay: Duration::from_millis(250),
                slow_start: false,
            }
        );
        assert_eq!(Policy::from_toml(&p.to_toml()).unwrap(), p);
        // the bounds are allowed
        for text in [
            "max_wait = \"10m\"",
            "max_waiting = 1",
            "max_waiting = 1000000",
            "decrease = 0.1",
            "decrease = 0.9",
            "min_limit = 10000",
            "probe_delay = \"1ms\"",
            "probe_delay = \"60s\"\nprobe_max_delay = \"60s\"",
            "probe_max_delay = \"5m\"",
        ] {
            Policy::from_toml(&format!("[admission]\n{text}\n"))
                .unwrap_or_else(|e| panic!("{text}: {e}"));
        }
        let e = Policy::from_toml("[admission]\nmax_wiat = \"1s\"\n").unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.location),
            ("admission.max_wiat", Some((2, 1)))
        );
    }

    #[test]
    fn admission_values_out_of_range_name_the_field_value_range_and_line() {
        // (key, value written, value reported, what is allowed)
        let cases = [
            (
                "max_wait",
                "\"11m\"",
                "\"11m\"",
                "a duration within \"0s\"..=\"10m\"",
            ),
            ("max_waiting", "0", "0", "an integer within 1..=1000000"),
            (
                "max_waiting",
                "1000001",
                "1000001",
                "an integer within 1..=1000000",
            ),
            ("decrease", "0.05", "0.05", "a number within 0.1..=0.9"),
            ("decrease", "1.0", "1.0", "a number within 0.1..=0.9"),
            ("decrease", "nan", "NaN", "a number within 0.1..=0.9"),
            ("min_limit", "0", "0", "an integer within 1..=10000"),
            ("min_limit", "10001", "10001", "an integer within 1..=10000"),
            (
                "probe_delay",
                "\"0s\"",
                "\"0s\"",
                "a duration within \"1ms\"..=\"1m\"",
            ),
            (
                "probe_delay",
                "\"2m\"",
                "\"2m\"",
                "a duration within \"1ms\"..=\"1m\"",
            ),
            (
                "probe_max_delay",
                "\"6m\"",
                "\"6m\"",
                "a duration within \"100ms\"..=\"5m\" and at least `admission.probe_delay`",
            ),
        ];
        for (key, written, value, allowed) in cases {
            let text = format!("max_rounds = 2\n[admission]\n{key} = {written}\n");
            let e = Policy::from_toml(&text).unwrap_err();
            let field = format!("admission.{key}");
            assert_eq!(e.field, field, "{text}: {e}");
            assert_eq!(e.value, value, "{text}: {e}");
            assert!(e.allowed.starts_with(allowed), "{text}: {e}");
            assert_eq!(e.location, Some((3, key.len() + 4)), "{text}: {e}");
            assert!(
                e.to_string().starts_with(&format!(
                    "line 3, column {}: `{field}` = {value} is invalid: {allowed}",
                    key.len() + 4
                )),
                "{e}"
            );
        }
        let e = Policy::from_toml("[admission]\nmax_wait = \"1h\"\n").unwrap_err();
        assert!(
            e.allowed.contains("\"0s\": never wait, fail at once"),
            "{e}"
        );
        // built in code, not parsed: the same field, no location
        let mut p = Policy::default();
        p.admission.decrease = f64::INFINITY;
        let e = p.validate().unwrap_err();
        assert_eq!((e.field.as_str(), e.location), ("admission.decrease", None));
    }

    #[test]
    fn admission_probe_max_delay_is_at_least_probe_delay() {
        let e =
            Policy::from_toml("[admission]\nprobe_delay = \"2s\"\nprobe_max_delay = \"500ms\"\n")
                .unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.value.as_str(), e.location),
            ("admission.probe_max_delay", "\"500ms\"", Some((3, 19)))
        );
        assert!(e.allowed.contains("\"2s\"..=\"5m\""), "{e}");
        assert!(
            e.allowed.contains("at least `admission.probe_delay`"),
            "{e}"
        );
        // a longer probe_delay alone is refused against the inherited maximum
        let e = Policy::from_toml("[admission]\nprobe_delay = \"2s\"\n").unwrap_err();
        assert_eq!(e.field, "admission.probe_max_delay");
        // equal is allowed
        let p = Policy::from_toml("[admission]\nprobe_delay = \"2s\"\nprobe_max_delay = \"2s\"\n")
            .unwrap();
        assert_eq!(p.admission.probe_max_delay, p.admission.probe_delay);
    }

    #[test]
    fn admission_model_override_applies_to_that_model_only() {
        let p = Policy::from_toml("[models.\"m\".admission]\nmax_wait = \"2s\"\n").unwrap();
        let m = p.resolve("m");
        assert_eq!(m.admission.max_wait, Duration::from_secs(2));
        assert_eq!(
            m.admission,
            AdmissionPolicy {
                max_wait: Duration::from_secs(2),
                ..AdmissionPolicy::default()
            },
            "the rest is inherited"
        );
        assert_eq!(p.admission, AdmissionPolicy::default());
        assert_eq!(p.resolve("other").admission, AdmissionPolicy::default());
        assert_eq!(Policy::from_toml(&p.to_toml()).unwrap(), p);
        assert!(
            p.to_toml()
                .contains("[models.m.admission]\nmax_wait = \"2s\"\n"),
            "{}",
            p.to_toml()
        );
        // errors name the full path and where the value is written
        let e = Policy::from_toml("[models.\"x\".admission]\nmax_wait = \"1h\"\n").unwrap_err();
        assert_eq!(e.field, "models.\"x\".admission.max_wait");
        assert_eq!((e.value.as_str(), e.location), ("\"1h\"", Some((2, 12))));
        let e = Policy::from_toml("[models.x.admission]\ndecrease = 0.95\n").unwrap_err();
        assert_eq!(e.field, "models.\"x\".admission.decrease");
        assert_eq!(e.location, Some((2, 12)));
        // valid alone, invalid with what it inherits: points at the override
        let e = Policy::from_toml("jitter = 0.1\n[models.x.admission]\nprobe_delay = \"5s\"\n")
            .unwrap_err();
        assert_eq!(e.field, "models.\"x\".admission.probe_max_delay");
        assert_eq!(e.location, Some((2, 1)));
        assert!(e.allowed.contains("inherited"), "{e}");
    }

    #[test]
    fn a_shadow_admission_table_is_accepted_and_validated() {
        let p = Policy::from_toml("[shadow.admission]\nmax_wait = \"0s\"\nslow_start = false\n")
            .unwrap();
        let c = p.shadow_candidate().unwrap();
        assert_eq!(
            (c.admission.max_wait, c.admission.slow_start),
            (Duration::ZERO, false)
        );
        assert_eq!(c.admission.max_waiting, 1024, "inherited");
        assert_eq!(p.admission, AdmissionPolicy::default(), "live unchanged");
        assert_eq!(Policy::from_toml(&p.to_toml()).unwrap(), p);
        let e = Policy::from_toml("[shadow.admission]\ndecrease = 2.0\n").unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.value.as_str(), e.location),
            ("shadow.admission.decrease", "2.0", Some((2, 12)))
        );
        assert!(e.allowed.contains("0.1..=0.9"), "{e}");
        let e = Policy::from_toml("[shadow.admission]\nmax_waiting = 0\n").unwrap_err();
        assert_eq!(e.field, "shadow.admission.max_waiting");
        let e = Policy::from_toml("[shadow.admission]\nmin_limitt = 2\n").unwrap_err();
        assert_eq!(e.field, "shadow.admission.min_limitt");
        // with a model's override it conflicts with
        let e = Policy::from_toml(
            "[shadow.admission]\nprobe_max_delay = \"2s\"\n[models.x.admission]\nprobe_delay = \"3s\"\nprobe_max_delay = \"3s\"\n",
        )
        .unwrap_err();
        assert_eq!(e.field, "shadow.admission.probe_max_delay");
        assert!(e.allowed.contains("model \"x\""), "{e}");
    }
}
