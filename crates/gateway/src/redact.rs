//! Redaction of upstream addresses and credentials from text that leaves
//! the gateway.
//!
//! Every client-facing error message and every log line the gateway
//! writes passes through a [`Redactor`]. Upstream error text is full of
//! things a client must not learn and a log pipeline should not keep:
//! the internal URL of the model proxy (an HTTP client's "error sending
//! request for url (http://10.0.0.5:8000/v1/chat/completions)"), the IP
//! address of
//! a backend, and sometimes the gateway's own API key, echoed back by an
//! upstream that rejected it ("Incorrect API key provided: sk-...").
//!
//! Two layers, both applied:
//!
//! 1. **Known secrets**, replaced wherever they appear: the API keys the
//!    gateway read from the environment. This catches keys of any shape.
//! 2. **Patterns**, for what the gateway cannot know in advance:
//!    * URLs: `scheme://anything/path?q` becomes `scheme://host-redacted/...`
//!      (host, port, user info, path and query all go: paths and queries
//!      carry keys too);
//!    * IPv4 and IPv6 addresses become `[ip]` (a port after it stays);
//!    * `Bearer <token>` becomes `Bearer [redacted]`;
//!    * `sk-...` keys (OpenAI, Anthropic and most compatible servers) become
//!      `[redacted]`.
//!
//! Redaction runs on the error path only; it allocates and scans the text
//! a few times, which costs microseconds against an upstream failure that
//! cost milliseconds. Successful response bodies are never rewritten.
//!
//! ```
//! use retryctl_gateway::Redactor;
//!
//! let r = Redactor::new(["internal-token-123".to_owned()]);
//! let text = "error sending request for url (http://10.0.0.5:8000/v1/chat): \
//!             token internal-token-123 refused by 10.0.0.5, Bearer abc.def";
//! assert_eq!(
//!     r.redact(text),
//!     "error sending request for url (http://host-redacted/...): \
//!      token [redacted] refused by [ip], Bearer [redacted]"
//! );
//! ```

use std::net::Ipv6Addr;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};

/// What replaces a secret, a bearer token or a key.
const REDACTED: &str = "[redacted]";
/// The shortest start of a known secret redacted at the end of a text
/// (a key cut by a length limit); shorter pieces say nothing about it.
const MIN_PARTIAL: usize = 6;
/// What replaces an IP address.
const IP: &str = "[ip]";
/// What replaces a URL's authority.
const HOST: &str = "host-redacted";

/// Redacts known secrets and the patterns listed in the module docs from text.
///
/// Built once by the gateway with the API keys it read; cheap to share
/// behind an `Arc`.
#[derive(Clone, Default)]
pub struct Redactor {
    /// Longest first (for the partial tail at the end of a text).
    secrets: Vec<String>,
    /// All secrets in one automaton, leftmost-longest: one pass over the
    /// original text, so a key that contains another is replaced whole
    /// and nothing the redactor wrote (its own `[redacted]`) is scanned
    /// again. `None` when there are no secrets.
    matcher: Option<AhoCorasick>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secrets themselves.
        f.debug_struct("Redactor")
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

impl Redactor {
    /// A redactor that also replaces each of `secrets` (empty ones are
    /// ignored) wherever it appears.
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Self {
        let mut secrets: Vec<String> = secrets.into_iter().filter(|s| !s.is_empty()).collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        let matcher = (!secrets.is_empty()).then(|| {
            AhoCorasickBuilder::new()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&secrets)
                .expect("literal secrets always build an automaton")
        });
        Redactor { secrets, matcher }
    }

    /// `text` with the known secrets and every pattern redacted.
    ///
    /// A text that ends with the first six or more characters of a known
    /// secret loses that tail too: upstream error bodies are
    /// cut at a byte limit before they are redacted, and a key straddling
    /// the cut is no longer the whole secret.
    pub fn redact(&self, text: &str) -> String {
        let mut out = match &self.matcher {
            Some(matcher) => matcher.replace_all(text, &vec![REDACTED; self.secrets.len()]),
            None => text.to_owned(),
        };
        if let Some(cut) = self.partial_tail(&out) {
            out.truncate(cut);
            out.push_str(REDACTED);
        }
        redact_patterns(&out)
    }

    /// Where a trailing piece of a known secret (its first `MIN_PARTIAL`
    /// characters or more) starts in `text`, if it ends with one.
    fn partial_tail(&self, text: &str) -> Option<usize> {
        self.secrets
            .iter()
            .filter_map(|secret| {
                (MIN_PARTIAL..secret.len().min(text.len() + 1))
                    .rev()
                    .find(|&n| secret.is_char_boundary(n) && text.ends_with(&secret[..n]))
                    .map(|n| text.len() - n)
            })
            .min()
    }
}

/// `text` with URLs, IP addresses, bearer tokens and `sk-` keys redacted
/// (no known secrets: see [`Redactor`]).
pub fn redact(text: &str) -> String {
    redact_patterns(text)
}

fn redact_patterns(text: &str) -> String {
    let text = bearer_tokens(text);
    let text = urls(&text);
    // IPv6 first: an IPv4-mapped address ends in a dotted quad.
    let text = ipv6(&text);
    let text = ipv4(&text);
    sk_keys(&text)
}

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Characters that end a URL in running text (or in JSON, where a URL is
/// followed by `"` or an escaped `\"`).
fn ends_url(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '"' | '\''
                | '<'
                | '>'
                | '`'
                | '('
                | ')'
                | '['
                | ']'
                | '{'
                | '}'
                | '|'
                | '\\'
                | '^'
                | ','
                | ';'
        )
}

/// `Bearer <token>` (any case) -> `Bearer [redacted]`.
fn bearer_tokens(text: &str) -> String {
    const WORD: &str = "bearer";
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut from = 0;
    while let Some(found) = lower[from..].find(WORD) {
        let start = from + found;
        let after = start + WORD.len();
        from = after;
        if text[..start].chars().next_back().is_some_and(is_word) {
            continue;
        }
        let rest = &text[after..];
        let gap = rest.len() - rest.trim_start_matches([' ', '\t']).len();
        if gap == 0 {
            continue;
        }
        let token_start = after + gap;
        let token_len = text[token_start..]
            .find(|c: char| {
                !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~' | '+' | '/' | '='))
            })
            .unwrap_or(text.len() - token_start);
        if token_len == 0 {
            continue;
        }
        out.push_str(&text[copied..token_start]);
        out.push_str(REDACTED);
        copied = token_start + token_len;
        from = copied;
    }
    out.push_str(&text[copied..]);
    out
}

/// `scheme://authority[/path?query#frag]` -> `scheme://host-redacted[/...]`.
fn urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut from = 0;
    while let Some(found) = text[from..].find("://") {
        let sep = from + found;
        from = sep + 3;
        // The scheme: letters, digits, `+ - .`, starting with a letter.
        let scheme_start = text[..sep]
            .char_indices()
            .rev()
            .take_while(|&(_, c)| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
            .last()
            .map_or(sep, |(i, _)| i);
        let scheme_start = text[scheme_start..sep]
            .find(|c: char| c.is_ascii_alphabetic())
            .map_or(sep, |i| scheme_start + i);
        if scheme_start == sep || scheme_start < copied {
            continue;
        }
        // The authority, with a bracketed IPv6 host kept whole.
        let rest = &text[from..];
        let mut end = 0;
        if rest.starts_with('[') {
            end = rest.find(']').map_or(rest.len(), |i| i + 1);
        }
        end += rest[end..]
            .find(|c: char| ends_url(c) || matches!(c, '/' | '?' | '#'))
            .unwrap_or(rest.len() - end);
        let authority_end = from + end;
        let mut url_end = authority_end;
        let has_path = text[authority_end..].starts_with(['/', '?', '#']);
        if has_path {
            url_end += text[authority_end..]
                .find(ends_url)
                .unwrap_or(text.len() - authority_end);
        }
        if end == 0 && !has_path {
            continue;
        }
        out.push_str(&text[copied..sep]);
        out.push_str("://");
        out.push_str(HOST);
        if has_path {
            out.push_str("/...");
        }
        copied = url_end;
        from = url_end;
    }
    out.push_str(&text[copied..]);
    out
}

/// Dotted-quad IPv4 addresses -> `[ip]`.
fn ipv4(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
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
        // A sentence may end right after the address.
        // Trailing dots end the sentence (or an ellipsis), not the address.
        let candidate = text[i..end].trim_end_matches('.');
        let next = bytes.get(i + candidate.len()).copied();
        let bounded = !next.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
        if bounded && is_ipv4(candidate) {
            out.push_str(&text[copied..i]);
            out.push_str(IP);
            copied = i + candidate.len();
        }
        i = end;
    }
    out.push_str(&text[copied..]);
    out
}

fn is_ipv4(s: &str) -> bool {
    let mut parts = 0;
    for part in s.split('.') {
        parts += 1;
        if part.is_empty() || part.len() > 3 || part.parse::<u8>().is_err() {
            return false;
        }
    }
    parts == 4
}

/// IPv6 addresses (including `::1` and IPv4-mapped forms) -> `[ip]`; a
/// bracketed one (`[fe80::1]:443`) loses its brackets too.
fn ipv6(text: &str) -> String {
    let bytes = text.as_bytes();
    let in_run = |b: u8| b.is_ascii_hexdigit() || b == b':' || b == b'.';
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        let starts = in_run(bytes[i])
            && (i == 0
                || !(in_run(bytes[i - 1])
                    || bytes[i - 1].is_ascii_alphanumeric()
                    || bytes[i - 1] == b'_'));
        if !starts {
            i += 1;
            continue;
        }
        let mut end = i;
        while end < bytes.len() && in_run(bytes[end]) {
            end += 1;
        }
        let run = &text[i..end];
        i = end;
        let next = bytes.get(end).copied();
        if next.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_') {
            continue;
        }
        if run.matches(':').count() < 2 || !run.bytes().any(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        // Trailing punctuation of the sentence is not part of the address.
        let trimmed = run.trim_end_matches('.');
        let Ok(_) = trimmed.parse::<Ipv6Addr>() else {
            continue;
        };
        let start = end - run.len();
        let stop = start + trimmed.len();
        let bracketed = start > 0 && bytes[start - 1] == b'[' && bytes.get(stop) == Some(&b']');
        let (from, to) = if bracketed {
            (start - 1, stop + 1)
        } else {
            (start, stop)
        };
        if from < copied {
            continue;
        }
        out.push_str(&text[copied..from]);
        out.push_str(IP);
        copied = to;
    }
    out.push_str(&text[copied..]);
    out
}

/// `sk-` followed by at least 8 key characters -> `[redacted]`.
fn sk_keys(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut from = 0;
    while let Some(found) = text[from..].find("sk-") {
        let start = from + found;
        from = start + 3;
        if text[..start]
            .chars()
            .next_back()
            .is_some_and(|c| is_word(c) || c == '-')
        {
            continue;
        }
        let key_len = text[start + 3..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            .unwrap_or(text.len() - start - 3);
        if key_len < 8 {
            continue;
        }
        out.push_str(&text[copied..start]);
        out.push_str(REDACTED);
        copied = start + 3 + key_len;
        from = copied;
    }
    out.push_str(&text[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_host_port_path_and_query() {
        assert_eq!(
            redact("error sending request for url (http://10.0.0.5:8000/v1/chat/completions)"),
            "error sending request for url (http://host-redacted/...)"
        );
        assert_eq!(
            redact("see https://user:pw@api.internal.example:8443/v1?key=abc#x now"),
            "see https://host-redacted/... now"
        );
        assert_eq!(redact("at http://proxy.local"), "at http://host-redacted");
        assert_eq!(
            redact("http://[fe80::1]:8080/v1/models"),
            "http://host-redacted/..."
        );
        // in JSON, the closing quote (or an escaped one) ends the URL
        assert_eq!(
            redact(r#"{"url":"http://10.1.2.3/x","b":"\"http://h/p\""}"#),
            r#"{"url":"http://host-redacted/...","b":"\"http://host-redacted/...\""}"#
        );
        assert_eq!(redact("a://"), "a://");
        assert_eq!(redact("no url here: 3 :// 4"), "no url here: 3 :// 4");
    }

    #[test]
    fn ipv4_addresses() {
        assert_eq!(redact("refused by 10.0.0.5:8000."), "refused by [ip]:8000.");
        assert_eq!(redact("peer 192.168.1.1."), "peer [ip].");
        assert_eq!(redact("127.0.0.1"), "[ip]");
        // not addresses
        assert_eq!(
            redact("version 1.2.3 or 1.2.3.4.5"),
            "version 1.2.3 or 1.2.3.4.5"
        );
        assert_eq!(
            redact("999.1.1.1 and v10.0.0.1x"),
            "999.1.1.1 and v10.0.0.1x"
        );
        assert_eq!(redact("took 12.5 s"), "took 12.5 s");
    }

    #[test]
    fn ipv6_addresses() {
        assert_eq!(redact("connect to ::1 failed"), "connect to [ip] failed");
        assert_eq!(
            redact("peer [2001:db8::7]:443 reset"),
            "peer [ip]:443 reset"
        );
        assert_eq!(redact("fe80::1ff:fe23:4567:890a."), "[ip].");
        assert_eq!(redact("mapped ::ffff:10.0.0.1"), "mapped [ip]");
        // not addresses: times, Rust paths, MACs, a bare `::`
        assert_eq!(
            redact("at 12:30:45, hyper::Error, std::io, aa:bb:cc:dd:ee:ff, a :: b"),
            "at 12:30:45, hyper::Error, std::io, aa:bb:cc:dd:ee:ff, a :: b"
        );
    }

    #[test]
    fn bearer_tokens_and_keys() {
        assert_eq!(
            redact("Authorization: Bearer eyJhbGci.OiJIUzI1NiJ9/x+y= next"),
            "Authorization: Bearer [redacted] next"
        );
        assert_eq!(redact("bearer   abc"), "bearer   [redacted]");
        assert_eq!(redact("Bearer"), "Bearer");
        assert_eq!(redact("unbearerable x"), "unbearerable x");
        assert_eq!(
            redact("Incorrect API key provided: sk-proj-AbC123_xyz-9876."),
            "Incorrect API key provided: [redacted]."
        );
        assert_eq!(
            redact("risk-assessment, sk-short"),
            "risk-assessment, sk-short"
        );
    }

    #[test]
    fn known_secrets_of_any_shape() {
        let r = Redactor::new(["tok".to_owned(), "tok-longer".to_owned(), String::new()]);
        assert_eq!(
            r.redact("a tok-longer b tok c"),
            "a [redacted] b [redacted] c"
        );
        assert!(!format!("{r:?}").contains("tok"));
        assert_eq!(Redactor::default().redact("plain text"), "plain text");
    }

    #[test]
    fn a_secret_cut_at_the_end_of_a_text() {
        let r = Redactor::new(["k3y-0123456789-plain".to_owned()]);
        // A body cut at a byte limit inside the key.
        assert_eq!(
            r.redact("refused: k3y-0123456789-pl"),
            "refused: [redacted]"
        );
        assert_eq!(r.redact("refused: k3y-01"), "refused: [redacted]");
        // Five characters say nothing; elsewhere than the end, a prefix
        // is ordinary text.
        assert_eq!(r.redact("refused: k3y-0"), "refused: k3y-0");
        assert_eq!(r.redact("k3y-0123 and more"), "k3y-0123 and more");
        // The whole key, then a cut one.
        assert_eq!(
            r.redact("k3y-0123456789-plain, k3y-0123456"),
            "[redacted], [redacted]"
        );
    }

    #[test]
    fn unicode_text_survives() {
        assert_eq!(
            redact("échec: höst 10.0.0.1 — ünreachable ::1"),
            "échec: höst [ip] — ünreachable [ip]"
        );
        // a scheme is ASCII
        assert_eq!(redact("ü://x"), "ü://x");
    }
}
