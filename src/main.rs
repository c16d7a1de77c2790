//! The `retryctl` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use retryctl::Policy;

/// retryctl: a retry layer for LLM inference gateways.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a policy file; print the effective policy (defaults filled in).
    Check {
        /// The policy file (TOML).
        path: PathBuf,
    },
    /// Print the default policy as TOML.
    Defaults,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { path } => check(&path),
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
