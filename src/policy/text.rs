//! A policy as TOML text: parsing (with the line, column and field of any
//! error) and rendering.

use super::{Policy, PolicyError};
use crate::toml_error::{display_path, line_col, path_at};

impl Policy {
    /// Parses and validates a TOML policy. Errors carry the line and column,
    /// and the dotted path of the field whenever the text parsed as TOML.
    pub fn from_toml(text: &str) -> Result<Policy, PolicyError> {
        let policy: Policy = toml::from_str(text).map_err(|e| {
            let offset = e.span().map(|s| s.start);
            PolicyError {
                field: offset
                    .and_then(|o| path_at(text, o))
                    .map(|path| display_path(&path))
                    .unwrap_or_default(),
                value: String::new(),
                allowed: e.message().trim().to_owned(),
                location: offset.map(|o| line_col(text, o)),
            }
        })?;
        policy.check().map_err(|e| e.located(text))?;
        Ok(policy)
    }

    /// Parses and validates a policy file's raw bytes: like
    /// [`Policy::from_toml`], but bytes that are not UTF-8 (a binary file,
    /// a Latin-1 editor) are an error naming the line and column of the
    /// first invalid byte. A leading UTF-8 byte order mark is skipped.
    pub fn from_bytes(bytes: &[u8]) -> Result<Policy, PolicyError> {
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        match std::str::from_utf8(bytes) {
            Ok(text) => Policy::from_toml(text),
            Err(e) => {
                let at = e.valid_up_to();
                let valid = bytes
                    .get(..at)
                    .and_then(|b| std::str::from_utf8(b).ok())
                    .unwrap_or("");
                let byte = bytes.get(at).copied().unwrap_or(0);
                Err(PolicyError {
                    field: String::new(),
                    value: String::new(),
                    allowed: format!(
                        "not UTF-8 text (invalid byte 0x{byte:02x} at offset {at}): a policy file is TOML"
                    ),
                    location: Some(line_col(valid, valid.len())),
                })
            }
        }
    }

    /// Renders the policy as TOML with every field (defaults filled in).
    /// Model overrides are rendered as written: only the fields they set.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render policy: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::policy::{Policy, RetryDelay};

    #[test]
    fn empty_text_is_the_default_policy() {
        assert_eq!(Policy::from_toml("").unwrap(), Policy::default());
        Policy::default().validate().unwrap();
    }

    #[test]
    fn rendered_defaults_parse_back_identically() {
        let text = Policy::default().to_toml();
        assert_eq!(Policy::from_toml(&text).unwrap(), Policy::default());
    }

    #[test]
    fn durations_are_humane() {
        let p = Policy::from_toml("delay = \"250ms\"\n[health]\ncooldown = \"1m\"\n").unwrap();
        assert_eq!(p.delay, RetryDelay::Fixed(Duration::from_millis(250)));
        assert_eq!(p.health.cooldown, Duration::from_secs(60));
    }

    #[test]
    fn parser_errors_inside_arrays_name_the_element() {
        let e = Policy::from_toml("[classify]\nretryable_statuses = [500, \"x\"]\n").unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.location),
            ("classify.retryable_statuses[1]", Some((2, 28))),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let e = Policy::from_toml("delay = \"1s\"\nmax_round = 3\n").unwrap_err();
        assert_eq!(e.location.map(|l| l.0), Some(2), "{e}");
        assert!(e.to_string().contains("max_round"), "{e}");
        assert!(
            e.to_string().contains("max_rounds"),
            "lists allowed keys: {e}"
        );
    }

    #[test]
    fn wrong_type_and_negative_values_are_refused() {
        let e = Policy::from_toml("max_rounds = \"two\"").unwrap_err();
        assert_eq!(e.location.map(|l| l.0), Some(1));
        let e = Policy::from_toml("max_rounds = -1").unwrap_err();
        assert_eq!(e.location.map(|l| l.0), Some(1));
        let e = Policy::from_toml("delay = \"-5ms\"").unwrap_err();
        assert_eq!(e.location.map(|l| l.0), Some(1));
    }

    #[test]
    fn bytes_that_are_not_text_name_the_line() {
        let e = Policy::from_bytes(b"max_rounds = 2\n\xff\xfe\x00").unwrap_err();
        assert_eq!(e.location, Some((2, 1)));
        assert!(e.allowed.contains("not UTF-8"), "{e}");
        let e = Policy::from_bytes(b"max_rounds = 2\n\x00\x01\x02").unwrap_err();
        assert_eq!(e.location.map(|l| l.0), Some(2), "{e}");
        assert_eq!(Policy::from_bytes(b"").unwrap(), Policy::default());
        let bom = Policy::from_bytes(b"\xEF\xBB\xBFmax_rounds = 3\n").unwrap();
        assert_eq!(bom.max_rounds, 3);
    }
}
