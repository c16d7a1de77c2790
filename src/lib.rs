//! retryctl: a retry layer for LLM inference gateways.
//!
//! A gateway with one provider per model saw ~9,500 "all providers failed"
//! errors a day, nearly all transient TCP failures: a listen backlog of 1
//! in a VM network stack, nginx reloads, Docker bridge churn. One more
//! round after 500 ms fixed most of them. This crate is that retry layer
//! done right:
//!
//! * a [`Pool`] routes each request for a model across its providers in
//!   rounds, with no wait between *different* providers and a jittered
//!   wait before retrying the *same* one;
//! * every failed attempt is [classified](Classify) from error kinds first
//!   (HTTP status, reqwest's or hyper-util's flags, io kinds in the
//!   `source()` chain) and from
//!   keywords only for opaque text;
//! * retries are paid from a lock-free [`RetryBudget`] and never wait past
//!   the request's deadline;
//! * provider health is counted once per request, and a demoted provider
//!   comes back through a probe instead of being dropped;
//! * the [`Policy`](policy::Policy) is plain TOML-friendly data, swapped atomically in a
//!   [`LivePolicy`](policy::LivePolicy) while requests run; each request uses one snapshot.
//!
//! ```
//! use retryctl::policy::LivePolicy;
//! use retryctl::{Classification, Pool};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let pool = Pool::builder()
//!     .provider("gpt-oss-120b", "proxy", ())
//!     .policy(LivePolicy::default())
//!     .build()
//!     .unwrap();
//! // The first attempt is refused: the upstream never saw it, so it is sent
//! // again as soon as the provider's admission gate lets it through (at
//! // once here), in the same round and without spending retry budget.
//! let mut calls = 0;
//! let served = pool
//!     .call("gpt-oss-120b", |_| {
//!         calls += 1;
//!         let n = calls;
//!         async move {
//!             if n == 1 {
//!                 Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
//!             } else {
//!                 Ok("hello")
//!             }
//!         }
//!     })
//!     .await
//!     .unwrap();
//! assert_eq!((served.value, served.attempts(), served.rounds()), ("hello", 2, 1));
//! let failure = &served.report.failures()[0];
//! assert_eq!(failure.verdict.class, Classification::Transient);
//! # }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(missing_debug_implementations, unreachable_pub, rust_2018_idioms)]

mod budget;
mod classifier;
mod classify;
mod clock;
mod health;
mod live;
pub mod policy;
mod pool;
mod recovery;
pub mod reload;
pub mod stats;
mod stripe;
pub mod telemetry;
#[doc(hidden)]
pub mod toml_error;
#[cfg(feature = "tower")]
pub mod tower;
#[cfg(any(feature = "reqwest", feature = "hyper-client"))]
pub mod upstream;

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub use budget::RetryBudget;
pub use classifier::{Classifier, DefaultClassifier};
pub use classify::{Cause, Classification, Classify, Rules, Verdict};
pub use pool::{
    AttemptError, BuildError, CallOptions, FailReason, FailedAttempt, Pool, PoolBuilder, PoolError,
    Report, Served,
};
