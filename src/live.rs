//! The policy in force, replaceable while requests run.
//!
//! A [`LivePolicy`] is a cheap, clonable handle to an `ArcSwap` holding the
//! validated, compiled [`ActivePolicy`]. Writers validate first and then
//! swap the whole thing in one atomic store; an invalid policy never
//! replaces a valid one. Each request loads **one** snapshot
//! (`load_full`, since it is held across `.await`) and uses it from its
//! first attempt to its last, so a request never mixes two policy versions.
//!
//! ```
//! use retryctl::{LivePolicy, Policy};
//!
//! let live = LivePolicy::new(Policy::default()).unwrap();
//! let before = live.load();
//! live.store(Policy { max_rounds: 3, ..Policy::default() }).unwrap();
//! assert_eq!(before.policy().max_rounds, 2); // a held snapshot never changes
//! assert_eq!(live.load().policy().max_rounds, 3);
//! assert!(live.store(Policy { jitter: 7.0, ..Policy::default() }).is_err());
//! assert_eq!(live.load().policy().max_rounds, 3); // the bad one was refused
//! ```

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::classify::Rules;
use crate::policy::{Policy, PolicyError};

/// A validated policy with its keyword automaton compiled.
#[derive(Debug)]
pub struct ActivePolicy {
    policy: Policy,
    rules: Rules,
    version: u64,
}

impl ActivePolicy {
    /// Validates and compiles a policy.
    pub fn new(policy: Policy) -> Result<Self, PolicyError> {
        policy.validate()?;
        let rules = Rules::new(&policy.classify);
        let mut hasher = std::hash::DefaultHasher::new();
        policy.to_toml().hash(&mut hasher);
        Ok(ActivePolicy {
            policy,
            rules,
            version: hasher.finish(),
        })
    }

    /// The policy's values.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The compiled classification rules.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// A hash of the policy's content: equal policies have equal versions.
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
}
