//! `[classify]`: how a failed attempt is classified ([`ClassifyPolicy`]).

use serde::{Deserialize, Serialize};

use super::PolicyError;

/// Rules for turning a failed attempt into a
/// [`Classification`](crate::Classification).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClassifyPolicy {
    /// Substrings that mark an *opaque* error text as transient, matched
    /// ASCII-case-insensitively on the raw error chain. Only consulted when
    /// the error carries no kind (io kind, reqwest flag, HTTP status), and
    /// after reqwest's own message forms
    /// ([`Rules::text`](crate::Rules::text)).
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

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

impl Default for ClassifyPolicy {
    fn default() -> Self {
        ClassifyPolicy {
            // Phrases, not the bare word "connection": it is in parameter
            // names ("invalid value for 'connection_id'") as often as in
            // transport failures.
            transient_keywords: strings(&[
                "connection refused",
                "connection reset",
                "connection aborted",
                "connection closed",
                "connection error",
                "connection failed",
                "tcp connect error",
                "timeout",
                "timed out",
                "deadline has elapsed",
                "reset",
                "broken pipe",
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

impl ClassifyPolicy {
    /// Checks the keyword lists and status codes.
    pub(super) fn validate(&self) -> Result<(), PolicyError> {
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
