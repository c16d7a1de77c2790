//! The Prometheus text format of a replica's `/metrics`: read into
//! series, combined across replicas, written back.
//!
//! Combined series are what the fleet test compares the dashboard with:
//! the element-wise sum of the three replicas' series is what one process
//! would report had it served all their traffic, and the element-wise max
//! and min are what the dashboard's `max by` / `min by` panels must show.

use std::collections::BTreeMap;

/// Series by `name{label="value",...}` (labels sorted by name), each with
/// its value.
pub(crate) type Series = BTreeMap<String, f64>;

/// How series of the same name and labels are combined across replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Combine {
    Sum,
    Max,
    Min,
}

/// Every sample line of `text` (comments and `# TYPE`/`# HELP` skipped).
/// Panics on a line that is not `name{labels} value`.
pub(crate) fn parse(text: &str) -> Series {
    let mut out = Series::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = sample(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        out.insert(key, value);
    }
    out
}

/// One sample line: its canonical key and its value.
fn sample(line: &str) -> Result<(String, f64), String> {
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .ok_or("no value")?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let mut end = None;
        loop {
            // name="value" pairs, separated by commas, up to `}`.
            while chars.peek().is_some_and(|(_, c)| *c == ',' || *c == ' ') {
                chars.next();
            }
            match chars.peek() {
                Some((i, '}')) => {
                    end = Some(*i);
                    break;
                }
                None => break,
                _ => {}
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {key} without a quoted value"));
            }
            let mut value = String::new();
            let mut closed = false;
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => match chars.next().map(|(_, c)| c) {
                        Some('n') => value.push('\n'),
                        Some(other) => value.push(other),
                        None => break,
                    },
                    '"' => {
                        closed = true;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if !closed {
                return Err(format!("label {key}: unterminated value"));
            }
            labels.push((key.trim().to_owned(), value));
        }
        let end = end.ok_or("unterminated label set")?;
        rest = &body[end + 1..];
    }
    let value = rest.split_whitespace().next().ok_or("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().map_err(|e| format!("value {v:?}: {e}"))?,
    };
    labels.sort();
    Ok((key(name, &labels), value))
}

fn key(name: &str, labels: &[(String, String)]) -> String {
    if labels.is_empty() {
        return name.to_owned();
    }
    let pairs: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{name}{{{}}}", pairs.join(","))
}

/// The series of every replica combined: every name and label set any
/// replica has, with `how` applied to the values of the replicas that
/// have it (a series a replica lacks adds nothing to a sum, as in PromQL).
pub(crate) fn combine(replicas: &[Series], how: Combine) -> Series {
    let mut out = Series::new();
    for series in replicas {
        for (key, &value) in series {
            out.entry(key.clone())
                .and_modify(|acc: &mut f64| {
                    *acc = match how {
                        Combine::Sum => *acc + value,
                        Combine::Max => acc.max(value),
                        Combine::Min => acc.min(value),
                    }
                })
                .or_insert(value);
        }
    }
    out
}

/// `series` in the text format (no metadata: Prometheus takes untyped
/// samples, and `histogram_quantile` reads any series with an `le`).
pub(crate) fn render(series: &Series) -> String {
    let mut out = String::new();
    for (key, value) in series {
        let value = match *value {
            v if v == f64::INFINITY => "+Inf".to_owned(),
            v if v == f64::NEG_INFINITY => "-Inf".to_owned(),
            v if v.is_nan() => "NaN".to_owned(),
            v => v.to_string(),
        };
        out.push_str(&format!("{key} {value}\n"));
    }
    out
}

#[test]
fn reads_combines_and_writes_the_text_format() {
    let a =
        parse("# TYPE x counter\nx{b=\"2\",a=\"q\\\"uote\"} 3\nh_bucket{le=\"+Inf\"} 4\nup 1\n");
    let b = parse("x{a=\"q\\\"uote\",b=\"2\"} 5\nh_bucket{le=\"+Inf\"} 1\ng 7\n");
    assert_eq!(a["x{a=\"q\\\"uote\",b=\"2\"}"], 3.0);
    let sum = combine(&[a.clone(), b.clone()], Combine::Sum);
    assert_eq!(sum["x{a=\"q\\\"uote\",b=\"2\"}"], 8.0);
    assert_eq!(sum["h_bucket{le=\"+Inf\"}"], 5.0);
    assert_eq!(sum["up"], 1.0);
    assert_eq!(sum["g"], 7.0);
    assert_eq!(
        combine(&[a.clone(), b.clone()], Combine::Max)["h_bucket{le=\"+Inf\"}"],
        4.0
    );
    assert_eq!(combine(&[a, b], Combine::Min)["h_bucket{le=\"+Inf\"}"], 1.0);
    assert_eq!(parse(&render(&sum)), sum);
}
