//! Fuzz target `classify`: classification of error texts, statuses with
//! bodies, and keyword lists that are themselves fuzzed.
//!
//! Input: text (lossily decoded) in up to four parts separated by 0x1F
//! (unit separator): the error text, then the transient, next-provider
//! and client-error keyword lists, each split on 0x1E (record separator).
//! A plain error string (most of the corpus) is classified under the
//! default rules only. The first two bytes also give an arbitrary status
//! code, the third an optional Retry-After.
//!
//! Checks, besides "no panic, no hang": a verdict's class matches its
//! cause (text gives keyword causes, or the kind reqwest's own message
//! forms name); matching ignores ASCII case; 429 is always rate-limited
//! with the Retry-After given; a client-error keyword in a body or a text
//! always wins.

use std::sync::OnceLock;
use std::time::Duration;

use retryctl::policy::ClassifyPolicy;
use retryctl::{Cause, Classification, Rules, Verdict};

/// One fuzz input.
pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\u{1f}');
    let error = parts.next().unwrap_or_default();
    let lists: Vec<Vec<String>> = parts
        .take(3)
        .map(|p| p.split('\u{1e}').map(str::to_owned).collect())
        .collect();
    let code = match data {
        [a, b, ..] => u16::from_le_bytes([*a, *b]),
        _ => 0,
    };
    let retry_after = match data.get(2) {
        Some(&b) if b % 4 == 0 => None,
        Some(255) => Some(Duration::MAX),
        Some(&b) => Some(Duration::from_secs(u64::from(b))),
        None => None,
    };

    // Compiled once, as the pool does (building the automaton costs far
    // more than classifying).
    static DEFAULTS: OnceLock<Rules> = OnceLock::new();
    check(
        DEFAULTS.get_or_init(Rules::default),
        error,
        code,
        retry_after,
    );

    if !lists.is_empty() {
        let mut policy = ClassifyPolicy::default();
        let mut lists = lists.into_iter();
        if let Some(words) = lists.next() {
            policy.transient_keywords = words;
        }
        if let Some(words) = lists.next() {
            policy.next_provider_keywords = words;
        }
        if let Some(words) = lists.next() {
            policy.client_error_keywords = words;
        }
        // Rules::new takes any list (validation is the policy's job):
        // empty and blank keywords included, it must not panic.
        let rules = Rules::new(&policy);
        check(&rules, error, code, retry_after);
        // The same lists through a policy file, as an operator writes them.
        let whole = retryctl::policy::Policy {
            classify: policy,
            ..retryctl::policy::Policy::default()
        };
        if whole.validate().is_ok() {
            let text = whole.to_toml();
            let parsed = retryctl::policy::Policy::from_toml(&text)
                .unwrap_or_else(|e| panic!("valid keywords do not round-trip: {e}\n{text}"));
            assert_eq!(parsed.classify, whole.classify);
        }
    }
}

fn check(rules: &Rules, error: &str, code: u16, retry_after: Option<Duration>) {
    let v = rules.text(error);
    consistent(v);
    // Text has no kind of its own: keyword causes, or what reqwest's
    // message forms name (a status, a connect failure, a request that
    // could not be built, reqwest's own timer).
    assert!(!matches!(
        v.cause,
        Cause::Reset | Cause::Timeout | Cause::AdaptiveTimeout | Cause::Body | Cause::Decode
    ));
    // Only a client-error keyword makes a 200 permanent.
    let client_keyword = rules.status(200, None, error).class == Classification::Permanent;
    if client_keyword {
        assert_eq!(
            v,
            Verdict::new(Classification::Permanent, Cause::ClientError)
        );
    }
    // ASCII-case-insensitive: changing the case of ASCII letters changes
    // nothing.
    assert_eq!(
        rules.text(&error.to_ascii_uppercase()),
        v,
        "case: {error:?}"
    );
    assert_eq!(
        rules.text(&error.to_ascii_lowercase()),
        v,
        "case: {error:?}"
    );

    for code in [
        code,
        400,
        404,
        408,
        429,
        500,
        501,
        502,
        503,
        504,
        599,
        200,
        0,
        u16::MAX,
    ] {
        for retry_after in [retry_after, None] {
            let s = rules.status(code, retry_after, error);
            consistent(s);
            if code == 429 {
                assert_eq!(
                    s,
                    Verdict::new(
                        Classification::RateLimited { retry_after },
                        Cause::RateLimited
                    )
                );
            } else if client_keyword {
                // A body naming a client error is never retried.
                assert_eq!(s.class, Classification::Permanent, "{code} {error:?}");
            }
            if retry_after.is_none() {
                assert!(!matches!(s.class, Classification::RateLimited { .. }) || code == 429);
            }
        }
    }
}

/// The class a cause implies (statuses with a Retry-After become
/// rate-limited).
fn consistent(v: Verdict) {
    let ok = match v.cause {
        Cause::Keyword | Cause::Status5xx | Cause::Unavailable | Cause::StatusRetryable => {
            matches!(
                v.class,
                Classification::Transient | Classification::RateLimited { .. }
            )
        }
        Cause::ConnectRefused | Cause::Connect | Cause::ConnectTimeout | Cause::NotSent => {
            v.class == Classification::Transient
        }
        // Retried only when the policy says so.
        Cause::ResponseTimeout => {
            matches!(v.class, Classification::TryNext | Classification::Transient)
        }
        Cause::RateLimited => matches!(v.class, Classification::RateLimited { .. }),
        Cause::ClientError | Cause::InvalidRequest => v.class == Classification::Permanent,
        Cause::NextProvider | Cause::Opaque => v.class == Classification::TryNext,
        _ => false,
    };
    assert!(ok, "inconsistent verdict {v:?}");
}
