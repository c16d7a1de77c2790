//! `retryctl serve --config PATH` as a process: refused configurations,
//! a missing key, serving with metrics, and a clean stop on SIGTERM.

use std::net::SocketAddr;
use std::time::Duration;

use retryctl_testkit::{HttpServer, Reply};

#[path = "../../../gateway/tests/fixtures/mod.rs"]
mod fixtures;
use fixtures::{COMPLETION, MODEL, POLICY, chat_body, config_text};

fn retryctl() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_retryctl"));
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn run_to_end(cmd: &mut tokio::process::Command) -> (i32, String) {
    let out = tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .expect("exits")
        .expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn cli_refuses_an_invalid_config_with_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:0\"\n\n[providers.a]\nbase_url = \"ftp://10.0.0.1/v1\"\n\n\
         [[models]]\nname = \"m\"\nproviders = [\"a\"]\n",
    )
    .unwrap();
    let (code, stderr) = run_to_end(retryctl().args(["serve", "--config"]).arg(&path)).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("gateway.toml: line 4, column 12"),
        "{stderr}"
    );
    assert!(stderr.contains("`providers.a.base_url`"), "{stderr}");
    let (code, stderr) =
        run_to_end(retryctl().args(["serve", "--config", "/nonexistent/gateway.toml"])).await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains("/nonexistent/gateway.toml: cannot read"),
        "{stderr}"
    );
}

#[tokio::test]
async fn cli_refuses_to_start_without_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    let text = config_text(
        &["http://127.0.0.1:9".to_owned()],
        "listen = \"127.0.0.1:0\"\nmetrics_listen = \"off\"",
        "api_key_env = \"RETRYCTL_CLI_TEST_KEY\"",
        "",
    );
    std::fs::write(&path, text).unwrap();
    let mut cmd = retryctl();
    cmd.args(["serve", "--config"])
        .arg(&path)
        .env_remove("RETRYCTL_CLI_TEST_KEY");
    let (code, stderr) = run_to_end(&mut cmd).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("RETRYCTL_CLI_TEST_KEY (api_key_env) is not set"),
        "{stderr}"
    );
}

/// Reads the child's stderr until a line contains `marker`; returns the
/// value of `addr=` on that line.
async fn wait_for_addr(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>,
    marker: &str,
    seen: &mut String,
) -> SocketAddr {
    loop {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no {marker:?} line in time:\n{seen}"))
            .unwrap()
            .unwrap_or_else(|| panic!("stderr ended before {marker:?}:\n{seen}"));
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(marker) {
            let addr = line.split("addr=").nth(1).expect("addr field");
            return addr
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .expect("an address");
        }
    }
}

#[tokio::test]
async fn cli_serves_with_metrics_and_stops_on_sigterm() {
    use tokio::io::AsyncBufReadExt;
    const KEY: &str = "cli-key-0987654321";
    let upstream = HttpServer::always(Reply::json(COMPLETION)).await;
    let dir = tempfile::tempdir().unwrap();
    // A relative policy path is resolved against the config's directory.
    std::fs::write(dir.path().join("policy.toml"), POLICY).unwrap();
    let path = dir.path().join("gateway.toml");
    let text = config_text(
        &[upstream.url()],
        "listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\npolicy = \"policy.toml\"",
        "api_key_env = \"RETRYCTL_CLI_KEY\"",
        "",
    );
    std::fs::write(&path, text).unwrap();
    let mut child = retryctl()
        .args(["serve", "--config"])
        .arg(&path)
        .env("RETRYCTL_CLI_KEY", KEY)
        .env("RUST_LOG", "info")
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    let metrics = wait_for_addr(&mut lines, "metrics on /metrics", &mut seen).await;
    let listen = wait_for_addr(&mut lines, "gateway listening", &mut seen).await;

    let client = reqwest::Client::new();
    let r = client
        .post(format!("http://{listen}/v1/chat/completions"))
        .body(chat_body(false).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), COMPLETION);
    assert_eq!(
        upstream.requests()[0].header("authorization"),
        Some(&*format!("Bearer {KEY}"))
    );
    // The recorder was installed before the pool resolved its handles.
    let text = client
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let served = format!(
        "retryctl_requests_total{{model=\"{MODEL}\",outcome=\"success_first_try\",reason=\"none\"}} 1"
    );
    assert!(text.contains(&served), "{text}");
    // The runtime's live tasks: at least this gauge's own and the metrics
    // server's; a handful with one keep-alive client.
    let tasks: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("retryctl_runtime_alive_tasks "))
        .unwrap_or_else(|| panic!("no task gauge in {text}"))
        .trim()
        .parse()
        .unwrap();
    assert!((2.0..100.0).contains(&tasks), "{tasks}");

    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    while let Ok(Some(line)) = lines.next_line().await {
        seen.push_str(&line);
        seen.push('\n');
    }
    assert_eq!(exit.code(), Some(0), "{seen}");
    assert!(seen.contains("shutting down"), "{seen}");
    assert!(!seen.contains(KEY), "{seen}");
}
