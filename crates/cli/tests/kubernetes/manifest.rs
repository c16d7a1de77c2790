//! Reading the manifests in `deploy/kubernetes/`.
//!
//! Two readers, on purpose:
//!
//! * [`literal_block`] and [`mapping_block`] take an embedded file out of
//!   the YAML *text* (the lines of a `key: |` block, or of a mapping,
//!   without their indentation). No tool is needed, and what they return
//!   is compared byte for byte with the repository's file.
//! * [`documents`] parses the files with a real YAML parser (PyYAML, which
//!   `kubernetes-validate` is built on) and hands them over as JSON, for
//!   the structural checks; the same checks compare what the parser sees
//!   with what the text reader took out, so neither can drift.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// `deploy/kubernetes/`.
pub(crate) fn dir() -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/kubernetes"
    ))
    .to_owned()
}

/// A manifest's text.
pub(crate) fn read(name: &str) -> String {
    let path = dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Leading spaces of `line`.
fn indentation(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

fn is_blank(line: &str) -> bool {
    line.trim().is_empty()
}

/// The content of the literal block scalar opened by the line `header`
/// (for instance `  policy.toml: |`, compared without trailing spaces):
/// the following lines indented deeper than the header, less the block's
/// indentation (that of its first non-empty line), with YAML's default
/// "clip" chomping (one final line break, trailing empty lines dropped).
pub(crate) fn literal_block(yaml: &str, header: &str) -> Result<String, String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim_end() == header)
        .ok_or_else(|| format!("no line {header:?}"))?;
    let outer = indentation(lines[start]);
    let body: Vec<&str> = lines[start + 1..]
        .iter()
        .take_while(|l| is_blank(l) || indentation(l) > outer)
        .copied()
        .collect();
    let first = body
        .iter()
        .find(|l| !is_blank(l))
        .ok_or_else(|| format!("{header:?} opens an empty block"))?;
    let block = indentation(first);
    let mut text = String::new();
    for (i, line) in body.iter().enumerate() {
        if is_blank(line) && line.len() <= block {
            text.push('\n');
        } else if indentation(line) >= block {
            text.push_str(&line[block..]);
            text.push('\n');
        } else {
            return Err(format!(
                "line {} of the {header:?} block is indented {} spaces, less than the block's {block}",
                start + 2 + i,
                indentation(line)
            ));
        }
    }
    while text.ends_with("\n\n") {
        text.pop();
    }
    Ok(text)
}

/// The lines of the top-level mapping value opened by the line `header`
/// (for instance `spec:`), up to the next line at column 0, with the
/// two-space indentation of the mapping removed: the text of the file the
/// mapping was made from.
pub(crate) fn mapping_block(yaml: &str, header: &str) -> Result<String, String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim_end() == header)
        .ok_or_else(|| format!("no line {header:?}"))?;
    let mut text = String::new();
    for (i, line) in lines[start + 1..].iter().enumerate() {
        if is_blank(line) {
            text.push('\n');
        } else if let Some(rest) = line.strip_prefix("  ") {
            text.push_str(rest);
            text.push('\n');
        } else if indentation(line) == 0 {
            break;
        } else {
            return Err(format!(
                "line {} is indented one space under {header:?}",
                start + 2 + i
            ));
        }
    }
    Ok(text)
}

/// Every document of every file named, parsed by PyYAML through `python3`
/// and returned as `(file name, document)`; documents that are empty are
/// left out, as `kubectl` does.
pub(crate) fn documents(python: &Path, names: &[&str]) -> Vec<(String, Value)> {
    const TO_JSON: &str = r#"
import json, sys, yaml
out = []
for name in sys.argv[1:]:
    with open(name) as f:
        out += [[name, doc] for doc in yaml.safe_load_all(f) if doc]
json.dump(out, sys.stdout)
"#;
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(TO_JSON)
        .args(names)
        .current_dir(dir())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(
        out.status.success(),
        "PyYAML could not read the manifests:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: Vec<(String, Value)> =
        serde_json::from_slice(&out.stdout).expect("PyYAML's documents as JSON");
    parsed
}

/// The one document of `kind` named `name`.
pub(crate) fn find<'a>(docs: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .map(|(_, d)| d)
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "exactly one {kind} {name:?} in deploy/kubernetes"
    );
    found[0]
}

#[test]
fn literal_blocks_are_read_as_yaml_reads_them() {
    let yaml =
        "data:\n  a.toml: |\n    x = 1\n\n    [t]\n      y = 2\n\n\n  b: |\n    z\nnext: 1\n";
    assert_eq!(
        literal_block(yaml, "  a.toml: |").unwrap(),
        "x = 1\n\n[t]\n  y = 2\n"
    );
    assert_eq!(literal_block(yaml, "  b: |").unwrap(), "z\n");
    assert!(literal_block(yaml, "  c: |").is_err());
    assert!(literal_block("k: |\n    a\n  b\n", "k: |").is_err());
}

#[test]
fn mapping_blocks_lose_their_indentation() {
    let yaml = "kind: X\nspec:\n  # comment\n  groups:\n    - name: a\n\n  x: 1\nother: 2\n";
    assert_eq!(
        mapping_block(yaml, "spec:").unwrap(),
        "# comment\ngroups:\n  - name: a\n\nx: 1\n"
    );
    assert!(mapping_block("spec:\n a: 1\n", "spec:").is_err());
}
