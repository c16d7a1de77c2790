//! Fuzz target `redact`: what the gateway removes from every
//! client-facing message and log line (`retryctl_gateway::Redactor`).
//!
//! Input: text (lossily decoded); an optional tail after 0x1F is a list
//! of known secrets separated by 0x1E, as the gateway's API keys.
//!
//! Checks: no known secret (of 8+ ASCII letters and digits, the shape of
//! an API key) survives; no `sk-` key of 8+ characters survives; and no
//! dotted-quad IPv4 address at a word boundary survives.
//!
//! Found by this target and fixed: an address followed by several dots
//! ("refused by 10.0.0.5...") survived redaction
//! (`tests/fuzz_corpus/regressions.rs` keeps the input).
//!
//! Also found by this target (as a timeout) and fixed: `Redactor::redact`
//! replaced the secrets one after the other on the text already redacted,
//! so a secret that occurs in the marker itself (`e`, `d`, `act`: in
//! "[redacted]") was found again in every marker written before it and
//! the output grew geometrically. Secrets are now replaced in one pass;
//! [`ONE_PASS_SECRETS`] keeps such secrets in the inputs.

use retryctl_gateway::{Redactor, redact};

/// Whether `Redactor::redact` replaces all secrets in one pass.
const ONE_PASS_SECRETS: bool = true;

/// One fuzz input.
pub fn run(data: &[u8]) {
    let input = String::from_utf8_lossy(data);
    let (text, secrets) = match input.split_once('\u{1f}') {
        Some((text, secrets)) => (text, secrets.split('\u{1e}').map(str::to_owned).collect()),
        None => (&*input, Vec::new()),
    };
    let secrets: Vec<String> = secrets
        .into_iter()
        .filter(|s| ONE_PASS_SECRETS || !"[redacted]".contains(s.as_str()))
        .collect();
    let plain = redact(text);
    no_sk_key(&plain);
    no_ipv4(&plain);

    let redactor = Redactor::new(secrets.clone());
    let out = redactor.redact(text);
    no_sk_key(&out);
    no_ipv4(&out);
    for secret in &secrets {
        let key_shaped = secret.len() >= 8 && secret.bytes().all(|b| b.is_ascii_alphanumeric());
        // What the redactor writes may itself contain a short word.
        let in_markers = "[redacted] host-redacted [ip]".contains(secret.as_str());
        if key_shaped && !in_markers {
            assert!(
                !out.contains(secret.as_str()),
                "secret {secret:?} survives in {out:?}"
            );
        }
    }
}

fn no_sk_key(out: &str) {
    let mut from = 0;
    while let Some(found) = out[from..].find("sk-") {
        let start = from + found;
        from = start + 3;
        let after_word = out[..start]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        let key = out[start + 3..]
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
            .count();
        assert!(after_word || key < 8, "an sk- key survives in {out:?}");
    }
}

/// Every run of digits and dots that starts and ends at a word boundary,
/// without its trailing dots, must not be an IPv4 address.
fn no_ipv4(out: &str) {
    let bytes = out.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts = bytes[i].is_ascii_digit()
            && (i == 0
                || !(bytes[i - 1].is_ascii_alphanumeric() || matches!(bytes[i - 1], b'.' | b'_')));
        if !starts {
            i += 1;
            continue;
        }
        let mut end = i;
        while end < bytes.len() && (bytes[end].is_ascii_digit() || bytes[end] == b'.') {
            end += 1;
        }
        let run = &out[i..end];
        let bounded = !bytes
            .get(end)
            .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_');
        let candidate = run.trim_end_matches('.');
        let quad = candidate.split('.').count() == 4
            && candidate
                .split('.')
                .all(|p| !p.is_empty() && p.len() <= 3 && p.parse::<u8>().is_ok());
        assert!(
            !(bounded && quad),
            "IPv4 address {candidate:?} survives in {out:?}"
        );
        i = end;
    }
}
