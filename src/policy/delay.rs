//! [`RetryDelay`]: the wait before the first retry round, fixed or learned.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The wait before the first retry round of a transient failure.
///
/// In TOML, a duration (`"500ms"`) or `"auto"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryDelay {
    /// The same wait for every provider.
    Fixed(Duration),
    /// Per provider, the `adaptive.delay_auto_quantile` of its recent times
    /// to recovery (from a transient failure to the provider's next
    /// success), within `adaptive.delay_auto_min..=delay_auto_max`; with too
    /// few samples, `adaptive.delay_auto_fallback`. A wait shorter than the
    /// failure retries into it; a longer one makes the client wait for
    /// nothing: the time the provider actually took to recover is the
    /// wait that would have worked.
    Auto,
}

impl From<Duration> for RetryDelay {
    fn from(d: Duration) -> Self {
        RetryDelay::Fixed(d)
    }
}

impl fmt::Display for RetryDelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetryDelay::Fixed(d) => write!(f, "{}", humantime::format_duration(*d)),
            RetryDelay::Auto => f.write_str("auto"),
        }
    }
}

impl Serialize for RetryDelay {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RetryDelay {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RetryDelay;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"500ms\", or \"auto\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RetryDelay, E> {
                if v == "auto" {
                    return Ok(RetryDelay::Auto);
                }
                humantime::parse_duration(v)
                    .map(RetryDelay::Fixed)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::RetryDelay;
    use crate::policy::Policy;

    #[test]
    fn delay_is_a_duration_or_auto() {
        let p = Policy::from_toml("delay = \"auto\"\n").unwrap();
        assert_eq!(p.delay, RetryDelay::Auto);
        assert_eq!(p.base_delay(), p.adaptive.delay_auto_fallback);
        assert_eq!(Policy::from_toml(&p.to_toml()).unwrap(), p);
        assert!(p.to_toml().contains("delay = \"auto\""), "{}", p.to_toml());
        let o = Policy::from_toml("[models.x]\ndelay = \"auto\"\n").unwrap();
        assert_eq!(o.resolve("x").delay, RetryDelay::Auto);
        // anything else is refused with the field, the line and what is allowed
        let e = Policy::from_toml("max_rounds = 2\ndelay = \"sometimes\"\n").unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.location),
            ("delay", Some((2, 9))),
            "{e}"
        );
        assert!(e.allowed.contains("\"auto\""), "{e}");
        let e = Policy::from_toml("delay = \"2m\"\n").unwrap_err();
        assert_eq!(e.field, "delay");
        assert!(e.allowed.contains("\"auto\""), "{e}");
        let e = Policy::from_toml("delay = 5\n").unwrap_err();
        assert_eq!(e.field, "delay");
        let e = Policy::from_toml("[models.x]\ndelay = \"Auto\"\n").unwrap_err();
        assert_eq!(e.field, "models.\"x\".delay", "{e}");
        let e = Policy::from_toml("[adaptive]\ndelay_auto_min = \"2s\"\ndelay_auto_max = \"1s\"\n")
            .unwrap_err();
        assert_eq!(e.field, "adaptive.delay_auto_max");
        assert_eq!(e.location, Some((3, 18)));
    }
}
