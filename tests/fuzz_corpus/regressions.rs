//! Inputs of bugs found by fuzzing, kept as tests. A bug found and not
//! yet fixed is kept `#[ignore]`d, with the fix named in its doc comment,
//! until the fix lands (`cargo test --test fuzz_corpus -- --ignored`
//! shows any that are open).

use retryctl_gateway::{Redactor, redact};

/// Found by the `redact` target: an IPv4 address followed by more than
/// one dot (an ellipsis, or a sentence ending in "..") is not redacted,
/// so the upstream's address reaches the client and the logs.
///
/// `ipv4()` in `crates/gateway/src/redact.rs` trims one trailing dot from the
/// candidate (`if candidate.ends_with('.') { ... }`); it must trim them
/// all, as `ipv6()` does: `let candidate = text[i..end].trim_end_matches('.');`.
#[test]
fn ipv4_before_an_ellipsis_is_redacted() {
    assert_eq!(
        redact("connect to 10.0.0.5... failed"),
        "connect to [ip]... failed"
    );
    assert_eq!(redact("refused by 10.0.0.5.."), "refused by [ip]..");
    let r = Redactor::new(["internal-token-123".to_owned()]);
    assert_eq!(
        r.redact("error sending request to 192.168.1.20...; giving up"),
        "error sending request to [ip]...; giving up"
    );
}

/// The cases around it that work today (and must keep working).
#[test]
fn ipv4_before_one_dot_is_redacted() {
    assert_eq!(redact("refused by 10.0.0.5."), "refused by [ip].");
    assert_eq!(redact("refused by 10.0.0.5:8000."), "refused by [ip]:8000.");
    assert_eq!(redact("version 1.2.3.4.5"), "version 1.2.3.4.5");
}

/// Found by the `redact` target (a timeout): `Redactor::redact` replaces
/// the known secrets one after the other on the text it already
/// redacted, so a secret that occurs in the marker `[redacted]` itself is
/// found again inside every marker written before it: with secrets `e`,
/// `d`, `a`, ... the output grows geometrically (here 20 bytes become
/// 8,660; the fuzzer's input, 156 bytes with a dozen one-letter secrets,
/// did not finish in 10 s). Keys come from the operator's
/// environment, so this takes odd keys, but a redactor must be linear.
///
/// Fixed in `crates/gateway/src/redact.rs`: all secrets are replaced in one
/// leftmost-longest pass (aho-corasick) over the original text, built
/// once in `Redactor::new`; each input byte yields at most one marker.
#[test]
fn secrets_are_replaced_in_one_pass() {
    let secrets = ["e", "d", "a", "c", "t", "r"].map(str::to_owned);
    let r = Redactor::new(secrets);
    let text = "e".repeat(20);
    let out = r.redact(&text);
    assert!(
        out.len() <= text.len() * "[redacted]".len(),
        "{} bytes of output for {} bytes of input",
        out.len(),
        text.len()
    );
    assert_eq!(out, "[redacted]".repeat(20));
    // Overlapping secrets: the longest wins, the rest of the text stays.
    let r = Redactor::new(["key-123".to_owned(), "key-123456".to_owned()]);
    assert_eq!(
        r.redact("a key-123456 b key-123 c"),
        "a [redacted] b [redacted] c"
    );
}

/// Found by the `classify` target (a timeout): `Rules` matched all three
/// keyword lists with one automaton and walked every overlapping match to
/// find the strongest group, so the work grew with the text's length
/// times the keywords ending at each byte. The fuzzer's input, 211 bytes
/// whose keyword lists held dozens of empty and one-byte keywords, took
/// 34 ms in a release build (over 10 s under the sanitizers).
///
/// Fixed in `src/classify.rs`: one automaton per list, searched strongest
/// first, each search stopping at its first match: at most three linear
/// scans. The same shape scaled up (2,000 keywords, a 64 KiB text: about
/// 10^8 overlapping matches per scan before) classifies at once.
#[test]
fn keyword_lists_are_matched_in_linear_time() {
    use retryctl::policy::ClassifyPolicy;
    use retryctl::{Cause, Classification, Rules, Verdict};

    let data = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus/classify/7a54f5b4c082a1726ac5795c7ea90530f58ab99b"),
    )
    .expect("the fuzzer's input");
    super::classify::run(&data);

    let mut transient = vec![String::new(); 1_000];
    transient.extend(
        (b'a'..=b'z')
            .cycle()
            .take(1_000)
            .map(|c| (c as char).to_string()),
    );
    let rules = Rules::new(&ClassifyPolicy {
        transient_keywords: transient,
        next_provider_keywords: vec!["zz-next".into()],
        client_error_keywords: vec!["yy-client".into()],
        ..ClassifyPolicy::default()
    });
    let text = "ab".repeat(32 * 1024);
    assert_eq!(
        rules.text(&text),
        Verdict::new(Classification::Transient, Cause::Keyword)
    );
    // The strongest list still wins wherever its keyword is.
    let with_client = format!("{text} yy-CLIENT");
    assert_eq!(
        rules.text(&with_client),
        Verdict::new(Classification::Permanent, Cause::ClientError)
    );
    let with_next = format!("zz-next {text}");
    assert_eq!(rules.text(&with_next).class, Classification::TryNext);
}
