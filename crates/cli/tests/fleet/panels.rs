//! The dashboard's queries, turned into fleet-wide checks.
//!
//! * [`aggregation`] sorts a panel query by how it combines replicas:
//!   `sum` (counters and histogram buckets: the fleet is the sum of its
//!   replicas), `max` or `min` (gauges: the worst replica), or neither
//!   (a count of replicas, the clock, a constant).
//! * [`instant`] replaces `rate(X[w])` and `increase(X[w])` with `X`: the
//!   test compares totals, which do not depend on when Prometheus scraped.
//!   Every series exists (at 0) from the moment a replica starts, so a
//!   counter's value is its increase over the test; a panel's ratios are
//!   the same on totals as on rates.
//! * [`restrict`] adds a label matcher to every `retryctl_*` selector, so
//!   one query reads the three replicas and the same query reads a
//!   combined target.

/// How a panel query combines the replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Aggregation {
    Sum,
    Max,
    Min,
}

/// The aggregation of `expr`, or why the query is not a combination of
/// replica series.
pub(crate) fn aggregation(expr: &str) -> Result<Aggregation, &'static str> {
    if expr.contains("time()") {
        return Err("depends on the time of evaluation");
    }
    if expr.trim_start().starts_with("vector(") {
        return Err("a constant (reference line)");
    }
    if aggregates_with(expr, "count") {
        return Err("counts replicas (checked on its own)");
    }
    let found: Vec<Aggregation> = [
        ("sum", Aggregation::Sum),
        ("max", Aggregation::Max),
        ("min", Aggregation::Min),
    ]
    .into_iter()
    .filter(|(word, _)| aggregates_with(expr, word))
    .map(|(_, a)| a)
    .collect();
    match found[..] {
        [one] => Ok(one),
        _ => panic!(
            "a dashboard query must aggregate replicas with exactly one of sum, max, min \
             (or be a count, the clock or a constant): {expr}"
        ),
    }
}

/// Whether `expr` reads a counter or a histogram's series (`_total`,
/// `_bucket`, `_sum`, `_count`): across replicas those only add up, so a
/// panel over them must `sum`.
pub(crate) fn reads_counters(expr: &str) -> bool {
    expr.match_indices("retryctl_").any(|(at, _)| {
        let name = &expr[at..];
        let name = &name[..name
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(name.len())];
        ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .any(|s| name.ends_with(s))
    })
}

/// Whether `expr` applies the aggregation operator `word` (`sum(`,
/// `sum by`, `sum without`; not `clamp_min(` nor `x_sum`).
fn aggregates_with(expr: &str, word: &str) -> bool {
    expr.match_indices(word).any(|(at, _)| {
        let before = at.checked_sub(1).map(|i| expr.as_bytes()[i]);
        let after = expr[at + word.len()..].trim_start();
        !before.is_some_and(ident)
            && (after.starts_with('(') || after.starts_with("by") || after.starts_with("without"))
    })
}

/// Whether `b` can continue an identifier.
fn ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b':'
}

/// The index of the `)` closing the `(` at `open`, skipping strings.
fn closing(expr: &str, open: usize) -> usize {
    let bytes = expr.as_bytes();
    let (mut depth, mut quote) = (0usize, None::<u8>);
    let mut i = open;
    while i < bytes.len() {
        let c = bytes[i];
        match quote {
            Some(q) if c == b'\\' && q != b'`' => i += 1,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None => match c {
                b'"' | b'\'' | b'`' => quote = Some(c),
                b'(' => depth += 1,
                b')' => {
                    depth -= 1;
                    if depth == 0 {
                        return i;
                    }
                }
                _ => {}
            },
        }
        i += 1;
    }
    panic!("unbalanced parentheses in {expr}");
}

/// `expr` with every `rate(X[w])` and `increase(X[w])` replaced by `(X)`.
pub(crate) fn instant(expr: &str) -> String {
    let mut out = expr.to_owned();
    'again: loop {
        for function in ["rate(", "increase("] {
            let mut from = 0;
            while let Some(at) = out[from..].find(function).map(|i| from + i) {
                from = at + function.len();
                if at > 0 && ident(out.as_bytes()[at - 1]) {
                    continue; // irate(, some_rate(
                }
                let open = at + function.len() - 1;
                let close = closing(&out, open);
                let inner = &out[open + 1..close];
                let range = inner
                    .trim_end()
                    .strip_suffix(']')
                    .and_then(|s| s.rfind('['))
                    .unwrap_or_else(|| panic!("{function}...) without a range: {expr}"));
                out = format!("{}({}){}", &out[..at], &inner[..range], &out[close + 1..]);
                continue 'again;
            }
        }
        return out;
    }
}

/// `expr` with `matcher` (e.g. `instance="127.0.0.1:9000"`) added to every
/// selector of a `retryctl_*` metric.
pub(crate) fn restrict(expr: &str, matcher: &str) -> String {
    let bytes = expr.as_bytes();
    let mut out = String::with_capacity(expr.len() + 64);
    let (mut i, mut quote) = (0usize, None::<u8>);
    while i < bytes.len() {
        let c = bytes[i];
        if let Some(q) = quote {
            out.push(c as char);
            if c == b'\\' && q != b'`' && i + 1 < bytes.len() {
                out.push(bytes[i + 1] as char);
                i += 1;
            } else if c == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        if matches!(c, b'"' | b'\'' | b'`') {
            quote = Some(c);
            out.push(c as char);
            i += 1;
            continue;
        }
        if ident(c) && (i == 0 || !ident(bytes[i - 1])) {
            let end = (i..bytes.len())
                .find(|&j| !ident(bytes[j]))
                .unwrap_or(bytes.len());
            let word = &expr[i..end];
            out.push_str(word);
            if word.starts_with("retryctl_") {
                if bytes.get(end) == Some(&b'{') {
                    let empty = bytes.get(end + 1) == Some(&b'}');
                    out.push('{');
                    out.push_str(matcher);
                    if !empty {
                        out.push_str(", ");
                    }
                    i = end + 1;
                    continue;
                }
                out.push_str(&format!("{{{matcher}}}"));
            }
            i = end;
            continue;
        }
        out.push(c as char);
        i += 1;
    }
    out
}

#[test]
fn panel_queries_become_fleet_checks() {
    let e = r#"1 - sum by (model) (rate(retryctl_requests_total{model=~".*", outcome=~"failed_.*"}[1m])) / (sum by (model) (rate(retryctl_first_round_failures_total[1m])) > 0)"#;
    assert_eq!(
        instant(e),
        r#"1 - sum by (model) ((retryctl_requests_total{model=~".*", outcome=~"failed_.*"})) / (sum by (model) ((retryctl_first_round_failures_total)) > 0)"#
    );
    assert_eq!(
        restrict(&instant(e), "instance=\"a\""),
        r#"1 - sum by (model) ((retryctl_requests_total{instance="a", model=~".*", outcome=~"failed_.*"})) / (sum by (model) ((retryctl_first_round_failures_total{instance="a"})) > 0)"#
    );
    assert_eq!(
        instant("sum(increase(x[5m])) + irate(y[1m])"),
        "sum((x)) + irate(y[1m])"
    );
    assert_eq!(
        restrict(r#"max(retryctl_x{}) + y{l="retryctl_z"}"#, "i=\"1\""),
        r#"max(retryctl_x{i="1"}) + y{l="retryctl_z"}"#
    );
    assert_eq!(aggregation(e), Ok(Aggregation::Sum));
    assert_eq!(aggregation("max by (m) (retryctl_g)"), Ok(Aggregation::Max));
    assert_eq!(aggregation("min(retryctl_g)"), Ok(Aggregation::Min));
    assert!(aggregation("count by (hash) (retryctl_policy_info == 1)").is_err());
    assert_eq!(
        aggregation("sum(retryctl_a_sum) / (sum(retryctl_a_count) > 0)"),
        Ok(Aggregation::Sum)
    );
    assert!(reads_counters("max(rate(retryctl_requests_total[1m]))"));
    assert!(reads_counters("sum(retryctl_x_bucket{le=\"1\"})"));
    assert!(!reads_counters("max by (m) (retryctl_admission_limit)"));
    assert!(aggregation("time() - max(x)").is_err());
    assert!(aggregation("vector(9500)").is_err());
    assert_eq!(
        aggregation("sum(retryctl_a_sum) / clamp_min(sum(retryctl_b), 1e-9)"),
        Ok(Aggregation::Sum)
    );
}
