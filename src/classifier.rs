//! How a pool classifies its operation's errors: by the error's own
//! [`Classify`] impl (the default), or by a classifier given to the
//! builder, so an error type this crate cannot implement [`Classify`] for
//! (`anyhow::Error`, `tonic::Status`, a tower service's boxed error) needs
//! no newtype.
//!
//! ```
//! use retryctl::{Cause, Classification, Pool, Rules, Verdict};
//!
//! // An error type from another crate: the orphan rule forbids
//! // `impl Classify for Status` here; a function does the same job.
//! #[derive(Debug)]
//! struct Status { code: u16 }
//! impl std::fmt::Display for Status {
//!     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
//!         write!(f, "status {}", self.code)
//!     }
//! }
//!
//! let pool = Pool::builder()
//!     .provider("m", "a", ())
//!     .classifier(|e: &Status, rules: &Rules| rules.status(e.code, None, ""))
//!     .build()
//!     .unwrap();
//! # let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
//! # rt.block_on(async {
//! let err = pool
//!     .call("m", |_| async { Err::<(), _>(Status { code: 400 }) })
//!     .await
//!     .unwrap_err();
//! assert_eq!(err.report.attempts, 1, "a 400 is the caller's: not retried");
//! # });
//! ```

use crate::classify::{Classify, Rules, Verdict};

/// Classifies a pool operation's error `E` under the policy's [`Rules`].
///
/// Implemented by [`DefaultClassifier`] (the error's own [`Classify`]) and
/// by every `Fn(&E, &Rules) -> Verdict`. It runs only on failed attempts.
pub trait Classifier<E: ?Sized> {
    /// The verdict on `error`.
    fn verdict(&self, error: &E, rules: &Rules) -> Verdict;
}

/// The default [`Classifier`]: the error type's own [`Classify`] impl.
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultClassifier;

impl<E: Classify + ?Sized> Classifier<E> for DefaultClassifier {
    fn verdict(&self, error: &E, rules: &Rules) -> Verdict {
        error.classify(rules)
    }
}

impl<E: ?Sized, F: Fn(&E, &Rules) -> Verdict> Classifier<E> for F {
    fn verdict(&self, error: &E, rules: &Rules) -> Verdict {
        self(error, rules)
    }
}
