//! Finding `promtool` and `prometheus`, and running them.
//!
//! A test that needs a tool calls [`require`]: when the tool is missing it
//! prints why it skips to stderr and gets `None`, unless
//! `RETRYCTL_REQUIRE_TOOLS=1` (set by `.ci/run`), in which case a missing
//! tool is a failure.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The variable that turns a missing tool from a skip into a failure.
pub(crate) const REQUIRE_TOOLS: &str = "RETRYCTL_REQUIRE_TOOLS";

/// The crate's root: every path in these tests is relative to it.
pub(crate) fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The dashboards folder.
pub(crate) fn dashboards() -> PathBuf {
    root().join("dashboards")
}

/// `name`'s full path if it is an executable file in `PATH`.
fn find_in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The path of `tool`, or `None` (after saying so on stderr) when it is not
/// installed and missing tools are allowed. Panics when it is missing and
/// `RETRYCTL_REQUIRE_TOOLS=1`.
pub(crate) fn require(tool: &str, test: &str) -> Option<PathBuf> {
    if let Some(path) = find_in_path(tool) {
        return Some(path);
    }
    let required = std::env::var(REQUIRE_TOOLS).is_ok_and(|v| v == "1");
    assert!(
        !required,
        "{test}: `{tool}` is not in PATH and {REQUIRE_TOOLS}=1: install it \
         (Debian: `apt-get install prometheus`, as .ci/run does)"
    );
    // Straight to the process's stderr: the test harness captures
    // `eprintln!` of passing tests, and a skip must be seen.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: `{tool}` is not in PATH (Debian: `apt-get install prometheus`); \
         set {REQUIRE_TOOLS}=1 to make this a failure"
    );
    None
}

/// Runs `program args` in `dir`, with `stdin` as its standard input, and
/// returns its output (never fails on a non-zero exit: the caller asserts).
pub(crate) fn run(program: &Path, args: &[&str], dir: &Path, stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        pipe.write_all(input)
            .unwrap_or_else(|e| panic!("cannot write to {}: {e}", program.display()));
        // Dropping the pipe closes it: the tool sees EOF.
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("cannot wait for {}: {e}", program.display()))
}

/// The command line and both output streams, for assertion messages and
/// for the test log.
pub(crate) fn describe(program: &Path, args: &[&str], out: &Output) -> String {
    format!(
        "$ {} {}\nexit: {}\n--- stdout\n{}--- stderr\n{}",
        program.display(),
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    )
}
