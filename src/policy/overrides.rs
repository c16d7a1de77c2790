//! Per-model overrides: `[models."name"]` tables (and `[shadow]`), one
//! override type per policy table, and the merge that resolves a model's
//! policy.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{
    AdaptivePolicy, AdmissionPolicy, BudgetPolicy, ClassifyPolicy, HealthPolicy, Policy,
    RetryDelay, Timeouts,
};

/// Generates the override type of a policy table: every field of `$base`
/// as an `Option` ("absent = inherited"), every sub-table as its own
/// override type, and `apply_to`, which writes the fields that are set into
/// a base value. One list per table, so the merge cannot miss a field
/// that the list names; the test
/// `every_field_can_be_overridden_per_model_unless_global_on_purpose`
/// fails for a field of the table that the list does not name.
macro_rules! policy_override {
    (
        $(#[$meta:meta])*
        pub struct $name:ident for $base:ident {
            $( $(#[$fmeta:meta])* $field:ident : $ty:ty, )*
        }
        $( tables { $( $sub:ident : $subty:ty, )* } )?
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name {
            $(
                #[doc = concat!("Replaces [`", stringify!($base), "::", stringify!($field), "`] when set.")]
                $(#[$fmeta])*
                #[serde(skip_serializing_if = "Option::is_none")]
                pub $field: Option<$ty>,
            )*
            $($(
                #[doc = concat!("Overrides within [`", stringify!($base), "::", stringify!($sub), "`].")]
                #[serde(skip_serializing_if = "is_default")]
                pub $sub: $subty,
            )*)?
        }

        impl $name {
            /// Whether this overrides nothing.
            pub fn is_empty(&self) -> bool {
                true $( && self.$field.is_none() )* $($( && self.$sub.is_empty() )*)?
            }

            /// Writes every field that is set into `base`.
            pub fn apply_to(&self, base: &mut $base) {
                $( if let Some(value) = &self.$field { base.$field = value.clone(); } )*
                $($( self.$sub.apply_to(&mut base.$sub); )*)?
            }
        }
    };
}

/// Whether a value is its type's default (an override that overrides
/// nothing is left out of the rendered TOML).
fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

policy_override! {
    /// One model's overrides of the top-level [`Policy`]
    /// (`[models."name"]` in the policy file). Unknown keys are rejected.
    pub struct PolicyOverride for Policy {
        max_rounds: u32,
        delay: RetryDelay,
        backoff: f64,
        #[serde(with = "humantime_serde")]
        max_delay: Duration,
        jitter: f64,
        #[serde(with = "humantime_serde")]
        rate_limited_delay: Duration,
        #[serde(with = "humantime_serde")]
        max_retry_after: Duration,
    }
    tables {
        classify: ClassifyOverride,
        timeouts: TimeoutsOverride,
        budget: BudgetOverride,
        health: HealthOverride,
        adaptive: AdaptiveOverride,
        admission: AdmissionOverride,
    }
}

policy_override! {
    /// Overrides of [`AdmissionPolicy`] (`[models."name".admission]`).
    pub struct AdmissionOverride for AdmissionPolicy {
        enabled: bool,
        #[serde(with = "humantime_serde")]
        max_wait: Duration,
        max_waiting: u32,
        decrease: f64,
        min_limit: u32,
        #[serde(with = "humantime_serde")]
        probe_delay: Duration,
        #[serde(with = "humantime_serde")]
        probe_max_delay: Duration,
        slow_start: bool,
    }
}

policy_override! {
    /// Overrides of [`ClassifyPolicy`] (`[models."name".classify]`). A list
    /// replaces the inherited list; it is not appended to.
    pub struct ClassifyOverride for ClassifyPolicy {
        transient_keywords: Vec<String>,
        next_provider_keywords: Vec<String>,
        client_error_keywords: Vec<String>,
        retryable_statuses: Vec<u16>,
        permanent_statuses: Vec<u16>,
        next_provider_statuses: Vec<u16>,
        retry_response_timeout: bool,
    }
}

policy_override! {
    /// Overrides of [`Timeouts`] (`[models."name".timeouts]`).
    pub struct TimeoutsOverride for Timeouts {
        #[serde(with = "humantime_serde")]
        connect: Duration,
        #[serde(with = "humantime_serde")]
        attempt: Duration,
        #[serde(with = "humantime_serde")]
        request: Duration,
    }
}

policy_override! {
    /// Overrides of [`BudgetPolicy`] (`[models."name".budget]`).
    pub struct BudgetOverride for BudgetPolicy {
        enabled: bool,
        ratio: f64,
        min_per_second: u32,
        #[serde(with = "humantime_serde")]
        window: Duration,
    }
}

policy_override! {
    /// Overrides of [`AdaptivePolicy`] (`[models."name".adaptive]`).
    pub struct AdaptiveOverride for AdaptivePolicy {
        deadline_aware: bool,
        attempt_timeout: bool,
        attempt_timeout_factor: f64,
        #[serde(with = "humantime_serde")]
        attempt_timeout_min: Duration,
        #[serde(with = "humantime_serde")]
        attempt_timeout_max: Duration,
        min_samples: u32,
        budget: bool,
        budget_min_success: f64,
        budget_min_retries: u32,
        latency_order: bool,
        slow_factor: f64,
        #[serde(with = "humantime_serde")]
        slow_min: Duration,
        delay_auto_quantile: f64,
        #[serde(with = "humantime_serde")]
        delay_auto_min: Duration,
        #[serde(with = "humantime_serde")]
        delay_auto_max: Duration,
        #[serde(with = "humantime_serde")]
        delay_auto_fallback: Duration,
        delay_auto_min_samples: u32,
    }
}

policy_override! {
    /// Overrides of [`HealthPolicy`] (`[models."name".health]`).
    pub struct HealthOverride for HealthPolicy {
        demote_after: u32,
        #[serde(with = "humantime_serde")]
        cooldown: Duration,
        #[serde(with = "humantime_serde")]
        max_cooldown: Duration,
    }
}

impl Policy {
    /// The policy a request for `model` runs under: the top-level values
    /// with the model's override applied, and no `models` of its own. A
    /// model without an override gets the top-level values.
    pub fn resolve(&self, model: &str) -> Policy {
        let mut resolved = self.without_models();
        if let Some(o) = self.models.get(model) {
            o.apply_to(&mut resolved);
        }
        resolved
    }

    /// The top-level values alone. Destructured field by field (not
    /// `..self.clone()`), so the model map is never copied and a new field
    /// cannot be forgotten.
    pub(super) fn without_models(&self) -> Policy {
        let Policy {
            max_rounds,
            delay,
            backoff,
            max_delay,
            jitter,
            rate_limited_delay,
            max_retry_after,
            classify,
            timeouts,
            budget,
            health,
            adaptive,
            admission,
            shadow,
            models: _,
        } = self;
        Policy {
            max_rounds: *max_rounds,
            delay: *delay,
            backoff: *backoff,
            max_delay: *max_delay,
            jitter: *jitter,
            rate_limited_delay: *rate_limited_delay,
            max_retry_after: *max_retry_after,
            classify: classify.clone(),
            timeouts: timeouts.clone(),
            budget: budget.clone(),
            health: health.clone(),
            adaptive: adaptive.clone(),
            admission: admission.clone(),
            shadow: shadow.clone(),
            models: BTreeMap::new(),
        }
    }

    /// The shadow candidate of this (resolved) policy: the policy with the
    /// `[shadow]` table applied, if there is one.
    pub fn shadow_candidate(&self) -> Option<Policy> {
        let o = self.shadow.as_ref()?;
        let mut candidate = self.without_models();
        candidate.shadow = None;
        o.apply_to(&mut candidate);
        Some(candidate)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::Duration;

    use toml::{Table, Value};

    use super::PolicyOverride;
    use crate::policy::Policy;

    #[test]
    fn a_shadow_policy_is_an_override_validated_like_one() {
        let p = Policy::from_toml(
            "max_rounds = 2\n[shadow]\nmax_rounds = 3\n[shadow.budget]\nratio = 0.5\n",
        )
        .unwrap();
        let c = p.shadow_candidate().unwrap();
        assert_eq!((c.max_rounds, c.budget.ratio), (3, 0.5));
        assert_eq!((c.delay, c.shadow.as_ref()), (p.delay, None), "inherited");
        assert_eq!(Policy::from_toml(&p.to_toml()).unwrap(), p);
        assert_eq!(Policy::default().shadow_candidate(), None);
        // a model's resolved policy keeps the shadow, applied on top of it
        let p =
            Policy::from_toml("[shadow]\nmax_rounds = 3\n[models.x]\ndelay = \"1s\"\n").unwrap();
        let c = p.resolve("x").shadow_candidate().unwrap();
        assert_eq!((c.max_rounds, c.delay), (3, Duration::from_secs(1).into()));
        // errors name the shadow's path, the line, and what is allowed
        let e = Policy::from_toml("[shadow]\nmax_rounds = 30\n").unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.location),
            ("shadow.max_rounds", Some((2, 14)))
        );
        assert!(e.allowed.contains("1..=10"), "{e}");
        let e = Policy::from_toml("[shadow]\nmax_round = 3\n").unwrap_err();
        assert_eq!(e.field, "shadow.max_round");
        let e = Policy::from_toml("[shadow.budget]\nratio = 2.0\n").unwrap_err();
        assert_eq!(e.field, "shadow.budget.ratio");
        // valid alone, invalid with what it inherits: points at [shadow]
        let e = Policy::from_toml("[shadow]\ndelay = \"5s\"\n").unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.location),
            ("shadow.max_delay", Some((1, 1)))
        );
        assert!(e.allowed.contains("inherited"), "{e}");
        // ...or with a model's override
        let e = Policy::from_toml("[shadow]\ndelay = \"3s\"\n[models.x]\nmax_delay = \"2s\"\n")
            .unwrap_err();
        assert_eq!(e.field, "shadow.max_delay");
        assert!(e.allowed.contains("model \"x\""), "{e}");
    }

    const BIG: &str = "openai/gpt-oss-120b";

    #[test]
    fn model_override_replaces_what_it_names_and_inherits_the_rest() {
        let p = Policy::from_toml(
            "delay = \"250ms\"\n\
             [models.\"openai/gpt-oss-120b\"]\n\
             max_rounds = 3\n\
             [models.\"openai/gpt-oss-120b\".budget]\n\
             ratio = 0.5\n\
             [models.\"openai/gpt-oss-120b\".classify]\n\
             retryable_statuses = [408, 425]\n",
        )
        .unwrap();
        let big = p.resolve(BIG);
        assert_eq!((big.max_rounds, big.budget.ratio), (3, 0.5));
        assert_eq!(big.classify.retryable_statuses, vec![408, 425]);
        assert_eq!(big.delay, Duration::from_millis(250).into(), "inherited");
        assert_eq!(big.budget.window, p.budget.window, "inherited");
        assert!(big.models.is_empty());
        let other = p.resolve("other");
        assert_eq!(
            other,
            Policy {
                models: BTreeMap::new(),
                ..p.clone()
            }
        );
    }

    #[test]
    fn overrides_round_trip_through_to_toml() {
        let mut p = Policy::default();
        let mut o = PolicyOverride {
            max_rounds: Some(3),
            delay: Some(Duration::from_millis(100).into()),
            ..PolicyOverride::default()
        };
        o.budget.ratio = Some(0.5);
        o.timeouts.attempt = Some(Duration::from_secs(30));
        o.classify.transient_keywords = Some(vec!["overloaded".into()]);
        p.models.insert(BIG.into(), o);
        p.models.insert("gpt-4.1".into(), PolicyOverride::default());
        let text = p.to_toml();
        assert!(
            text.contains("[models.\"openai/gpt-oss-120b\".budget]"),
            "{text}"
        );
        assert_eq!(Policy::from_toml(&text).unwrap(), p);
        assert!(!Policy::default().to_toml().contains("models"));
    }

    #[test]
    fn override_errors_name_the_full_path_and_where_it_is_written() {
        let e = Policy::from_toml("[models.\"gpt-4.1\".budget]\nratio = 1.5\n").unwrap_err();
        assert_eq!(e.field, "models.\"gpt-4.1\".budget.ratio");
        assert_eq!((e.value.as_str(), e.location), ("1.5", Some((2, 9))));
        let e = Policy::from_toml("[models.x]\njitter = 0.1\n[models.x.budget]\nratioo = 1\n")
            .unwrap_err();
        assert_eq!(e.field, "models.\"x\".budget.ratioo");
        assert_eq!(e.location, Some((4, 1)));
        assert!(e.allowed.contains("unknown field `ratioo`"), "{e}");
        let e = Policy::from_toml("[models.x]\nmax_rounds = \"two\"\n").unwrap_err();
        assert_eq!(e.field, "models.\"x\".max_rounds");
        assert_eq!(e.location, Some((2, 14)));
        let e = Policy::from_toml("[models]\n\"gpt-4.1\" = { jitter = 2.0 }\n").unwrap_err();
        assert_eq!(e.field, "models.\"gpt-4.1\".jitter");
        assert_eq!((e.value.as_str(), e.location), ("2.0", Some((2, 24))));
        assert!(
            e.to_string()
                .starts_with("line 2, column 24: `models.\"gpt-4.1\".jitter` = 2.0 is invalid"),
            "{e}"
        );
    }

    /// The fields of [`Policy`] that a `[models."..."]` table cannot set, on
    /// purpose, and why. Every other field, at any depth, must be
    /// overridable: the test below fails for a field that is neither.
    const GLOBAL: [(&str, &str); 2] = [
        (
            "shadow",
            "one candidate for the whole file, applied on top of each model's resolved \
             policy already; it is an override itself, and an override of it per model \
             would make two candidates for one comparison",
        ),
        (
            "models",
            "the overrides themselves: a model's resolved policy has none, so an \
             override of them would apply to nothing",
        ),
    ];

    /// A policy as the file writes it: a TOML table.
    fn table_of(policy: &Policy) -> Table {
        toml::from_str(&policy.to_toml()).unwrap()
    }

    fn dotted(path: &[String]) -> String {
        path.join(".")
    }

    fn keys(keys: &[&str]) -> Vec<String> {
        keys.iter().map(|k| (*k).to_owned()).collect()
    }

    fn get<'a>(table: &'a Table, path: &[String]) -> Option<&'a Value> {
        let (last, tables) = path.split_last()?;
        table_at(table, tables)?.get(last)
    }

    fn table_at<'a>(table: &'a Table, path: &[String]) -> Option<&'a Table> {
        path.iter()
            .try_fold(table, |table, key| table.get(key)?.as_table())
    }

    /// Sets the value at `path`, creating the tables on the way.
    fn set(table: &mut Table, path: &[String], value: Value) {
        let (last, tables) = path.split_last().unwrap();
        let mut table = table;
        for key in tables {
            let entry = table
                .entry(key.clone())
                .or_insert_with(|| Value::Table(Table::new()));
            table = entry.as_table_mut().unwrap();
        }
        table.insert(last.clone(), value);
    }

    /// The path of every table and of every other value in `table`, without
    /// descending into the global fields.
    fn walk(
        table: &Table,
        prefix: &[String],
        tables: &mut Vec<Vec<String>>,
        values: &mut Vec<Vec<String>>,
    ) {
        tables.push(prefix.to_vec());
        for (key, value) in table {
            if prefix.is_empty() && GLOBAL.iter().any(|(global, _)| global == key) {
                continue;
            }
            let mut path = prefix.to_vec();
            path.push(key.clone());
            match value {
                Value::Table(t) => walk(t, &path, tables, values),
                _ => values.push(path),
            }
        }
    }

    /// The keys the policy file accepts in the table at `path`, as the
    /// type's deserializer lists them when it refuses an unknown key.
    fn accepted_keys(path: &[String]) -> BTreeSet<String> {
        let mut doc = Table::new();
        let unknown = [path, &["not_a_policy_field".to_owned()]].concat();
        set(&mut doc, &unknown, Value::Integer(0));
        let e = Policy::from_toml(&toml::to_string(&doc).unwrap()).unwrap_err();
        let (_, expected) = e
            .allowed
            .split_once(", expected")
            .unwrap_or_else(|| panic!("no list of fields in: {e}"));
        expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    }

    /// A value of the same type as `value` and different from it, that a
    /// policy accepts instead of its default.
    fn another(path: &[String], value: &Value) -> Value {
        match value {
            Value::Boolean(b) => Value::Boolean(!b),
            Value::Integer(n) => Value::Integer(n + 1),
            Value::Float(f) => Value::Float(f * 0.9),
            Value::String(s) => {
                let d = humantime::parse_duration(s).unwrap_or_else(|_| {
                    panic!("`{}` = {s:?}: teach `another` a value for it", dotted(path))
                });
                let d = d + Duration::from_millis(1);
                Value::String(humantime::format_duration(d).to_string())
            }
            Value::Array(items) if !items.is_empty() => {
                Value::Array(items.iter().take(items.len() - 1).cloned().collect())
            }
            _ => panic!(
                "`{}` = {value}: teach `another` a value for it",
                dotted(path)
            ),
        }
    }

    /// The fields are enumerated from the type itself, not from a list
    /// kept by hand: a field added to `Policy` or to one of its tables and
    /// not to its override type fails here, unless it is added to
    /// `GLOBAL` with the reason.
    #[test]
    fn every_field_can_be_overridden_per_model_unless_global_on_purpose() {
        // Rendered with every field: `shadow` and `models` are left out
        // while empty.
        let full = table_of(&Policy {
            shadow: Some(PolicyOverride::default()),
            models: BTreeMap::from([("m".to_owned(), PolicyOverride::default())]),
            ..Policy::default()
        });
        let (mut tables, mut fields) = (Vec::new(), Vec::new());
        walk(&full, &[], &mut tables, &mut fields);
        // The rendering has every key the file accepts, in every table, so
        // no field escapes the enumeration by not being rendered.
        for path in &tables {
            let rendered: BTreeSet<String> =
                table_at(&full, path).unwrap().keys().cloned().collect();
            let table = if path.is_empty() {
                "the top level".to_owned()
            } else {
                format!("`[{}]`", dotted(path))
            };
            assert_eq!(
                rendered,
                accepted_keys(path),
                "{table} accepts a key the rendering leaves out: give it a value in `full`"
            );
        }
        for known in [
            keys(&["max_rounds"]),
            keys(&["classify", "retry_response_timeout"]),
            keys(&["admission", "slow_start"]),
        ] {
            assert!(
                fields.contains(&known),
                "{known:?} not enumerated: {fields:?}"
            );
        }
        // A global field is refused in an override, not silently ignored.
        for (global, why) in GLOBAL {
            assert!(
                full.contains_key(global),
                "`{global}` is not a field of Policy ({why})"
            );
            let e = Policy::from_toml(&format!("[models.x.{global}]\n")).unwrap_err();
            assert!(
                e.allowed.contains(&format!("unknown field `{global}`")),
                "{e}"
            );
        }
        // Every other field, set in `[models."x"]` (and in `[shadow]`),
        // takes effect in x's resolved policy (the candidate), and nothing
        // else changes.
        let defaults = table_of(&Policy::default());
        for path in &fields {
            let field = dotted(path);
            let default = get(&defaults, path).unwrap();
            let value = another(path, default);
            assert_ne!(
                &value, default,
                "`{field}`: teach `another` a different value"
            );
            let mut expected = defaults.clone();
            set(&mut expected, path, value.clone());
            for scope in [keys(&["models", "x"]), keys(&["shadow"])] {
                let mut doc = Table::new();
                set(&mut doc, &[&scope[..], path].concat(), value.clone());
                let text = toml::to_string(&doc).unwrap();
                let p = Policy::from_toml(&text)
                    .unwrap_or_else(|e| panic!("`{field}` cannot be overridden: {e}\n{text}"));
                let applied = match p.shadow_candidate() {
                    Some(candidate) => candidate,
                    None => p.resolve("x"),
                };
                assert_eq!(table_of(&applied), expected, "`{field}` set in:\n{text}");
                let untouched = Policy {
                    shadow: None,
                    ..p.resolve("y")
                };
                assert_eq!(
                    table_of(&untouched),
                    defaults,
                    "`{field}` leaked beyond:\n{text}"
                );
            }
        }
    }
}
