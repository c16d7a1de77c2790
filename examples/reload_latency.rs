//! How long a policy file change takes to be in force, with the default
//! reload options (150 ms debounce, 20 ms settle): write -> applied, over
//! 50 writes for each way a file is replaced.
//!
//! ```sh
//! cargo run --release --example reload_latency
//! ```
//!
//! Each write waits for the previous one to be applied and for its trailing
//! events to pass, so every sample is one independent change.

use std::path::Path;
use std::time::{Duration, Instant};

use retryctl::policy::LivePolicy;
use retryctl::reload::{PolicyWatcher, ReloadOptions};

const WRITES: u32 = 50;

fn policy_text(n: u32) -> String {
    format!("[budget]\nmin_per_second = {n}\n")
}

/// Writes policy `n` with `write`, then spins until it is in force.
fn measure(
    live: &LivePolicy,
    n: u32,
    write: &dyn Fn(u32),
) -> Result<Duration, Box<dyn std::error::Error>> {
    let start = Instant::now();
    write(n);
    while live.load().policy().budget.min_per_second != n {
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!("policy {n} not applied within 10 s").into());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(start.elapsed())
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples.get(i).copied().unwrap_or_default().as_secs_f64() * 1e3
    };
    println!(
        "{name:<24} n={:<3} min {:6.1} ms  median {:6.1} ms  p90 {:6.1} ms  max {:6.1} ms",
        samples.len(),
        at(0.0),
        at(0.5),
        at(0.9),
        at(1.0)
    );
}

fn run(
    name: &str,
    dir: &Path,
    setup: &dyn Fn(&Path),
    write: &dyn Fn(u32),
) -> Result<(), Box<dyn std::error::Error>> {
    setup(dir);
    let live = LivePolicy::default();
    let _watcher = PolicyWatcher::start(
        dir.join("policy.toml"),
        live.clone(),
        ReloadOptions::default(),
    )?;
    let mut samples = Vec::new();
    for n in 1..=WRITES {
        samples.push(measure(&live, n, write)?);
        std::thread::sleep(Duration::from_millis(300));
    }
    report(name, samples);
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().to_owned();

    let in_place = root.join("in-place");
    let file = in_place.join("policy.toml");
    run(
        "in-place write",
        &in_place,
        &|d| {
            std::fs::create_dir_all(d).ok();
            std::fs::write(d.join("policy.toml"), policy_text(0)).ok();
        },
        &|n| {
            std::fs::write(&file, policy_text(n)).ok();
        },
    )?;

    let renamed = root.join("rename");
    let file = renamed.join("policy.toml");
    let tmp = renamed.join(".policy.toml.swp");
    run(
        "write temp + rename",
        &renamed,
        &|d| {
            std::fs::create_dir_all(d).ok();
            std::fs::write(d.join("policy.toml"), policy_text(0)).ok();
        },
        &|n| {
            std::fs::write(&tmp, policy_text(n)).ok();
            std::fs::rename(&tmp, &file).ok();
        },
    )?;

    #[cfg(unix)]
    {
        use std::os::unix::fs::symlink;
        let k8s = root.join("configmap");
        let k = k8s.clone();
        run(
            "kubernetes ..data swap",
            &k8s,
            &|d| {
                std::fs::create_dir_all(d.join("..v0")).ok();
                std::fs::write(d.join("..v0/policy.toml"), policy_text(0)).ok();
                symlink("..v0", d.join("..data")).ok();
                symlink("..data/policy.toml", d.join("policy.toml")).ok();
            },
            &|n| {
                let version = format!("..v{n}");
                std::fs::create_dir_all(k.join(&version)).ok();
                std::fs::write(k.join(&version).join("policy.toml"), policy_text(n)).ok();
                symlink(&version, k.join("..data_tmp")).ok();
                std::fs::rename(k.join("..data_tmp"), k.join("..data")).ok();
                std::fs::remove_dir_all(k.join(format!("..v{}", n - 1))).ok();
            },
        )?;
    }
    Ok(())
}
