//! The retry policy: what to retry, how long to wait, how much to spend.
//!
//! A [`Policy`] is plain data (serde, TOML-friendly) with production-tested
//! defaults. It is only ever put in force after [`Policy::validate`] has
//! accepted it, so the request path never meets an out-of-range value.
//!
//! # Why these defaults
//!
//! * `max_rounds = 2`, `delay = 500ms`: one more round after half a second
//!   absorbed almost all of ~9,500 daily "all providers failed" errors in the
//!   gateway this crate grew out of: refused connects on a listen backlog of
//!   1, nginx reloads and Docker bridge churn all last well under a second.
//! * `jitter = 0.2` (+/-20%, as gRPC): retries that arrive in the same burst
//!   as the failure they answer fail again; spreading them matters more than
//!   the count.
//! * `budget`: 20% of requests plus 10 retries/s over 10 s (Finagle, Linkerd,
//!   tower): without a budget a 4x retry amplification saturated backends
//!   during an outage.
//! * `health.demote_after = 10`, `cooldown = 30s` doubling to `5m`: Envoy's
//!   outlier ejection, but a demoted provider is moved to the back, never
//!   removed, because most models have a single provider.
//! * `timeouts`: connect 5 s, response headers 90 s, whole request 600 s.
//!   A completion that timed out after the upstream accepted it is not
//!   retried by default: retrying a 300 s generation doubles cost and
//!   latency. A connect timeout is always retried.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The largest `max_rounds` a policy may ask for.
pub const MAX_ROUNDS_LIMIT: u32 = 10;

/// Everything the pool needs to decide about retries.
///
/// Read from TOML with [`Policy::from_toml`]; every field has a default, so
/// an empty file is the default policy. Unknown keys are rejected.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// How many rounds over the providers a request may use, the first
    /// included: 1 disables retries, 2 is "one more round" (1..=10).
    pub max_rounds: u32,
    /// Wait before the first retry round of a transient failure.
    #[serde(with = "humantime_serde")]
    pub delay: Duration,
    /// Multiplier applied to the wait for each further round (>= 1.0).
    pub backoff: f64,
    /// Upper bound of the (pre-jitter) wait for transient failures.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Relative jitter: each wait is drawn uniformly from
    /// `wait * (1 - jitter) ..= wait * (1 + jitter)` (0.0..=1.0).
    pub jitter: f64,
    /// Wait before retrying a rate-limited (429) provider, when it did not
    /// say how long itself; grows with `backoff` like `delay`.
    #[serde(with = "humantime_serde")]
    pub rate_limited_delay: Duration,
    /// The longest Retry-After honoured. A provider asking for more is not
    /// retried within this request (waiting that long helps nobody).
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
    /// How failed attempts are classified.
    pub classify: ClassifyPolicy,
    /// Per-attempt and per-request time limits.
    pub timeouts: Timeouts,
    /// How many retries the pool may spend, per model.
    pub budget: BudgetPolicy,
    /// When a provider is demoted and how it comes back.
    pub health: HealthPolicy,
}

/// Rules for turning a failed attempt into a
/// [`Classification`](crate::Classification).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClassifyPolicy {
    /// Substrings that mark an *opaque* error text as transient, matched
    /// ASCII-case-insensitively on the raw error chain. Only consulted when
    /// the error carries no kind (io kind, reqwest flag, HTTP status).
    pub transient_keywords: Vec<String>,
    /// Substrings that mean "this provider does not serve this model": the
    /// next provider is tried, this one is not retried.
    pub next_provider_keywords: Vec<String>,
    /// Substrings that mark an error as the client's own fault even under a
    /// 5xx status (e.g. an image URL the upstream could not fetch): never
    /// retried, never held against the provider.
    pub client_error_keywords: Vec<String>,
    /// Statuses outside 5xx that are transient (e.g. 408 Request Timeout).
    pub retryable_statuses: Vec<u16>,
    /// 5xx statuses that must never be retried (returned at once).
    pub permanent_statuses: Vec<u16>,
    /// Statuses that move on to the next provider without retrying this one.
    pub next_provider_statuses: Vec<u16>,
    /// Retry an attempt that timed out *after* the upstream accepted it
    /// (waiting for response headers). Off by default: it doubles the cost
    /// of a long generation.
    pub retry_response_timeout: bool,
}

/// Time limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// TCP connect limit for HTTP clients built by
    /// [`upstream::client_builder`](crate::upstream::client_builder). It must
    /// be set below `attempt`: without it, a stalled connect is
    /// indistinguishable from a slow response and is not retried.
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// Limit for one attempt: until the operation returns (response headers).
    #[serde(with = "humantime_serde")]
    pub attempt: Duration,
    /// Default deadline of a whole request, all rounds and waits included.
    #[serde(with = "humantime_serde")]
    pub request: Duration,
}

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

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_rounds: 2,
            delay: Duration::from_millis(500),
            backoff: 2.0,
            max_delay: Duration::from_secs(4),
            jitter: 0.2,
            rate_limited_delay: Duration::from_secs(1),
            max_retry_after: Duration::from_secs(60),
            classify: ClassifyPolicy::default(),
            timeouts: Timeouts::default(),
            budget: BudgetPolicy::default(),
            health: HealthPolicy::default(),
        }
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

impl Default for ClassifyPolicy {
    fn default() -> Self {
        ClassifyPolicy {
            transient_keywords: strings(&[
                "connection",
                "timeout",
                "timed out",
                "reset",
                "broken pipe",
                "error decoding response body",
                "body error",
                "unexpected eof",
                "temporarily unavailable",
            ]),
            next_provider_keywords: strings(&[
                "model not found",
                "model_not_found",
                "no such model",
                "unknown model",
            ]),
            client_error_keywords: strings(&[
                "failed to fetch image",
                "could not fetch image",
                "invalid image url",
                "context length exceeded",
                "maximum context length",
            ]),
            retryable_statuses: vec![408],
            permanent_statuses: vec![501, 505],
            next_provider_statuses: vec![404],
            retry_response_timeout: false,
        }
    }
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

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            demote_after: 10,
            cooldown: Duration::from_secs(30),
            max_cooldown: Duration::from_secs(300),
        }
    }
}

/// Why a policy was refused: which field, what value, what is allowed, and
/// where in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    /// Dotted path of the field (`budget.ratio`), empty for syntax errors.
    pub field: String,
    /// The offending value as written.
    pub value: String,
    /// What would have been accepted, or the parser's message.
    pub allowed: String,
    /// 1-based line and column in the source text, when known.
    pub location: Option<(usize, usize)>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some((line, col)) = self.location {
            write!(f, "line {line}, column {col}: ")?;
        }
        if self.field.is_empty() {
            write!(f, "{}", self.allowed)
        } else {
            write!(
                f,
                "`{}` = {} is invalid: {}",
                self.field, self.value, self.allowed
            )
        }
    }
}

impl std::error::Error for PolicyError {}

impl PolicyError {
    fn field(field: &str, value: impl fmt::Display, allowed: impl Into<String>) -> Self {
        PolicyError {
            field: field.to_owned(),
            value: value.to_string(),
            allowed: allowed.into(),
            location: None,
        }
    }
}

fn secs(d: Duration) -> String {
    format!("\"{}\"", humantime::format_duration(d))
}

impl Policy {
    /// Parses and validates a TOML policy. Errors carry the line and column.
    pub fn from_toml(text: &str) -> Result<Policy, PolicyError> {
        let policy: Policy = toml::from_str(text).map_err(|e| {
            let location = e.span().map(|s| line_col(text, s.start));
            PolicyError {
                field: String::new(),
                value: String::new(),
                allowed: e.message().trim().to_owned(),
                location,
            }
        })?;
        policy.validate().map_err(|mut e| {
            e.location = locate(text, &e.field);
            e
        })?;
        Ok(policy)
    }

    /// Renders the policy as TOML with every field (defaults filled in).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render policy: {e}\n"))
    }

    /// Checks every value against its allowed range.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if !(1..=MAX_ROUNDS_LIMIT).contains(&self.max_rounds) {
            return Err(PolicyError::field(
                "max_rounds",
                self.max_rounds,
                format!("an integer within 1..={MAX_ROUNDS_LIMIT} (1 disables retries)"),
            ));
        }
        check_duration("delay", self.delay, Duration::ZERO, Duration::from_secs(60))?;
        if !(self.backoff.is_finite() && (1.0..=10.0).contains(&self.backoff)) {
            return Err(PolicyError::field(
                "backoff",
                self.backoff,
                "a number within 1.0..=10.0",
            ));
        }
        check_duration(
            "max_delay",
            self.max_delay,
            self.delay,
            Duration::from_secs(300),
        )
        .map_err(|e| PolicyError {
            allowed: format!("{} and at least `delay`", e.allowed),
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
        let t = &self.timeouts;
        check_duration(
            "timeouts.connect",
            t.connect,
            Duration::from_millis(1),
            Duration::from_secs(300),
        )?;
        check_duration(
            "timeouts.attempt",
            t.attempt,
            Duration::from_millis(1),
            Duration::from_secs(86_400),
        )?;
        check_duration(
            "timeouts.request",
            t.request,
            Duration::from_millis(1),
            Duration::from_secs(86_400),
        )?;
        if t.connect >= t.attempt {
            return Err(PolicyError::field(
                "timeouts.connect",
                secs(t.connect),
                format!(
                    "less than timeouts.attempt ({}), or a stalled connect looks like a slow response",
                    secs(t.attempt)
                ),
            ));
        }
        let b = &self.budget;
        check_fraction("budget.ratio", b.ratio)?;
        if b.min_per_second > 1_000_000 {
            return Err(PolicyError::field(
                "budget.min_per_second",
                b.min_per_second,
                "an integer within 0..=1000000",
            ));
        }
        check_duration(
            "budget.window",
            b.window,
            Duration::from_secs(1),
            Duration::from_secs(300),
        )?;
        let h = &self.health;
        if !(1..=1_000_000).contains(&h.demote_after) {
            return Err(PolicyError::field(
                "health.demote_after",
                h.demote_after,
                "an integer within 1..=1000000",
            ));
        }
        check_duration(
            "health.cooldown",
            h.cooldown,
            Duration::from_millis(1),
            Duration::from_secs(86_400),
        )?;
        check_duration(
            "health.max_cooldown",
            h.max_cooldown,
            h.cooldown,
            Duration::from_secs(86_400),
        )
        .map_err(|e| PolicyError {
            allowed: format!("{} and at least `health.cooldown`", e.allowed),
            ..e
        })?;
        Ok(())
    }
}

impl ClassifyPolicy {
    fn validate(&self) -> Result<(), PolicyError> {
        for (field, words) in [
            ("classify.transient_keywords", &self.transient_keywords),
            (
                "classify.next_provider_keywords",
                &self.next_provider_keywords,
            ),
            (
                "classify.client_error_keywords",
                &self.client_error_keywords,
            ),
        ] {
            if words.len() > 256 {
                return Err(PolicyError::field(
                    field,
                    format!("{} keywords", words.len()),
                    "at most 256 keywords",
                ));
            }
            for w in words {
                if w.trim().is_empty() || w.len() > 256 {
                    return Err(PolicyError::field(
                        field,
                        format!("{w:?}"),
                        "non-blank keywords of at most 256 bytes",
                    ));
                }
            }
        }
        for &code in &self.retryable_statuses {
            if !(400..=599).contains(&code) || code == 429 {
                return Err(PolicyError::field(
                    "classify.retryable_statuses",
                    code,
                    "status codes within 400..=599 other than 429 (429 is always rate-limited)",
                ));
            }
        }
        for &code in &self.permanent_statuses {
            if !(500..=599).contains(&code) {
                return Err(PolicyError::field(
                    "classify.permanent_statuses",
                    code,
                    "status codes within 500..=599 (4xx are permanent already)",
                ));
            }
        }
        for &code in &self.next_provider_statuses {
            if !(400..=599).contains(&code) || code == 429 {
                return Err(PolicyError::field(
                    "classify.next_provider_statuses",
                    code,
                    "status codes within 400..=599 other than 429",
                ));
            }
        }
        Ok(())
    }
}

fn check_duration(
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

fn check_fraction(field: &str, value: f64) -> Result<(), PolicyError> {
    if !(value.is_finite() && (0.0..=1.0).contains(&value)) {
        return Err(PolicyError::field(
            field,
            value,
            "a number within 0.0..=1.0",
        ));
    }
    Ok(())
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before
        .rsplit_once('\n')
        .map_or(before, |(_, tail)| tail)
        .chars()
        .count()
        + 1;
    (line, col)
}

/// Finds where a dotted field path's value is written, if it is.
fn locate(text: &str, path: &str) -> Option<(usize, usize)> {
    let root = toml::de::DeTable::parse(text).ok()?;
    let mut parts = path.split('.');
    let first = parts.next()?;
    let mut value = root.get_ref().get(first)?;
    for part in parts {
        value = value.get_ref().get(part)?;
    }
    Some(line_col(text, value.span().start))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(p.delay, Duration::from_millis(250));
        assert_eq!(p.health.cooldown, Duration::from_secs(60));
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
    fn wrong_type_and_negative_values_are_refused() {
        let e = Policy::from_toml("max_rounds = \"two\"").unwrap_err();
        assert_eq!(e.location.map(|l| l.0), Some(1));
        let e = Policy::from_toml("max_rounds = -1").unwrap_err();
        assert_eq!(e.location.map(|l| l.0), Some(1));
        let e = Policy::from_toml("delay = \"-5ms\"").unwrap_err();
        assert_eq!(e.location.map(|l| l.0), Some(1));
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
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("ab", 99), (1, 3));
    }
}
