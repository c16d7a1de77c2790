//! The policy in force, replaceable while requests run.
//!
//! A [`LivePolicy`] is a cheap, clonable handle to an `ArcSwap` holding the
//! validated, compiled [`ActivePolicy`]. Writers validate first and then
//! swap the whole thing in one atomic store; an invalid policy never
//! replaces a valid one. Each request loads **one** snapshot (a guard
//! held across its `.await`s) and uses it from its first attempt to its
//! last, so a request never mixes two policy versions.
//!
//! ```
//! use retryctl::policy::{LivePolicy, Policy};
//!
//! let live = LivePolicy::new(Policy::default()).unwrap();
//! let before = live.load();
//! live.store(Policy { max_rounds: 3, ..Policy::default() }).unwrap();
//! assert_eq!(before.policy().max_rounds, 2); // a held snapshot never changes
//! assert_eq!(live.load().policy().max_rounds, 3);
//! assert!(live.store(Policy { jitter: 7.0, ..Policy::default() }).is_err());
//! assert_eq!(live.load().policy().max_rounds, 3); // the bad one was refused
//! ```
//!
//! # Per-model policies are resolved once, not per request
//!
//! [`ActivePolicy::new`] resolves every `[models."name"]` override against
//! the top-level values and compiles its classification rules up front, so
//! the request path pays one hash lookup ([`ActivePolicy::for_model`]) and
//! no allocation, however many models the policy names. A model without an
//! override shares the top-level [`ModelPolicy`].
//!
//! ```
//! use retryctl::policy::{LivePolicy, Policy};
//!
//! let live = LivePolicy::new(Policy::from_toml(r#"
//!     [models."openai/gpt-oss-120b"]
//!     max_rounds = 3
//! "#).unwrap()).unwrap();
//! let active = live.load();
//! assert_eq!(active.for_model("openai/gpt-oss-120b").policy().max_rounds, 3);
//! assert_eq!(active.for_model("any-other-model").policy().max_rounds, 2);
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::classify::Rules;
use crate::policy::{Policy, PolicyError};

/// One model's resolved policy with its classification rules compiled.
#[derive(Debug)]
pub struct ModelPolicy {
    policy: Policy,
    rules: Rules,
    /// The `[shadow]` candidate applied on top of `policy`, if any.
    shadow: Option<Policy>,
    /// `timeouts.request` and `timeouts.attempt` in nanoseconds, the unit
    /// of the pool's clock: every request adds both to a reading, and a
    /// `Duration` costs a multiplication with overflow checks each time.
    limits: (u64, u64),
    /// A request's budget deposit, unscaled.
    deposit: crate::budget::DepositPlan,
}

impl ModelPolicy {
    fn new(policy: Policy, rules: Rules) -> Self {
        ModelPolicy {
            shadow: policy.shadow_candidate(),
            limits: (
                crate::clock::nanos(policy.timeouts.request),
                crate::clock::nanos(policy.timeouts.attempt),
            ),
            deposit: crate::budget::DepositPlan::new(&policy.budget, 1.0),
            policy,
            rules,
        }
    }

    /// `timeouts.request` in nanoseconds.
    #[inline]
    pub(crate) fn request_nanos(&self) -> u64 {
        self.limits.0
    }

    /// `timeouts.attempt` in nanoseconds.
    #[inline]
    pub(crate) fn attempt_nanos(&self) -> u64 {
        self.limits.1
    }

    /// A request's deposit into the retry budget, unscaled.
    #[inline]
    pub(crate) fn deposit_plan(&self) -> &crate::budget::DepositPlan {
        &self.deposit
    }

    /// The resolved values: the top-level policy with the model's override
    /// applied. For a model without an override this is the top-level
    /// policy itself (its `models` map included).
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The compiled classification rules of [`ModelPolicy::policy`].
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// The shadow candidate (`[shadow]` on top of [`ModelPolicy::policy`]),
    /// evaluated on every outcome without acting; `None` without one.
    pub fn shadow(&self) -> Option<&Policy> {
        self.shadow.as_ref()
    }
}

/// A validated policy with its keyword automata compiled: the top level,
/// and every model override resolved.
#[derive(Debug)]
pub struct ActivePolicy {
    base: ModelPolicy,
    models: HashMap<String, ModelPolicy>,
    version: u64,
}

impl ActivePolicy {
    /// Validates a policy, resolves each model override and compiles the
    /// classification rules (shared with the top level when a model does
    /// not override `classify`).
    pub fn new(policy: Policy) -> Result<Self, PolicyError> {
        policy.validate()?;
        let rules = Rules::new(&policy.classify);
        let models = policy
            .models
            .keys()
            .map(|name| {
                let resolved = policy.resolve(name);
                let rules = if resolved.classify == policy.classify {
                    rules.clone()
                } else {
                    Rules::new(&resolved.classify)
                };
                let model = ModelPolicy::new(resolved, rules);
                (name.clone(), model)
            })
            .collect();
        let version = fnv1a_64(policy.to_toml().as_bytes());
        Ok(ActivePolicy {
            base: ModelPolicy::new(policy, rules),
            models,
            version,
        })
    }

    /// The top-level policy's values (model overrides in `models`).
    pub fn policy(&self) -> &Policy {
        &self.base.policy
    }

    /// The top-level compiled classification rules.
    pub fn rules(&self) -> &Rules {
        &self.base.rules
    }

    /// The policy for requests to `model`: its resolved override, or the
    /// top level when it has none. One hash lookup, no allocation.
    #[inline]
    pub fn for_model(&self, model: &str) -> &ModelPolicy {
        // Most policies have no overrides: skip hashing the name then
        // (and the call: this check is all every request makes then).
        if self.models.is_empty() {
            return &self.base;
        }
        self.with_override(model)
    }

    /// [`ActivePolicy::for_model`] when the policy has overrides.
    #[inline(never)]
    fn with_override(&self, model: &str) -> &ModelPolicy {
        self.models.get(model).unwrap_or(&self.base)
    }

    /// A hash of the policy's content: equal policies have equal versions.
    ///
    /// It is FNV-1a (64 bits) of the policy rendered as TOML
    /// ([`Policy::to_toml`]), an algorithm fixed by its definition: the
    /// same policy has the same version on every platform, build and Rust
    /// release, so only a change of the policy (or of its defaults) shows
    /// as a new `retryctl_policy_info` hash on a dashboard.
    /// (`std`'s `DefaultHasher` promises no such thing: its keys and
    /// algorithm may change with any release.)
    pub fn version(&self) -> u64 {
        self.version
    }
}

/// A shared handle to the policy in force.
#[derive(Clone, Debug)]
pub struct LivePolicy {
    current: Arc<ArcSwap<ActivePolicy>>,
}

impl Default for LivePolicy {
    fn default() -> Self {
        let active = ActivePolicy::new(Policy::default())
            .unwrap_or_else(|e| unreachable!("the default policy is valid: {e}"));
        LivePolicy {
            current: Arc::new(ArcSwap::from_pointee(active)),
        }
    }
}

impl LivePolicy {
    /// A handle holding `policy`, if it is valid.
    pub fn new(policy: Policy) -> Result<Self, PolicyError> {
        Ok(LivePolicy {
            current: Arc::new(ArcSwap::from_pointee(ActivePolicy::new(policy)?)),
        })
    }

    /// Validates `policy` and, if it is valid, puts it in force for every
    /// request that starts from now on. Returns whether it differed from
    /// the policy in force.
    pub fn store(&self, policy: Policy) -> Result<bool, PolicyError> {
        let active = ActivePolicy::new(policy)?;
        let changed = active.version != self.current.load().version;
        if changed {
            self.current.store(Arc::new(active));
        }
        Ok(changed)
    }

    /// The policy in force now; hold it for the whole of one request.
    pub fn load(&self) -> Arc<ActivePolicy> {
        self.current.load_full()
    }

    /// The policy in force, as a guard: on the thread's first few guards
    /// no shared reference count is touched (arc-swap's debt slots), so
    /// concurrent requests on two cores do not bounce one cache line. The
    /// pool holds it for one request; a writer that swaps the policy
    /// meanwhile pays the debt, the request keeps its snapshot.
    #[inline]
    pub(crate) fn snapshot(&self) -> arc_swap::Guard<Arc<ActivePolicy>> {
        self.current.load()
    }
}

/// FNV-1a, 64 bits (offset basis and prime from the FNV specification):
/// the policy version's hash, whose output must never change.
fn fnv1a_64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(PRIME)
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::policy::PolicyOverride;

    /// A policy whose fields all encode `n`, top level and override alike,
    /// so a reader can tell whether it saw one version or a mix.
    fn numbered(n: u32) -> Policy {
        let mut p = Policy {
            max_rounds: 1 + n % 10,
            delay: Duration::from_millis(u64::from(n)).into(),
            ..Policy::default()
        };
        p.budget.min_per_second = n;
        let mut o = PolicyOverride {
            max_rounds: Some(1 + (n + 1) % 10),
            ..PolicyOverride::default()
        };
        o.budget.min_per_second = Some(n + 1_000);
        o.classify.transient_keywords = Some(vec![format!("keyword {n}")]);
        p.models.insert("big".into(), o);
        p
    }

    #[test]
    fn for_model_resolves_overrides_once_and_falls_back_to_the_top_level() {
        let active = ActivePolicy::new(numbered(7)).unwrap();
        let big = active.for_model("big");
        assert_eq!(big.policy().max_rounds, 9);
        assert_eq!(big.policy().budget.min_per_second, 1_007);
        assert_eq!(
            big.policy().delay,
            Duration::from_millis(7).into(),
            "inherited"
        );
        assert!(big.policy().models.is_empty());
        assert_eq!(
            big.rules().text("upstream said keyword 7").class,
            crate::Classification::Transient
        );
        let other = active.for_model("small");
        assert!(std::ptr::eq(other, active.for_model("another")));
        assert!(std::ptr::eq(other.policy(), active.policy()));
        assert_eq!(other.policy().max_rounds, 8);
        assert!(std::ptr::eq(other.rules(), active.rules()));
    }

    #[test]
    fn version_is_a_content_hash_that_covers_overrides() {
        let a = ActivePolicy::new(numbered(1)).unwrap();
        assert_eq!(
            a.version(),
            ActivePolicy::new(numbered(1)).unwrap().version()
        );
        let mut changed = numbered(1);
        if let Some(o) = changed.models.get_mut("big") {
            o.health.demote_after = Some(3);
        }
        assert_ne!(a.version(), ActivePolicy::new(changed).unwrap().version());
    }

    #[test]
    fn the_version_hash_is_fnv_1a_64() {
        // Test vectors of the FNV specification.
        assert_eq!(fnv1a_64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    /// The version of a known policy, pinned: dashboards compare versions
    /// across builds and restarts, so a new compiler, platform or hash
    /// implementation must not change it. If this fails because the policy's
    /// rendering changed on purpose (a new field, a new default), every
    /// deployment will report a new version once: update the literal and
    /// say so in the change. Any other cause is a bug.
    #[test]
    fn the_version_of_a_known_policy_never_changes() {
        let text = "max_rounds = 3\ndelay = \"250ms\"\n\n\
                    [models.\"openai/gpt-oss-120b\"]\nmax_rounds = 1\n";
        let active = ActivePolicy::new(Policy::from_toml(text).unwrap()).unwrap();
        assert_eq!(
            crate::telemetry::policy_hash(active.version()),
            "d3362b55fbecd2e3",
            "rendered as:\n{}",
            active.policy().to_toml()
        );
    }

    #[test]
    fn a_bad_override_is_refused_and_the_old_policy_stays() {
        let live = LivePolicy::new(numbered(1)).unwrap();
        let mut bad = numbered(2);
        if let Some(o) = bad.models.get_mut("big") {
            o.budget.ratio = Some(2.0);
        }
        let e = live.store(bad).unwrap_err();
        assert_eq!(e.field, "models.\"big\".budget.ratio");
        assert_eq!(live.load().policy(), &numbered(1));
        assert!(!live.store(numbered(1)).unwrap(), "unchanged");
        assert!(live.store(numbered(2)).unwrap(), "changed");
    }

    #[test]
    fn a_snapshot_never_mixes_two_versions_while_a_writer_stores() {
        let live = LivePolicy::new(numbered(0)).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (live, stop) = (live.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) && n < 20_000 {
                    n += 1;
                    live.store(numbered(n % 500)).unwrap();
                }
            })
        };
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20_000 {
            let snapshot = live.load();
            let n = snapshot.policy().budget.min_per_second;
            // Everything read through one snapshot belongs to version n,
            // the resolved override included, however long it is held.
            assert_eq!(
                snapshot.policy().delay,
                Duration::from_millis(u64::from(n)).into()
            );
            let big = snapshot.for_model("big");
            assert_eq!(big.policy().budget.min_per_second, n + 1_000);
            assert_eq!(big.policy().max_rounds, 1 + (n + 1) % 10);
            assert_eq!(snapshot.policy().max_rounds, 1 + n % 10);
            seen.insert(n);
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        assert!(!seen.is_empty());
    }
}
