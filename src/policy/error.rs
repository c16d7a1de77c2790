//! [`PolicyError`]: why a policy was refused, and where in the file.

use std::fmt;

use crate::toml_error::{Seg, display_path, locate};

/// Why a policy was refused: which field, what value, what is allowed, and
/// where in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    /// Dotted path of the field (`budget.ratio`,
    /// `models."openai/gpt-oss-120b".budget.ratio`), empty for syntax
    /// errors and bytes that are not text.
    pub field: String,
    /// The offending value, empty when the parser refused it (wrong type,
    /// unknown key: `allowed` then holds the parser's message).
    pub value: String,
    /// What would have been accepted, or the parser's message.
    pub allowed: String,
    /// 1-based line and column in the source text, when known.
    pub location: Option<(usize, usize)>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some((line, col)) = self.location {
            write!(f, "line {line}, column {col}: ")?;
        }
        match (self.field.is_empty(), self.value.is_empty()) {
            (true, _) => write!(f, "{}", self.allowed),
            (false, true) => write!(f, "`{}`: {}", self.field, self.allowed),
            (false, false) => write!(
                f,
                "`{}` = {} is invalid: {}",
                self.field, self.value, self.allowed
            ),
        }
    }
}

impl std::error::Error for PolicyError {}

impl PolicyError {
    /// An error for `field` (its path within the policy being checked).
    pub(super) fn field(field: &str, value: impl fmt::Display, allowed: impl Into<String>) -> Self {
        PolicyError {
            field: field.to_owned(),
            value: value.to_string(),
            allowed: allowed.into(),
            location: None,
        }
    }
}

/// A validation error and the override whose resulting policy failed, if
/// any: `scope` is the override table's path (`["models", name]`,
/// `["shadow"]`, empty for the top level), and `error.field` is relative
/// to it.
pub(super) struct Invalid<'a> {
    pub(super) scope: Vec<&'a str>,
    pub(super) error: PolicyError,
}

impl Invalid<'_> {
    /// The error with the field's full path.
    pub(super) fn into_error(self) -> PolicyError {
        if self.scope.is_empty() {
            return self.error;
        }
        PolicyError {
            field: display_path(&self.segments()),
            ..self.error
        }
    }

    /// The full path: the scope, then the field's dotted path.
    fn segments(&self) -> Vec<Seg> {
        let scope = self.scope.iter().copied();
        let field = self.error.field.split('.').filter(|s| !s.is_empty());
        scope.chain(field).map(Seg::key).collect()
    }

    /// The error with its full path and where the value is written. An
    /// override's value that it does not set is inherited: the error then
    /// points at the override's nearest enclosing table and says so.
    pub(super) fn located(self, text: &str) -> PolicyError {
        let segments = self.segments();
        let (location, inherited) = match locate(text, &segments) {
            Some(at) => (Some(at), false),
            None if !self.scope.is_empty() => {
                let enclosing = (self.scope.len()..segments.len())
                    .rev()
                    .find_map(|n| locate(text, segments.get(..n).unwrap_or_default()));
                (enclosing, true)
            }
            None => (None, false),
        };
        let mut e = self.into_error();
        e.location = location;
        if inherited {
            e.allowed
                .push_str(" (the override does not set this value: it is inherited)");
        }
        e
    }
}
