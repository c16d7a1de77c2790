//! The `retryctl` command line.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use retryctl::policy::Policy;

/// `retryctl serve` allocates per request in hyper, reqwest and the pool
/// (header maps, boxed futures, buffers): with glibc's allocator, malloc
/// and free were ~13% of the gateway's instructions per proxied request.
/// mimalloc's thread-local free lists take 7% off the instructions per
/// request (callgrind, docs/benchmarks.md, "`retryctl serve` against
/// nginx"). Its v2 allocator (the workspace's `features = ["v2"]`): v3
/// takes every aligned request above 1 KiB, as this allocator makes them
/// all, down an over-allocating path (docs/benchmarks.md, "The gateway at
/// 44,400 instructions").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// retryctl: a retry layer for LLM inference gateways.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Faulty upstreams on loopback, the same traffic with and without
    /// retries, side by side (about 30 s).
    Demo(DemoArgs),
    /// Validate a policy file; print the effective policy (defaults filled in).
    Check {
        /// The policy file (TOML).
        path: PathBuf,
    },
    /// Print the default policy as TOML.
    Defaults,
    /// Run the reference OpenAI-compatible gateway (see
    /// config/gateway.toml); stops gracefully on SIGTERM or Ctrl-C.
    Serve {
        /// The gateway configuration (TOML).
        #[arg(long)]
        config: PathBuf,
    },
}

/// Options of `retryctl demo`.
#[derive(Debug, clap::Args)]
struct DemoArgs {
    /// Seed of the fault schedule (same seed, same faults).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Requests per second sent to each pool.
    #[arg(long, default_value_t = 200)]
    rps: u32,
    /// How long traffic runs (e.g. "30s", "2m").
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: std::time::Duration,
    /// The retry policy (default: the embedded defaults, as in
    /// config/policy.toml). The file is followed as the gateway follows
    /// it: an edit saved while the demo runs applies to the retrying side
    /// at once (a bad one is refused and the previous policy stays); the
    /// baseline and the connect timeout keep the policy read at start.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Cap on the policy's connect timeout for the loopback upstreams.
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    connect_timeout: std::time::Duration,
    /// Where to serve /metrics (loopback; port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics_addr: std::net::SocketAddr,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw failures per second over time as SVG here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Instead of the production faults: one scenario per adaptive option
    /// and one for the admission gate, the fixed policy against the option
    /// on the same faults, as a table (--seed applies; --json writes the
    /// reports).
    #[arg(long)]
    compare: bool,
    /// With --compare: only this scenario (latency_order, learned_delay,
    /// shadow, deadline_aware, attempt_timeout, budget, admission).
    #[arg(long, requires = "compare")]
    scenario: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo(args) => demo(args),
        Command::Check { path } => check(&path),
        Command::Serve { config } => serve(&config),
        Command::Defaults => {
            print!("{}", Policy::default().to_toml());
            ExitCode::SUCCESS
        }
    }
}

/// `retryctl check`: the same reading and validation as the live reload
/// (`retryctl::reload::read_policy_file`), so a file that passes here is a
/// file the watcher applies. An error reads `error: path:line:column:
/// message` (field, value, what is allowed), with the offending line and a
/// caret underneath.
fn check(path: &std::path::Path) -> ExitCode {
    match retryctl::reload::read_policy_file(path) {
        Ok(policy) => {
            println!("# {}: valid; effective policy:", path.display());
            if !policy.models.is_empty() {
                let names: Vec<String> = policy.models.keys().map(|m| format!("{m:?}")).collect();
                println!(
                    "# per-model overrides, each on top of the values above: {}",
                    names.join(", ")
                );
            }
            print!("{}", policy.to_toml());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            let location = e.policy_error().and_then(|p| p.location);
            if let (Some((line, column)), Ok(bytes)) = (location, std::fs::read(path)) {
                let text = String::from_utf8_lossy(&bytes);
                if let Some(source) = text.lines().nth(line.saturating_sub(1)) {
                    // Printable and bounded: the line may be binary garbage.
                    let source: String = source
                        .chars()
                        .take(200)
                        .map(|c| {
                            if c.is_control() && c != '\t' {
                                '\u{fffd}'
                            } else {
                                c
                            }
                        })
                        .collect();
                    let pad: String = source
                        .chars()
                        .take(column.saturating_sub(1))
                        .map(|c| if c == '\t' { '\t' } else { ' ' })
                        .collect();
                    let gutter = line.to_string().len();
                    eprintln!("{:gutter$} |", "");
                    eprintln!("{line} | {source}");
                    eprintln!("{:gutter$} | {pad}^", "");
                }
            }
            ExitCode::FAILURE
        }
    }
}

fn demo(args: DemoArgs) -> ExitCode {
    // The pool's `tracing` events (gates limited, down, recovered) on
    // stderr, only when asked for: the report is the demo's output.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    if args.compare {
        return compare(&args);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Install the recorder before the pools resolve their metrics.
        let metrics = retryctl_gateway::metrics_endpoint::serve(args.metrics_addr).or_else(|_| {
            let any = std::net::SocketAddr::new(args.metrics_addr.ip(), 0);
            retryctl_gateway::metrics_endpoint::serve(any)
        });
        match &metrics {
            Ok(m) => eprintln!("metrics: http://{}/metrics", m.local_addr()),
            Err(e) => eprintln!("metrics disabled: {e}"),
        }
        let config = retryctl_cli::demo::DemoConfig {
            seed: args.seed,
            rps: args.rps,
            duration: args.duration,
            policy: Policy::default(),
            policy_file: args.policy.clone(),
            connect_timeout: args.connect_timeout,
            progress: !args.quiet,
        };
        eprintln!(
            "faulty upstreams on loopback: seed {}, {} req/s per pool for {}; baseline = the same policy with max_rounds = 1 and no admission gate",
            config.seed,
            config.rps,
            humantime::format_duration(config.duration)
        );
        if let Some(path) = &args.policy {
            eprintln!(
                "following {}: edits apply to the retrying side as they are saved (the baseline and the connect timeout keep the policy read at start)",
                path.display()
            );
        }
        let report = match retryctl_cli::demo::run(&config).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("demo failed: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!("{}", report.table());
        if let Some(path) = &args.json {
            if let Err(e) = report.write_json(path) {
                eprintln!("{}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            eprintln!("report written to {}", path.display());
        }
        if let Some(path) = &args.plot {
            if let Err(e) = report.write_svg(path) {
                eprintln!("{}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            eprintln!("chart written to {}", path.display());
        }
        ExitCode::SUCCESS
    })
}

fn compare(args: &DemoArgs) -> ExitCode {
    use retryctl_cli::demo::compare;
    let scenarios: Vec<_> = compare::scenarios(args.seed)
        .into_iter()
        .filter(|s| args.scenario.as_deref().is_none_or(|name| s.name == name))
        .collect();
    if scenarios.is_empty() {
        let names: Vec<_> = compare::scenarios(args.seed)
            .iter()
            .map(|s| s.name)
            .collect();
        eprintln!("no such scenario; one of: {}", names.join(", "));
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let mut reports = Vec::new();
        for s in &scenarios {
            eprintln!(
                "{}: {} req/s for {}",
                s.name,
                s.rps,
                humantime::format_duration(s.duration)
            );
            match compare::run(s, args.connect_timeout).await {
                Ok(r) => reports.push(r),
                Err(e) => {
                    eprintln!("{}: {e}", s.name);
                    return ExitCode::FAILURE;
                }
            }
        }
        println!("{}", compare::table(args.seed, &reports));
        if let Some(path) = &args.json {
            let written = serde_json::to_string_pretty(&reports)
                .map_err(std::io::Error::other)
                .and_then(|text| std::fs::write(path, text));
            if let Err(e) = written {
                eprintln!("{}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
        ExitCode::SUCCESS
    })
}

/// The gateway's runtime: tokio's multi-thread scheduler, one worker per
/// CPU the process may use, unless that is one CPU (a container limited
/// to one, or a process pinned to one): then the current-thread scheduler,
/// which runs the same tasks on the same one thread without the
/// work-stealing machinery (run queues shared with idle workers that do
/// not exist, wake-ups routed through them) a lone worker still pays
/// for on every request.
fn serve_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Runtime::new()
    }
}

fn serve(path: &std::path::Path) -> ExitCode {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let config = match retryctl_gateway::GatewayConfig::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match serve_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(retryctl_gateway::run(config));
    // Connections still open after the drain are dropped here, without
    // waiting on a blocked DNS lookup.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
