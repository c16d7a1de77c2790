//! Outside input creates no metric series.
//!
//! A client can put anything in a request's `model`. If that text became a
//! label value, every distinct name would be a new series in every scrape:
//! a memory leak in the gateway and in Prometheus, and a way for anyone to
//! write into the operator's dashboards. The pool counts unknown models in
//! one unlabelled counter; these tests drive 10,000 random names through
//! the real gateway and compare the rendered `/metrics` before and after.

use std::collections::{BTreeMap, BTreeSet};

use crate::support::{HttpServer, Reply};
use crate::{KEY_ENV, fast_policy, start};

const MODELS: [&str; 2] = ["openai/gpt-oss-120b", "small"];
const PROVIDERS: [&str; 2] = ["vllm-a", "proxy-b"];

/// `name{labels}` of every sample line, and every `# TYPE` line.
fn series(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && (!l.starts_with('#') || l.starts_with("# TYPE")))
        .map(|l| match l.starts_with('#') {
            true => l.to_owned(),
            false => l.rsplit_once(' ').map_or(l, |(s, _)| s).to_owned(),
        })
        .collect()
}

/// The labels of one series, `name{a="x",b="y"}`, escapes decoded.
fn labels(series: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Some(open) = series.find('{') else {
        return out;
    };
    let mut rest = &series[open + 1..];
    while let Some(eq) = rest.find("=\"") {
        let key = rest[..eq].trim_start_matches(',').to_owned();
        let mut value = String::new();
        let mut chars = rest[eq + 2..].char_indices();
        let mut end = 0;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, e)) = chars.next() {
                        value.push(if e == 'n' { '\n' } else { e });
                    }
                }
                '"' => {
                    end = eq + 2 + i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(key, value);
        rest = &rest[end..];
    }
    out
}

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A random model name of one of the shapes a client (or an attacker)
/// might send. Unique: each carries `i`.
fn random_model(i: usize) -> String {
    let alnum = |n: usize| -> String {
        std::iter::repeat_with(fastrand::alphanumeric)
            .take(n)
            .collect()
    };
    match i % 9 {
        0 => format!("{}-{i}", alnum(fastrand::usize(1..40))),
        1 => format!("sk-{}{i}", alnum(32)),
        2 => format!(
            "10.{}.{}.{}:{i}",
            fastrand::u8(..),
            fastrand::u8(..),
            fastrand::u8(..)
        ),
        3 => format!("http://user:pw@10.0.0.{}:8000/v1?i={i}", fastrand::u8(..)),
        4 => format!("模型-ü-🙂-{i}"),
        // Text that would break out of a label value if it were one.
        5 => format!("a\"}},model=\"evil{i}\"\\\n# TYPE x counter"),
        6 => format!("{}{i}", "x".repeat(fastrand::usize(300..3000))),
        // A configured name in another case, or with spaces: still unknown.
        7 => format!("{} {i}", MODELS[0].to_uppercase()),
        _ => format!("{}\t{i}", MODELS[1]),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_unknown_models_create_no_series() {
    let ok = HttpServer::always(Reply::json("{\"ok\":true}")).await;
    let failing = HttpServer::always(
        Reply::status(500)
            .header("Content-Type", "application/json")
            .body("{\"error\":{\"message\":\"model=\\\"injected\\\" from upstream\"}}"),
    )
    .await;
    let config = format!(
        "[providers.{p0}]\nbase_url = \"{ok}/v1\"\n\
         [providers.{p1}]\nbase_url = \"{failing}/v1\"\napi_key_env = \"{KEY_ENV}\"\n\
         [[models]]\nname = \"{m0}\"\nproviders = [\"{p1}\", \"{p0}\"]\n\
         [[models]]\nname = \"{m1}\"\nproviders = [\"{p0}\"]\n",
        p0 = PROVIDERS[0],
        p1 = PROVIDERS[1],
        m0 = MODELS[0],
        m1 = MODELS[1],
        ok = ok.url(),
        failing = failing.url(),
    );
    let gw = start(&config, fast_policy()).await;
    let post = |model: &str| {
        let body = serde_json::json!({"model": model, "messages": []}).to_string();
        gw.answer_to("/v1/chat/completions", body)
    };
    // Every configured route has answered: its series exist.
    for model in MODELS {
        assert_eq!(post(model).await.status, 200);
    }
    let before_text = gw.metrics.render();
    let before = series(&before_text);
    assert!(!before.is_empty());

    const REQUESTS: usize = 10_000;
    const WORKERS: usize = 16;
    let names: Vec<String> = (0..REQUESTS).map(random_model).collect();
    let mut set = tokio::task::JoinSet::new();
    for w in 0..WORKERS {
        let client = gw.client.clone();
        let url = gw.url("/v1/chat/completions");
        let mine: Vec<String> = names.iter().skip(w).step_by(WORKERS).cloned().collect();
        set.spawn(async move {
            for model in mine {
                let body = serde_json::json!({"model": model, "messages": []}).to_string();
                let r = client.post(&url).body(body).send().await.expect("answer");
                assert_eq!(r.status(), 404, "{model:?}");
                r.bytes().await.expect("body");
            }
        });
    }
    while let Some(done) = set.join_next().await {
        done.expect("worker");
    }
    let after_text = gw.metrics.render();
    let after = series(&after_text);
    let added: Vec<_> = after.difference(&before).collect();
    let removed: Vec<_> = before.difference(&after).collect();
    assert!(
        added.is_empty() && removed.is_empty(),
        "series added {added:#?}, removed {removed:#?}"
    );
    assert_eq!(
        value(&after_text, "retryctl_unknown_model_requests_total"),
        Some(REQUESTS as f64)
    );
    for name in &names {
        assert!(
            !after_text.contains(name.as_str()),
            "{name:?} in the metrics"
        );
    }
    assert!(!after_text.contains("evil") && !after_text.contains("injected"));

    // Label values come from the configuration or from fixed sets only.
    for s in &after {
        if s.starts_with('#') {
            continue;
        }
        for (label, value) in labels(s) {
            let ok = match label.as_str() {
                "model" => MODELS.contains(&value.as_str()),
                "provider" => PROVIDERS.contains(&value.as_str()),
                // fixed sets, the adaptive decisions and admission events included
                "outcome" | "reason" | "result" | "decision" | "source" | "effect" | "event" => {
                    value
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit())
                }
                "le" | "quantile" => value == "+Inf" || value.parse::<f64>().is_ok(),
                // The policy's version (`retryctl_policy_info`).
                "hash" => value.len() == 16 && value.bytes().all(|b| b.is_ascii_hexdigit()),
                _ => false,
            };
            assert!(ok, "label {label}={value:?} in {s}");
        }
    }
    assert_eq!(
        ok.hits() + failing.hits(),
        3,
        "no unknown model reached an upstream"
    );
}
