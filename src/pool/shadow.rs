//! The shadow policy: a candidate (`[shadow]`) evaluated on every live
//! outcome without acting, so an operator sees what a change would do
//! before applying it.
//!
//! # How each request is judged
//!
//! The candidate has its own retry budget: a second [`RetryBudget`] per
//! model, under the candidate's `budget`, fed by every request when it
//! starts and charged when the live policy pays for a retried attempt the
//! candidate would also make (at the same moment, so both budgets see the
//! same traffic). At the end of a request, its [`Report`] (the rounds
//! started, each failed attempt's round, provider and class) decides what
//! is left; exactly one decision is counted per request:
//!
//! * `would_not_retry`: the live policy started a round the candidate's
//!   `max_rounds` does not allow.
//! * `would_refuse_budget`: the candidate's budget refused a retried
//!   attempt the live policy made.
//! * `would_retry`: the live policy failed with `rounds_exhausted` or
//!   `budget_exhausted` after a round whose failures were retryable, and
//!   the candidate allows another round, its budget pays for one retry per
//!   such provider, and its wait (`delay` or its fallback, with `backoff`
//!   and `max_delay`, without jitter) ends before the request's deadline.
//! * `agree`: none of these.
//!
//! And per provider, `would_demote`: the provider's consecutive failed
//! requests (counted once per request, for failures that are its fault,
//! as the live health counts them; reset when it serves a request) reach
//! the candidate's `health.demote_after` while the live policy has not
//! demoted it.
//!
//! # Failures saved and caused
//!
//! * **caused**: a `would_not_retry` or `would_refuse_budget` request that
//!   the live policy *served* in or after the round the candidate would
//!   not have made. Exact, given the same attempts before that round.
//! * **saved** / **retried_in_vain**: a `would_retry` request is a
//!   pending save for each provider it would retry, due at the end of the
//!   candidate's wait. It is decided by the next live attempt on that
//!   provider that *starts* at or after that moment: a success means the
//!   candidate's retry would very likely have succeeded (`saved`), a
//!   transient failure that it would not (`retried_in_vain`). Attempts that
//!   end otherwise (a client error, "not served here") decide nothing.
//!   Pending saves with no later traffic stay undecided (at most 1,024
//!   per provider; older ones are dropped).
//!
//! Only `max_rounds`, `delay`, `backoff`, `max_delay`, `budget` and
//! `health.demote_after` are evaluated; the other keys of `[shadow]` are
//! validated but would need a counterfactual attempt to judge (another
//! classification or timeout changes what the upstream would have done).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::clock::Moment;
use metrics::Counter;
use smallvec::SmallVec;

use super::outcome::{FailReason, Report};
use super::schedule::backoff;
use super::{Model, Pool, Route};
use crate::budget::RetryBudget;
use crate::classify::Classification;
use crate::live::{ActivePolicy, ModelPolicy};
use crate::policy::BudgetPolicy;

/// Pending saves kept per provider.
const MAX_PENDING: usize = 1024;

/// Per-request decision labels (`shadow_decisions_total{decision}`), then
/// the per-provider one.
const DECISIONS: [&str; 5] = [
    "agree",
    "would_retry",
    "would_not_retry",
    "would_refuse_budget",
    "would_demote",
];

/// `shadow_failures_total{effect}` labels.
const EFFECTS: [&str; 3] = ["saved", "retried_in_vain", "caused"];

#[derive(Clone, Copy)]
enum Decision {
    Agree = 0,
    WouldRetry = 1,
    WouldNotRetry = 2,
    WouldRefuseBudget = 3,
    WouldDemote = 4,
}

#[derive(Clone, Copy)]
enum Effect {
    Saved = 0,
    RetriedInVain = 1,
    Caused = 2,
}

/// What the shadow policy would have done for one model, counted since the
/// pool was built (the same numbers as the `shadow_*` metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShadowCounts {
    /// Requests where the candidate would have done what the live policy did.
    pub agree: u64,
    /// Failed requests the candidate would have retried once more.
    pub would_retry: u64,
    /// Requests where the live policy made a round the candidate would not.
    pub would_not_retry: u64,
    /// Requests where the candidate's budget would have refused a retry the
    /// live policy made.
    pub would_refuse_budget: u64,
    /// Times a provider would have been demoted and was not.
    pub would_demote: u64,
    /// `would_retry` requests whose provider's next live attempt after the
    /// candidate's wait succeeded.
    pub saved: u64,
    /// `would_retry` requests whose provider's next live attempt after the
    /// candidate's wait failed transiently.
    pub retried_in_vain: u64,
    /// Requests the live policy served that the candidate would have failed.
    pub caused: u64,
}

/// A model's shadow state.
#[derive(Debug)]
pub(crate) struct ShadowModel {
    budget: RetryBudget,
    decisions: [(Counter, AtomicU64); DECISIONS.len()],
    effects: [(Counter, AtomicU64); EFFECTS.len()],
}

impl ShadowModel {
    pub(crate) fn new(prefix: &str, model: &str) -> Self {
        let d = format!("{prefix}shadow_decisions_total");
        let e = format!("{prefix}shadow_failures_total");
        ShadowModel {
            budget: RetryBudget::new(),
            decisions: DECISIONS.map(|l| {
                let c = metrics::counter!(d.clone(), "model" => model.to_owned(), "decision" => l);
                (c, AtomicU64::new(0))
            }),
            effects: EFFECTS.map(|l| {
                let c = metrics::counter!(e.clone(), "model" => model.to_owned(), "effect" => l);
                (c, AtomicU64::new(0))
            }),
        }
    }

    fn decide(&self, d: Decision) {
        let (c, n) = &self.decisions[d as usize];
        c.increment(1);
        n.fetch_add(1, Ordering::Relaxed);
    }

    fn effect(&self, e: Effect, count: u64) {
        if count > 0 {
            let (c, n) = &self.effects[e as usize];
            c.increment(count);
            n.fetch_add(count, Ordering::Relaxed);
        }
    }

    fn counts(&self) -> ShadowCounts {
        let d = |x: Decision| self.decisions[x as usize].1.load(Ordering::Relaxed);
        let e = |x: Effect| self.effects[x as usize].1.load(Ordering::Relaxed);
        ShadowCounts {
            agree: d(Decision::Agree),
            would_retry: d(Decision::WouldRetry),
            would_not_retry: d(Decision::WouldNotRetry),
            would_refuse_budget: d(Decision::WouldRefuseBudget),
            would_demote: d(Decision::WouldDemote),
            saved: e(Effect::Saved),
            retried_in_vain: e(Effect::RetriedInVain),
            caused: e(Effect::Caused),
        }
    }
}

/// Registers the HELP texts of the shadow metrics.
pub(crate) fn describe(prefix: &str) {
    metrics::describe_counter!(
        format!("{prefix}shadow_decisions_total"),
        metrics::Unit::Count,
        "What the [shadow] candidate policy would have done differently, evaluated on live outcomes without acting: per request agree, would_retry, would_not_retry or would_refuse_budget; per provider would_demote."
    );
    metrics::describe_counter!(
        format!("{prefix}shadow_failures_total"),
        metrics::Unit::Count,
        "Failures the [shadow] candidate would have changed: saved (a would_retry whose provider's next live attempt after the candidate's wait succeeded), retried_in_vain (it failed), caused (a request served live that the candidate would have failed)."
    );
}

/// A route's shadow state.
#[derive(Debug, Default)]
pub(crate) struct ShadowRoute {
    /// Consecutive failed requests, counted as the candidate's health would.
    failed: AtomicU32,
    /// When the candidate's retries of failed requests would have started.
    pending: Mutex<VecDeque<Moment>>,
    pending_len: AtomicUsize,
}

impl ShadowRoute {
    /// An attempt on this route that started at `started` ended with
    /// `class` (`None`: success): decides the pending saves due by then.
    /// Returns (saved, retried in vain).
    fn resolve(&self, started: Moment, class: Option<Classification>) -> (u64, u64) {
        if self.pending_len.load(Ordering::Relaxed) == 0 {
            return (0, 0);
        }
        if !matches!(class, None | Some(Classification::Transient)) {
            return (0, 0);
        }
        let mut pending = match self.pending.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut due = 0;
        while pending.front().is_some_and(|&at| at <= started) {
            pending.pop_front();
            due += 1;
        }
        self.pending_len.store(pending.len(), Ordering::Relaxed);
        if class.is_none() { (due, 0) } else { (0, due) }
    }

    fn push(&self, at: Moment) {
        let mut pending = match self.pending.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if pending.len() >= MAX_PENDING {
            pending.pop_front();
        }
        // Kept in order: a later request's wait may end earlier.
        let i = pending.partition_point(|&p| p <= at);
        pending.insert(i, at);
        self.pending_len.store(pending.len(), Ordering::Relaxed);
    }
}

impl<P> Model<P> {
    /// Decides the shadow's pending saves on `route` after an attempt
    /// that started at `started` ended with `class` (`None`: success).
    #[inline]
    pub(super) fn resolve_shadow(
        &self,
        route: &Route<P>,
        started: Moment,
        class: Option<Classification>,
    ) {
        let shadow = &route.adaptive.shadow;
        // Nothing pending (no `[shadow]` candidate, or none of its retries
        // due): one load, inline, on every attempt, rather than two calls
        // that find nothing to count.
        if shadow.pending_len.load(Ordering::Relaxed) == 0 {
            return;
        }
        let (saved, in_vain) = shadow.resolve(started, class);
        self.shadow.effect(Effect::Saved, saved);
        self.shadow.effect(Effect::RetriedInVain, in_vain);
    }
}

/// How a request ended, for the shadow.
pub(super) enum Ended<'a> {
    /// Served by provider `i`.
    Served(u8),
    /// Failed.
    Failed(&'a FailReason),
}

/// What a request keeps to evaluate the shadow when it ends: the policy
/// snapshot it ran under (the candidate is in it), its deadline, and the
/// first retry the candidate would not have made.
pub(super) struct ShadowCall {
    active: Arc<ActivePolicy>,
    deadline: Moment,
    max_rounds: u32,
    budget: BudgetPolicy,
    stopped: Option<Decision>,
}

impl ShadowCall {
    /// With a candidate in `policy`: the request's shadow, its deposit made
    /// into the candidate's budget.
    pub(super) fn start<P>(
        m: &Model<P>,
        active: &Arc<ActivePolicy>,
        policy: &ModelPolicy,
        start: Moment,
        deadline: Moment,
    ) -> Option<ShadowCall> {
        let cand = policy.shadow()?;
        m.shadow.budget.deposit_scaled(start, &cand.budget, 1.0);
        Some(ShadowCall {
            active: active.clone(),
            deadline,
            max_rounds: cand.max_rounds,
            budget: cand.budget.clone(),
            stopped: None,
        })
    }

    /// The live policy paid for a retried attempt in `round`: would the
    /// candidate have made it? Charges the candidate's budget if so.
    pub(super) fn charge<P>(&mut self, m: &Model<P>, round: u32) {
        if self.stopped.is_some() {
            return;
        }
        if round > self.max_rounds {
            self.stopped = Some(Decision::WouldNotRetry);
        } else if !m.shadow.budget.withdraw_at(Moment::now(), &self.budget) {
            self.stopped = Some(Decision::WouldRefuseBudget);
        }
    }

    /// Replays the request's report against the candidate and counts what
    /// it would have done (see the module docs).
    pub(super) fn observe<P>(&self, m: &Model<P>, report: &Report, ended: Ended<'_>) {
        let Some(cand) = self.active.for_model(m.name).shadow() else {
            return;
        };
        let st = &m.shadow;
        let now = Moment::now();
        let index = |name: &str| m.routes.iter().position(|r| r.name == name);
        let rounds = report.rounds;
        let decision = match (self.stopped, &ended) {
            (Some(d), Ended::Served(_)) => {
                st.effect(Effect::Caused, 1);
                d
            }
            (Some(d), Ended::Failed(_)) => d,
            (None, Ended::Failed(FailReason::RoundsExhausted | FailReason::BudgetExhausted)) => {
                let retry: SmallVec<[usize; 8]> = report
                    .failures()
                    .iter()
                    .filter(|f| f.round == rounds && f.verdict.class.is_retryable())
                    .filter_map(|f| index(f.provider))
                    .collect();
                let wait = backoff(cand.base_delay(), cand.backoff, rounds, cand.max_delay);
                let would = rounds < cand.max_rounds
                    && !retry.is_empty()
                    && now + wait < self.deadline
                    && retry
                        .iter()
                        .all(|_| st.budget.withdraw_at(now, &cand.budget));
                if would {
                    for &i in &retry {
                        m.routes[i].adaptive.shadow.push(now + wait);
                    }
                    Decision::WouldRetry
                } else {
                    Decision::Agree
                }
            }
            (None, _) => Decision::Agree,
        };
        st.decide(decision);
        // Health, as the candidate would count it.
        let mut counted = 0u64;
        for f in report.failures() {
            if f.verdict.class == Classification::Permanent || !f.verdict.cause.is_provider_fault()
            {
                continue;
            }
            let Some(i) = index(f.provider) else {
                continue;
            };
            if counted & (1 << i) != 0 {
                continue;
            }
            counted |= 1 << i;
            let route = &m.routes[i];
            let n = route.adaptive.shadow.failed.fetch_add(1, Ordering::Relaxed) + 1;
            if n == cand.health.demote_after && !route.health.is_demoted() {
                st.decide(Decision::WouldDemote);
            }
        }
        if let Ended::Served(i) = ended {
            if let Some(route) = m.routes.get(usize::from(i)) {
                route.adaptive.shadow.failed.store(0, Ordering::Relaxed);
            }
        }
    }
}

impl<P, C> Pool<P, C> {
    /// What the `[shadow]` candidate would have done for `model` so far
    /// (all zero without a candidate); `None` for an unknown model.
    pub fn shadow_counts(&self, model: &str) -> Option<ShadowCounts> {
        Some(self.model(model)?.shadow.counts())
    }
}
