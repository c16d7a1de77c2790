//! The Kubernetes manifests in `deploy/kubernetes/`, checked against the
//! Kubernetes and prometheus-operator schemas, against each other, and
//! against the repository files they carry.
//!
//! Without any tool:
//!
//! * The files embedded in the manifests are the repository's, byte for
//!   byte: the PrometheusRule's `spec` is `dashboards/alerts.yml`, the
//!   dashboard ConfigMap's `retryctl.json` is `dashboards/retryctl.json`,
//!   the config ConfigMap's `policy.toml` is `config/policy.toml`, and its
//!   `gateway.toml` is `config/gateway.toml` but for the lines that set
//!   the listeners and the providers' addresses. `embed.sh` writes exactly
//!   the committed files.
//! * The ConfigMap's files, laid out as the kubelet lays out a ConfigMap
//!   volume (`..data` symlink), parse with the real parsers
//!   (`Policy::from_toml` and `from_bytes`, `GatewayConfig::load`),
//!   `retryctl check` accepts the policy, a `Gateway` builds from them, and
//!   it follows a kubelet-style `..data` swap of the policy.
//!
//! With tools (skipped when missing, unless `RETRYCTL_REQUIRE_TOOLS=1`, set
//! by `.ci/run`, which installs them):
//!
//! * `kubernetes-validate --strict` (PyPI; the Kubernetes OpenAPI schemas,
//!   unknown fields refused) accepts every built-in object for Kubernetes
//!   1.30 (the oldest with the preStop `sleep` action on by default) and
//!   for the newest version it bundles.
//! * The ServiceMonitor and the PrometheusRule validate against
//!   prometheus-operator's CRD schemas (`crds.py`, with the PyPI package
//!   `cloudcoil.models.prometheus_operator`), unknown fields refused.
//! * `promtool check rules` and `promtool test rules` (with
//!   `dashboards/alerts.test.yml`) on the PrometheusRule's `spec` as
//!   written in the manifest.
//! * The objects fit together (read with PyYAML): selectors, port names,
//!   the ports the gateway binds, probes, the termination grace period
//!   against `shutdown_timeout`, the ConfigMap mounted as a directory, the
//!   security context, the API key variables, the kustomization's list.
//!
//! Each tool check also runs a broken copy of a manifest through the same
//! tool and expects it to be refused, so a check that no longer checks
//! fails.

#[path = "../../../../tests/prometheus/tools.rs"]
#[allow(dead_code)]
mod tools;

mod manifest;
mod volume;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use retryctl::policy::{LivePolicy, Policy};
use retryctl_gateway::{Gateway, GatewayConfig};
use serde_json::Value;

use manifest::{documents, find, literal_block, mapping_block};
use tools::{REQUIRE_TOOLS, describe, run};
use volume::ConfigMapVolume;

/// What `.ci/run` installs for these tests (and what a missing module
/// tells you to install).
const PIP_PACKAGES: &str =
    "kubernetes-validate==1.37.0 cloudcoil.models.prometheus_operator==0.80.1.0";

/// The oldest Kubernetes the manifests are for: the preStop `sleep`
/// action is on by default from 1.30 (beta) and is GA since 1.34.
const OLDEST_KUBERNETES: &str = "1.30.0";

/// The kubectl annotation that client-side `kubectl apply` keeps (the
/// whole object as JSON) is limited to 256 KiB.
const LAST_APPLIED_LIMIT: usize = 262_144;

/// Every manifest `kubectl apply -k` applies.
const MANIFESTS: &[&str] = &[
    "configmap.yaml",
    "deployment.yaml",
    "service.yaml",
    "poddisruptionbudget.yaml",
    "servicemonitor.yaml",
    "prometheusrule.yaml",
    "dashboard.yaml",
];

/// The repository's root.
fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// Writes past the test harness's capture: a skip must be seen.
fn note(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{text}");
}

/// `python3` if it imports every module in `modules`; `None` (after
/// saying so) when it does not and missing tools are allowed. Panics when
/// it does not and `RETRYCTL_REQUIRE_TOOLS=1`.
fn python(modules: &[&str], test: &str) -> Option<PathBuf> {
    let python = PathBuf::from("python3");
    let probe = Command::new(&python)
        .arg("-c")
        .arg(format!("import {}", modules.join(", ")))
        .output();
    let why = match probe {
        Ok(out) if out.status.success() => return Some(python),
        // The exception's last line: "ModuleNotFoundError: No module named ...".
        Ok(out) => String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or_default()
            .to_owned(),
        Err(e) => format!("python3: {e}"),
    };
    let required = std::env::var(REQUIRE_TOOLS).is_ok_and(|v| v == "1");
    assert!(
        !required,
        "{test}: python3 cannot import {modules:?} ({why}) and {REQUIRE_TOOLS}=1: \
         `python3 -m pip install {PIP_PACKAGES}`, as .ci/run does"
    );
    note(&format!(
        "SKIPPED {test}: python3 cannot import {modules:?} ({why}); \
         `python3 -m pip install {PIP_PACKAGES}`; set {REQUIRE_TOOLS}=1 to make this a failure"
    ));
    None
}

fn repo_file(path: &str) -> String {
    let full = root().join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("cannot read {}: {e}", full.display()))
}

/// The config ConfigMap's two files, taken out of the YAML text.
fn configmap_files() -> (String, String) {
    let yaml = manifest::read("configmap.yaml");
    let gateway =
        literal_block(&yaml, "  gateway.toml: |").expect("gateway.toml in configmap.yaml");
    let policy = literal_block(&yaml, "  policy.toml: |").expect("policy.toml in configmap.yaml");
    (gateway, policy)
}

/// The config keys whose lines the ConfigMap's gateway.toml may set
/// differently from config/gateway.toml: where the gateway listens and
/// where its providers are, seen from a pod.
const POD_ADDRESS_KEYS: &[&str] = &["listen", "metrics_listen", "base_url"];

/// The key a TOML line sets, if it sets one.
fn toml_key(line: &str) -> Option<&str> {
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    (!key.is_empty() && !key.starts_with('#') && !key.starts_with('[')).then_some(key)
}

// ------------------------------------------------------------ no tool needed

#[test]
fn the_manifests_carry_the_repository_files_byte_for_byte() {
    let rule = manifest::read("prometheusrule.yaml");
    let spec = mapping_block(&rule, "spec:").expect("spec in prometheusrule.yaml");
    assert!(
        spec == repo_file("dashboards/alerts.yml"),
        "the PrometheusRule's spec is not dashboards/alerts.yml: run `bash deploy/kubernetes/embed.sh`"
    );

    let dashboard = manifest::read("dashboard.yaml");
    let json =
        literal_block(&dashboard, "  retryctl.json: |").expect("retryctl.json in dashboard.yaml");
    assert!(
        json == repo_file("dashboards/retryctl.json"),
        "the dashboard ConfigMap is not dashboards/retryctl.json: run `bash deploy/kubernetes/embed.sh`"
    );

    let (gateway, policy) = configmap_files();
    assert!(
        policy == repo_file("config/policy.toml"),
        "the ConfigMap's policy.toml is not config/policy.toml: run `bash deploy/kubernetes/embed.sh`"
    );

    // gateway.toml: the repository's file, line for line, but for the
    // addresses a pod needs.
    let shipped = repo_file("config/gateway.toml");
    let (ours, theirs): (Vec<&str>, Vec<&str>) =
        (gateway.lines().collect(), shipped.lines().collect());
    assert_eq!(
        ours.len(),
        theirs.len(),
        "the ConfigMap's gateway.toml has other lines than config/gateway.toml: run `bash deploy/kubernetes/embed.sh`"
    );
    let mut adapted = BTreeSet::new();
    for (n, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        if a == b {
            continue;
        }
        let key = toml_key(a);
        assert!(
            key.is_some()
                && key == toml_key(b)
                && POD_ADDRESS_KEYS.contains(&key.unwrap_or_default()),
            "gateway.toml line {}: only {POD_ADDRESS_KEYS:?} may differ from config/gateway.toml:\n  ConfigMap: {a}\n  config/:   {b}",
            n + 1
        );
        adapted.insert(key.unwrap_or_default());
    }
    assert_eq!(
        adapted,
        POD_ADDRESS_KEYS.iter().copied().collect(),
        "every pod address is set for the cluster"
    );
    assert!(
        !gateway.contains("127.0.0.1") && !gateway.contains("localhost"),
        "a loopback address in a pod is the pod itself:\n{gateway}"
    );
}

#[test]
fn embed_sh_writes_the_committed_manifests() {
    let out = tempfile::tempdir().unwrap();
    let script = manifest::dir().join("embed.sh");
    let status = Command::new("bash")
        .arg(&script)
        .arg(out.path())
        .status()
        .expect("run bash");
    assert!(status.success(), "embed.sh failed: {status}");
    for name in ["configmap.yaml", "prometheusrule.yaml", "dashboard.yaml"] {
        let written = std::fs::read_to_string(out.path().join(name)).expect("written");
        assert!(
            written == manifest::read(name),
            "deploy/kubernetes/{name} is not what embed.sh writes: run `bash deploy/kubernetes/embed.sh`"
        );
    }
}

#[test]
fn the_configmap_policy_parses_and_retryctl_check_accepts_it() {
    let (gateway, policy) = configmap_files();
    let from_text = Policy::from_toml(&policy).unwrap_or_else(|e| panic!("policy.toml: {e}"));
    let from_bytes =
        Policy::from_bytes(policy.as_bytes()).unwrap_or_else(|e| panic!("policy.toml: {e}"));
    assert_eq!(from_text, from_bytes);

    // Through the volume's symlinks, as the gateway reads it in the pod.
    let volume = ConfigMapVolume::new(&[("gateway.toml", &gateway), ("policy.toml", &policy)]);
    let path = volume.path().join("policy.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_retryctl"))
        .arg("check")
        .arg(&path)
        .output()
        .expect("run retryctl check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "retryctl check refused the ConfigMap's policy.toml:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with(&format!("# {}: valid", path.display())),
        "{stdout}"
    );
    // What check prints is the effective policy: the file's, parsed.
    let printed = stdout
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        Policy::from_toml(&printed).expect("check prints a policy"),
        from_text
    );
}

#[test]
fn the_configmap_gateway_config_builds_a_gateway_that_follows_a_data_swap() {
    let (gateway_toml, policy) = configmap_files();
    let mut volume =
        ConfigMapVolume::new(&[("gateway.toml", &gateway_toml), ("policy.toml", &policy)]);
    let config = GatewayConfig::load(&volume.path().join("gateway.toml"))
        .unwrap_or_else(|e| panic!("the ConfigMap's gateway.toml: {e}"));
    // The relative policy path lands in the mounted directory.
    assert_eq!(
        config.policy.as_deref(),
        Some(&*volume.path().join("policy.toml"))
    );
    assert!(config.listen.ip().is_unspecified(), "{}", config.listen);
    let metrics = config.metrics_listen.expect("metrics on");
    assert!(metrics.ip().is_unspecified(), "{metrics}");

    // Every key the config names is given (as the Deployment's Secret
    // reference does).
    let keys: Vec<String> = config
        .providers
        .iter()
        .filter_map(|p| p.api_key_env.clone())
        .collect();
    let env = |name: &str| {
        keys.iter()
            .any(|k| k == name)
            .then(|| "sk-test-not-a-real-key".to_owned())
    };
    let gateway = Gateway::with_env(config, env)
        .unwrap_or_else(|e| panic!("Gateway from the ConfigMap: {e}"));

    let shipped = Policy::from_toml(&policy).unwrap();
    let version = |p: Policy| LivePolicy::new(p).unwrap().load().version();
    assert_eq!(gateway.policy().load().version(), version(shipped.clone()));

    // The kubelet's update: a new version directory, `..data` renamed.
    assert_eq!(
        policy.matches("\nmax_rounds = 2\n").count(),
        1,
        "policy.toml sets max_rounds = 2"
    );
    let edited = policy.replace("\nmax_rounds = 2\n", "\nmax_rounds = 3\n");
    volume.update(&[("gateway.toml", &gateway_toml), ("policy.toml", &edited)]);
    let want = version(Policy::from_toml(&edited).unwrap());
    let started = Instant::now();
    while gateway.policy().load().version() != want && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        gateway.policy().load().policy().max_rounds,
        3,
        "the ..data swap was not applied within 10 s"
    );
    note(&format!(
        "the ConfigMap's policy, swapped as the kubelet does, was in force after {:?}",
        started.elapsed()
    ));
}

// ------------------------------------------------------------------- tools

#[test]
fn the_manifests_validate_against_the_kubernetes_schemas() {
    const TEST: &str = "the_manifests_validate_against_the_kubernetes_schemas";
    let Some(python) = python(&["kubernetes_validate", "yaml"], TEST) else {
        return;
    };
    let docs = documents(&python, MANIFESTS);
    let crd = |d: &Value| {
        d["apiVersion"]
            .as_str()
            .is_some_and(|v| v.starts_with("monitoring.coreos.com/"))
    };
    let builtin: BTreeSet<String> = docs
        .iter()
        .filter(|(_, d)| !crd(d))
        .map(|(_, d)| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap().to_lowercase(),
                d["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(builtin.len(), 5, "{builtin:?}");

    for version in [Some(OLDEST_KUBERNETES), None] {
        let mut args = vec!["-m", "kubernetes_validate", "--strict"];
        if let Some(v) = version {
            args.extend(["-k", v]);
        }
        args.extend(MANIFESTS);
        let out = run(&python, &args, &manifest::dir(), None);
        let log = describe(&python, &args, &out);
        note(&log);
        assert!(out.status.success(), "{log}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let passed: BTreeSet<String> = stdout
            .lines()
            .filter_map(|l| l.split(" passed for resource ").nth(1))
            .filter_map(|rest| rest.split(' ').next())
            .map(str::to_owned)
            .collect();
        assert_eq!(passed, builtin, "every built-in object validated:\n{log}");
        // The two CRD kinds are not in Kubernetes' schemas: warned about
        // here, validated by the next test.
        let warned = stdout.lines().filter(|l| l.starts_with("WARN")).count();
        assert_eq!(warned, 2, "{log}");
        assert!(!stdout.contains("ERROR"), "{log}");
    }

    // The check can fail: an unknown field in the pod spec, and the
    // preStop sleep on a Kubernetes that does not have it.
    let dir = tempfile::tempdir().unwrap();
    let broken = manifest::read("deployment.yaml").replace(
        "      enableServiceLinks: false\n",
        "      enableServiceLinks: false\n      terminationGracePeriod: 45\n",
    );
    std::fs::write(dir.path().join("deployment.yaml"), broken).unwrap();
    let args = ["-m", "kubernetes_validate", "--strict", "deployment.yaml"];
    let out = run(&python, &args, dir.path(), None);
    assert!(!out.status.success(), "{}", describe(&python, &args, &out));
    let args = [
        "-m",
        "kubernetes_validate",
        "--strict",
        "-k",
        "1.28.0",
        "deployment.yaml",
    ];
    let out = run(&python, &args, &manifest::dir(), None);
    let log = describe(&python, &args, &out);
    assert!(
        !out.status.success() && log.contains("'sleep' was unexpected"),
        "{log}"
    );
}

#[test]
fn the_prometheus_operator_resources_validate_against_the_crds() {
    const TEST: &str = "the_prometheus_operator_resources_validate_against_the_crds";
    let Some(python) = python(
        &["yaml", "pydantic", "cloudcoil.models.prometheus_operator"],
        TEST,
    ) else {
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kubernetes/crds.py");
    let script = script.to_str().expect("a UTF-8 path");
    let args = [script, "servicemonitor.yaml", "prometheusrule.yaml"];
    let out = run(&python, &args, &manifest::dir(), None);
    let log = describe(&python, &args, &out);
    note(&log);
    assert!(out.status.success(), "{log}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("OK servicemonitor.yaml: ServiceMonitor/retryctl"),
        "{log}"
    );
    assert!(
        stdout.contains("OK prometheusrule.yaml: PrometheusRule/retryctl"),
        "{log}"
    );

    // The check can fail: a field the CRD does not have, a duration in
    // the wrong format, a rule without its expression.
    let dir = tempfile::tempdir().unwrap();
    let monitor = manifest::read("servicemonitor.yaml");
    let rule = manifest::read("prometheusrule.yaml");
    let broken = [
        (
            "unknown.yaml",
            monitor.replace(
                "      path: /metrics\n",
                "      path: /metrics\n      scrapeEvery: 15s\n",
            ),
            "scrapeEvery (not in the CRD)",
        ),
        (
            "interval.yaml",
            monitor.replace("interval: 15s", "interval: 15 seconds"),
            "interval",
        ),
        (
            "expr.yaml",
            rule.replacen("        expr: |", "        exp: |", 1),
            "rules.0.expr",
        ),
    ];
    let mut args = vec![script];
    for (name, text, _) in &broken {
        std::fs::write(dir.path().join(name), text).unwrap();
        args.push(name);
    }
    let out = run(&python, &args, dir.path(), None);
    let log = describe(&python, &args, &out);
    assert!(!out.status.success(), "{log}");
    for (name, _, why) in &broken {
        let line = log
            .lines()
            .find(|l| l.starts_with(&format!("ERROR {name}")))
            .unwrap_or_else(|| panic!("{name} was not refused:\n{log}"));
        assert!(line.contains(why), "{name}: {line}\n{log}");
    }
}

#[test]
fn the_prometheusrule_passes_promtool() {
    const TEST: &str = "the_prometheusrule_passes_promtool";
    let Some(promtool) = tools::require("promtool", TEST) else {
        return;
    };
    // The rules as the manifest carries them, next to their unit tests.
    let dir = tempfile::tempdir().unwrap();
    let spec = mapping_block(&manifest::read("prometheusrule.yaml"), "spec:").unwrap();
    std::fs::write(dir.path().join("alerts.yml"), &spec).unwrap();
    std::fs::copy(
        root().join("dashboards/alerts.test.yml"),
        dir.path().join("alerts.test.yml"),
    )
    .unwrap();
    let alerts = spec
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    assert!(alerts >= 10, "{alerts} alerts in the PrometheusRule");

    let args = ["check", "rules", "alerts.yml"];
    let out = run(&promtool, &args, dir.path(), None);
    let log = describe(&promtool, &args, &out);
    note(&log);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains(&format!("SUCCESS: {alerts} rules found")),
        "{log}"
    );

    let args = ["test", "rules", "alerts.test.yml"];
    let out = run(&promtool, &args, dir.path(), None);
    let log = describe(&promtool, &args, &out);
    assert!(out.status.success(), "{log}");

    // The check can fail.
    std::fs::write(
        dir.path().join("alerts.yml"),
        spec.replacen("sum by (model)", "sum by model", 1),
    )
    .unwrap();
    let args = ["check", "rules", "alerts.yml"];
    let out = run(&promtool, &args, dir.path(), None);
    assert!(
        !out.status.success(),
        "{}",
        describe(&promtool, &args, &out)
    );
}

/// `labels` holds every `key: value` of `selector`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let selector = selector.as_object().expect("matchLabels");
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A field given in whole seconds.
fn seconds(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("a number of seconds: {v}"))
}

#[test]
fn the_objects_fit_together() {
    const TEST: &str = "the_objects_fit_together";
    let Some(python) = python(&["yaml"], TEST) else {
        return;
    };
    let mut names = MANIFESTS.to_vec();
    names.push("kustomization.yaml");
    let docs = documents(&python, &names);

    // The kustomization applies every manifest of the folder, and only those.
    let kustomization = &docs
        .iter()
        .find(|(file, _)| file == "kustomization.yaml")
        .expect("kustomization.yaml")
        .1;
    let listed: BTreeSet<&str> = kustomization["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    let on_disk: BTreeSet<String> = std::fs::read_dir(manifest::dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(
        listed,
        on_disk.iter().map(String::as_str).collect(),
        "kustomization.yaml resources"
    );
    assert_eq!(listed, MANIFESTS.iter().copied().collect());

    // What the parser reads is what the text reader took out.
    let config = find(&docs, "ConfigMap", "retryctl-config");
    let (gateway_text, policy_text) = configmap_files();
    assert_eq!(config["data"]["gateway.toml"], gateway_text.as_str());
    assert_eq!(config["data"]["policy.toml"], policy_text.as_str());
    let dashboard = find(&docs, "ConfigMap", "retryctl-dashboard");
    assert_eq!(
        dashboard["metadata"]["labels"]["grafana_dashboard"], "1",
        "the sidecar's label, a string"
    );
    assert_eq!(
        dashboard["data"]["retryctl.json"],
        repo_file("dashboards/retryctl.json").as_str()
    );
    let rule = find(&docs, "PrometheusRule", "retryctl");
    let alerts = documents(&python, &["../../dashboards/alerts.yml"]);
    assert_eq!(
        rule["spec"], alerts[0].1,
        "the PrometheusRule's spec is alerts.yml"
    );

    // Client-side `kubectl apply` stores each object in an annotation.
    for (file, doc) in &docs {
        let size = serde_json::to_string(doc).unwrap().len();
        assert!(
            size < LAST_APPLIED_LIMIT,
            "{file}: {size} bytes: too large for `kubectl apply`"
        );
    }

    let gateway = GatewayConfig::from_toml(&gateway_text).expect("the ConfigMap's gateway.toml");
    let deployment = find(&docs, "Deployment", "retryctl");
    let spec = &deployment["spec"];
    let pod = &spec["template"]["spec"];
    let pod_labels = &spec["template"]["metadata"]["labels"];
    assert_eq!(spec["replicas"], 3);
    assert!(
        selects(&spec["selector"]["matchLabels"], pod_labels),
        "the Deployment selects its pods"
    );
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let port = |name: &str| -> u64 {
        c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("containerPort {name:?}"))
    };
    // The ports the gateway binds are the ports the pod declares.
    assert_eq!(port("http"), u64::from(gateway.listen.port()));
    assert_eq!(
        port("metrics"),
        u64::from(gateway.metrics_listen.unwrap().port())
    );

    // The config: the whole ConfigMap as a directory, the gateway started
    // on its gateway.toml, whose policy.toml sits beside it.
    let command: Vec<&str> = c["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let at = command
        .iter()
        .position(|a| *a == "--config")
        .expect("--config");
    assert_eq!(command[..at], ["retryctl", "serve"]);
    let config_path = Path::new(command[at + 1]);
    let mounts = c["volumeMounts"].as_array().expect("volumeMounts");
    assert!(
        mounts
            .iter()
            .all(|m| m.get("subPath").is_none() && m.get("subPathExpr").is_none()),
        "no subPath: its files never update"
    );
    let mount = mounts
        .iter()
        .find(|m| Path::new(m["mountPath"].as_str().unwrap()) == config_path.parent().unwrap())
        .expect("the config file's directory is a mount");
    assert_eq!(mount["readOnly"], true);
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mount's volume");
    assert_eq!(volume["configMap"]["name"], config["metadata"]["name"]);
    assert!(
        config["data"]
            .get(config_path.file_name().unwrap().to_str().unwrap())
            .is_some()
    );
    let policy = gateway.policy.as_deref().expect("a policy file");
    assert!(
        policy.is_relative() && policy.parent() == Some(Path::new("")),
        "policy = a file beside gateway.toml: {policy:?}"
    );
    assert!(config["data"].get(policy.to_str().unwrap()).is_some());

    // Every API key variable the config names is set from the Secret.
    for key in gateway
        .providers
        .iter()
        .filter_map(|p| p.api_key_env.as_deref())
    {
        let env = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == key);
        let secret = env
            .map(|e| &e["valueFrom"]["secretKeyRef"])
            .unwrap_or_else(|| panic!("env {key} for api_key_env"));
        assert_eq!(secret["key"], key);
    }

    // Probes on the gateway's /healthz.
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["path"], "/healthz", "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], "http", "{probe}");
    }

    // Termination: preStop keeps serving while the pod leaves every
    // endpoint list, then SIGTERM drains for up to shutdown_timeout; the
    // grace period covers both, the runtime's last second, and a margin.
    let pre_stop = seconds(&c["lifecycle"]["preStop"]["sleep"]["seconds"]);
    assert!((5..=30).contains(&pre_stop), "preStop sleep {pre_stop} s");
    let grace = seconds(&pod["terminationGracePeriodSeconds"]);
    let drain = gateway.shutdown_timeout.as_secs();
    let margin = grace.checked_sub(pre_stop + drain).unwrap_or_else(|| {
        panic!(
            "terminationGracePeriodSeconds {grace} < preStop {pre_stop} + shutdown_timeout {drain}"
        )
    });
    assert!(
        (2..=30).contains(&margin),
        "margin {margin} s past preStop + shutdown_timeout"
    );

    // Resources and the security context.
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                c["resources"][kind][resource].is_string(),
                "resources.{kind}.{resource}"
            );
        }
    }
    let security = &c["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert!(
        pod["securityContext"]["runAsUser"]
            .as_u64()
            .is_some_and(|u| u > 0)
    );

    // The Service reaches the pods on both named ports.
    let service = find(&docs, "Service", "retryctl");
    assert!(
        selects(&service["spec"]["selector"], pod_labels),
        "the Service selects the pods"
    );
    let service_ports = service["spec"]["ports"].as_array().unwrap();
    for p in service_ports {
        let target = p["targetPort"].as_str().expect("a named targetPort");
        port(target);
    }

    // The ServiceMonitor selects the Service, and its port is the metrics.
    let monitor = find(&docs, "ServiceMonitor", "retryctl");
    assert!(
        selects(
            &monitor["spec"]["selector"]["matchLabels"],
            &service["metadata"]["labels"]
        ),
        "the ServiceMonitor selects the Service"
    );
    let endpoints = monitor["spec"]["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 1);
    let scraped = service_ports
        .iter()
        .find(|p| p["name"] == endpoints[0]["port"])
        .expect("the ServiceMonitor's port is a Service port name");
    assert_eq!(scraped["targetPort"], "metrics");
    assert_eq!(endpoints[0]["path"], "/metrics");
    // No other Service carries the labels it selects (one job, no duplicates).
    let services = docs.iter().filter(|(_, d)| d["kind"] == "Service").count();
    assert_eq!(services, 1);

    let budget = find(&docs, "PodDisruptionBudget", "retryctl");
    assert!(selects(
        &budget["spec"]["selector"]["matchLabels"],
        pod_labels
    ));
    assert!(
        budget["spec"]["minAvailable"]
            .as_u64()
            .is_some_and(|m| (1..3).contains(&m))
    );
}
