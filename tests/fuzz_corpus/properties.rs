//! The policy target's checks on generated inputs, beyond the committed
//! corpus: arbitrary bytes, a byte that is not UTF-8 at a known place, and
//! text built from the policy's own tables and keys, so that the accepted
//! path (validate, put in force, render, parse back) is exercised as much
//! as the refused one (the error names a line of the text).

use std::cell::Cell;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestRunner};
use retryctl::policy::Policy;

use crate::policy;

proptest! {
    /// Whatever is on disk: an accepted policy validates, can be put in
    /// force and renders to TOML that parses back to it; a refused one
    /// renders its error and points inside the text (the target's checks).
    #[test]
    fn any_bytes_are_a_policy_or_a_located_error(
        bytes in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        policy::run(&bytes);
    }

    /// A byte that is not UTF-8 is refused at its own line and column
    /// (in characters, 1-based), whatever text comes before and after it.
    #[test]
    fn a_byte_that_is_not_utf8_is_located_exactly(
        lines in prop::collection::vec("[ -~]{0,20}", 1..8),
        line in any::<Index>(),
        column in any::<Index>(),
        bad in 0x80u8..=0xff,
    ) {
        let line = line.index(lines.len());
        let column = column.index(lines[line].len() + 1);
        let mut bytes = Vec::new();
        for (i, text) in lines.iter().enumerate() {
            if i == line {
                bytes.extend_from_slice(&text.as_bytes()[..column]);
                bytes.push(bad);
                bytes.extend_from_slice(&text.as_bytes()[column..]);
            } else {
                bytes.extend_from_slice(text.as_bytes());
            }
            bytes.push(b'\n');
        }
        let e = Policy::from_bytes(&bytes).expect_err("not UTF-8");
        prop_assert_eq!(e.location, Some((line + 1, column + 1)), "{}", e);
        prop_assert!(e.allowed.contains("not UTF-8"), "{}", e);
        let at = format!("0x{bad:02x}");
        prop_assert!(e.allowed.contains(&at), "{}", e);
    }
}

/// One line (or table) of a policy-shaped text: the policy's own keys with
/// values in and out of range, model overrides, and unknown keys, tables
/// and values of the wrong type.
fn policy_line() -> impl Strategy<Value = String> {
    let model = "[a-z][a-z0-9./-]{0,12}";
    prop_oneof![
        3 => (0u32..=12).prop_map(|n| format!("max_rounds = {n}\n")),
        2 => (0u32..=12).prop_map(|n| format!("jitter = 0.{n}\n")),
        2 => (0u64..=9_000).prop_map(|ms| format!("delay = \"{ms}ms\"\n")),
        1 => (0u32..=12).prop_map(|n| format!("[budget]\nratio = 0.{n}\n")),
        1 => (model, 0u32..=12).prop_map(|(m, n)| format!("[models.\"{m}\"]\nmax_rounds = {n}\n")),
        1 => (model, 0u32..=3).prop_map(|(m, n)| {
            format!("[models.\"{m}\".health]\ndemote_after = {n}\n")
        }),
        1 => "[a-z_]{1,12} = (\"[0-9a-z]{0,4}\"|-?[0-9.]{1,4}|\\[\\]|\\{\\})\n",
        1 => "\\[[a-z]{0,8}\\]\n",
    ]
}

/// The model names of the `[models."..."]` tables a text opens.
fn model_tables(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|l| l.strip_prefix("[models.\"")?.split_once('"'))
        .map(|(name, _)| name)
        .collect()
}

/// Policy-shaped text is either a policy that survives rendering and
/// parsing back, with an override for every model table it opens, or an
/// error that points at one of its lines (or names a value the text does
/// not write: `delay = "5000ms"` makes the default `max_delay` of 4 s
/// invalid). Both happen often: a generator
/// that stopped producing valid policies would make the first half
/// vacuous, so the run fails then.
#[test]
fn policy_shaped_text_round_trips_or_names_its_line() {
    let mut runner = TestRunner::new(Config {
        cases: 256,
        ..Config::default()
    });
    let text = prop::collection::vec(policy_line(), 0..6).prop_map(|lines| lines.concat());
    let (accepted, refused) = (Cell::new(0u32), Cell::new(0u32));
    let tally = |count: &Cell<u32>| count.set(count.get() + 1);
    runner
        .run(&text, |text| {
            // The target's checks first: round trip, activation, location.
            policy::run(text.as_bytes());
            match Policy::from_toml(&text) {
                Ok(p) => {
                    tally(&accepted);
                    let rendered = p.to_toml();
                    let again = Policy::from_toml(&rendered).expect("rendered policy parses");
                    prop_assert_eq!(again.to_toml(), rendered, "rendering is not stable");
                    for model in model_tables(&text) {
                        prop_assert!(
                            p.models.contains_key(model),
                            "[models.\"{}\"] lost:\n{}",
                            model,
                            text
                        );
                    }
                }
                Err(e) => {
                    tally(&refused);
                    let lines = text.lines().count().max(1);
                    match e.location {
                        Some((line, column)) => prop_assert!(
                            (1..=lines).contains(&line) && column >= 1,
                            "{} outside the text's {} lines:\n{}",
                            e,
                            lines,
                            text
                        ),
                        // Only a value the text does not write (a default
                        // that another value made invalid) has no place.
                        None => {
                            let key = e.field.rsplit('.').next().unwrap_or_default();
                            prop_assert!(
                                !key.is_empty() && !text.contains(key),
                                "{} names no line, yet the text writes it:\n{}",
                                e,
                                text
                            );
                        }
                    }
                }
            }
            Ok(())
        })
        .unwrap();
    let (accepted, refused) = (accepted.get(), refused.get());
    eprintln!("policy-shaped text: {accepted} accepted, {refused} refused");
    assert!(
        accepted >= 256 / 8 && refused >= 256 / 8,
        "{accepted} accepted, {refused} refused: the generator no longer covers both"
    );
}
