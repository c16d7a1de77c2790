//! The PromQL of the dashboard and of the alert rules, made evaluable.
//!
//! * [`dashboard_queries`] collects every panel target's `expr` (rows and
//!   nested panels included).
//! * [`substitute`] replaces Grafana's variables the way Grafana would for
//!   "All models, all providers, a 1-minute interval": `$model` and
//!   `$provider` become their `allValue` `.*` (the dashboard always matches
//!   them with `=~`, which [`check_variable_matchers`] enforces),
//!   `$__rate_interval`, `$__interval` and `$__range` become `1m`, and
//!   `${reference_failures_per_day}` becomes the textbox's default (9500).
//! * [`strip_final_comparison`] turns an alert expression `LHS > 0.01`
//!   into `LHS`: an alert's expression is legitimately empty while it does
//!   not fire, so the end-to-end test evaluates the full expression for a
//!   successful parse and its left-hand side for data.

use serde_json::Value;

/// The window every interval variable becomes: long enough to hold every
/// sample of a test that runs well under a minute.
pub(crate) const WINDOW: &str = "1m";

/// One panel target.
#[derive(Debug, Clone)]
pub(crate) struct PanelQuery {
    /// The panel's title.
    pub(crate) panel: String,
    /// The target's `refId` (A, B, ...).
    pub(crate) ref_id: String,
    /// The expression as written in the dashboard.
    pub(crate) expr: String,
}

/// Every panel's targets, in dashboard order (panels nested in rows too).
pub(crate) fn dashboard_queries(dashboard: &Value) -> Vec<PanelQuery> {
    fn walk(panels: &[Value], out: &mut Vec<PanelQuery>) {
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or("<untitled>");
            for t in panel["targets"].as_array().into_iter().flatten() {
                out.push(PanelQuery {
                    panel: title.to_owned(),
                    ref_id: t["refId"].as_str().unwrap_or("?").to_owned(),
                    expr: t["expr"].as_str().unwrap_or_default().to_owned(),
                });
            }
            if let Some(nested) = panel["panels"].as_array() {
                walk(nested, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(
        dashboard["panels"]
            .as_array()
            .map_or(&[][..], Vec::as_slice),
        &mut out,
    );
    out
}

/// The value each variable takes for evaluation: Grafana's built-in
/// intervals, then every templating variable (its `allValue` for a
/// multi-value variable with "All", the default text of a textbox or a
/// constant). Data source variables are not part of expressions.
pub(crate) fn variable_values(dashboard: &Value) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = [
        ("__rate_interval", WINDOW),
        ("__interval", WINDOW),
        ("__range", WINDOW),
        ("__range_s", "60"),
        ("__range_ms", "60000"),
        ("__interval_ms", "60000"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = var["name"].as_str().unwrap_or_default().to_owned();
        let value = match var["type"].as_str() {
            Some("query" | "custom") if var["includeAll"] == true => {
                var["allValue"].as_str().unwrap_or(".*").to_owned()
            }
            Some("textbox" | "constant") => var["query"].as_str().unwrap_or_default().to_owned(),
            Some("custom") => var["current"]["value"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            _ => continue,
        };
        vars.push((name, value));
    }
    vars
}

/// `expr` with every `$name` and `${name}` (a `${name:format}` too)
/// replaced from `vars`; an error names a variable that has no value.
pub(crate) fn substitute(expr: &str, vars: &[(String, String)]) -> Result<String, String> {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        let (name, consumed) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced
                .find('}')
                .ok_or_else(|| format!("unclosed ${{ in {expr:?}"))?;
            let inner = &braced[..end];
            (inner.split(':').next().unwrap_or(inner), end + 2)
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        let value = vars
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| format!("no value for variable ${name} in {expr:?}"))?;
        out.push_str(value);
        rest = &after[consumed..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Fails if a multi-value variable is matched with `=` or `!=` instead of a
/// regex matcher: with several models selected Grafana substitutes
/// `(a|b)`, which only `=~` matches.
pub(crate) fn check_variable_matchers(expr: &str, multi: &[&str]) -> Result<(), String> {
    for name in multi {
        for form in [format!("\"${name}\""), format!("\"${{{name}}}\"")] {
            let mut from = 0;
            while let Some(i) = expr[from..].find(&form) {
                let at = from + i;
                if !expr[..at].ends_with("=~") && !expr[..at].ends_with("!~") {
                    return Err(format!(
                        "${name} must be matched with =~ (multi-value): {expr}"
                    ));
                }
                from = at + form.len();
            }
        }
    }
    Ok(())
}

/// Splits `expr` at its last comparison operator outside any brackets,
/// braces, parentheses or string, when what follows it is a number:
/// `Some((lhs, op, rhs))`. `None` for an expression that does not end in
/// such a comparison (a filter like `x > 0` inside parentheses is kept).
pub(crate) fn strip_final_comparison(expr: &str) -> Option<(&str, &str, &str)> {
    let bytes = expr.as_bytes();
    let mut depth = 0usize;
    let mut quote: Option<u8> = None;
    let mut last: Option<(usize, usize)> = None;
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if let Some(q) = quote {
            if c == b'\\' && q != b'`' {
                i += 2;
                continue;
            }
            if c == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        match c {
            b'"' | b'\'' | b'`' => quote = Some(c),
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            b'#' => {
                // A comment runs to the end of the line.
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            _ if depth == 0 => {
                let two = expr.get(i..i + 2).unwrap_or("");
                if matches!(two, "==" | "!=" | ">=" | "<=") {
                    last = Some((i, 2));
                    i += 2;
                    continue;
                }
                if c == b'>' || c == b'<' {
                    last = Some((i, 1));
                }
            }
            _ => {}
        }
        i += 1;
    }
    let (at, len) = last?;
    let rhs = expr[at + len..].trim();
    let number = rhs.strip_prefix("bool").map_or(rhs, str::trim);
    number.parse::<f64>().ok()?;
    Some((expr[..at].trim(), &expr[at..at + len], rhs))
}

#[test]
fn substitutes_grafana_variables() {
    let vars = vec![
        ("__rate_interval".to_owned(), "1m".to_owned()),
        ("__range".to_owned(), "1m".to_owned()),
        ("__range_s".to_owned(), "60".to_owned()),
        ("model".to_owned(), ".*".to_owned()),
        ("reference_failures_per_day".to_owned(), "9500".to_owned()),
    ];
    assert_eq!(
        substitute(
            r#"sum(rate(x{model=~"$model"}[$__rate_interval])) * 86400 / $__range_s"#,
            &vars
        )
        .unwrap(),
        r#"sum(rate(x{model=~".*"}[1m])) * 86400 / 60"#
    );
    assert_eq!(
        substitute(
            "vector(${reference_failures_per_day}) + ${model:regex}",
            &vars
        )
        .unwrap(),
        "vector(9500) + .*"
    );
    assert_eq!(
        substitute("rate(x[$__range])", &vars).unwrap(),
        "rate(x[1m])"
    );
    assert!(
        substitute("rate(x[$nope])", &vars)
            .unwrap_err()
            .contains("$nope")
    );
}

#[test]
fn variable_matchers_must_be_regex() {
    assert!(
        check_variable_matchers(
            r#"x{model=~"$model", provider!~"${provider}"}"#,
            &["model", "provider"]
        )
        .is_ok()
    );
    assert!(check_variable_matchers(r#"x{model="$model"}"#, &["model"]).is_err());
    assert!(check_variable_matchers(r#"x{provider!="${provider}"}"#, &["provider"]).is_err());
}

#[test]
fn strips_only_a_final_top_level_comparison() {
    let e = "sum by (model) (rate(a{x=~\"f.*\", y!=\"p\"}[5m]))\n  /\nclamp_min(sum(b), 1e-9)\n  > 0.01\n";
    let (lhs, op, rhs) = strip_final_comparison(e).unwrap();
    assert_eq!(
        lhs,
        "sum by (model) (rate(a{x=~\"f.*\", y!=\"p\"}[5m]))\n  /\nclamp_min(sum(b), 1e-9)"
    );
    assert_eq!((op, rhs), (">", "0.01"));
    assert_eq!(
        strip_final_comparison("count(count by (h) (info == 1)) > 1"),
        Some(("count(count by (h) (info == 1))", ">", "1"))
    );
    assert_eq!(
        strip_final_comparison("max(x) == 1"),
        Some(("max(x)", "==", "1"))
    );
    assert_eq!(
        strip_final_comparison("a >= bool 2"),
        Some(("a", ">=", "bool 2"))
    );
    // a filter inside parentheses, a comparison between two vectors, a
    // string containing an operator: nothing to strip
    assert_eq!(strip_final_comparison("1 - a / (b > 0)"), None);
    assert_eq!(strip_final_comparison("a > b"), None);
    assert_eq!(strip_final_comparison(r#"x{l="a>1"}"#), None);
}
