//! Reading a policy file: bounded, never blocking on a FIFO, errors that
//! read like a compiler's (`path:line:column: message`).

use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::policy::{Policy, PolicyError};

/// The largest policy file read. A policy is a few kilobytes; anything
/// past this is a wrong path (a log file, a device), not a policy.
pub const MAX_POLICY_FILE_BYTES: u64 = 1 << 20;

/// Why a policy file could not be put in force.
#[derive(Debug)]
#[non_exhaustive]
pub enum LoadError {
    /// The file could not be read: missing, no permission, an I/O error.
    Read {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },
    /// The path names a directory, a device or a pipe.
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The file is larger than [`MAX_POLICY_FILE_BYTES`].
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The file was read but is not a valid policy (syntax, unknown key,
    /// wrong type, value out of range, not UTF-8 text).
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where.
        error: PolicyError,
    },
}

impl LoadError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            LoadError::Read { path, .. }
            | LoadError::NotAFile { path }
            | LoadError::TooLarge { path }
            | LoadError::Invalid { path, .. } => path,
        }
    }

    /// The policy error (field, value, allowed, line and column), when the
    /// file was read but refused.
    pub fn policy_error(&self) -> Option<&PolicyError> {
        match self {
            LoadError::Invalid { error, .. } => Some(error),
            _ => None,
        }
    }

    /// Whether the file does not exist (deleted, or not yet created).
    pub fn is_not_found(&self) -> bool {
        matches!(self, LoadError::Read { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

/// `path:line:column: message`, the form editors and terminals jump to.
impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path().display();
        match self {
            LoadError::Read { source, .. } => write!(f, "{path}: {source}"),
            LoadError::NotAFile { .. } => write!(f, "{path}: not a regular file"),
            LoadError::TooLarge { .. } => write!(
                f,
                "{path}: larger than {MAX_POLICY_FILE_BYTES} bytes, not a policy file"
            ),
            LoadError::Invalid { error, .. } => {
                if let Some((line, column)) = error.location {
                    write!(f, "{path}:{line}:{column}: ")?;
                } else {
                    write!(f, "{path}: ")?;
                }
                let message = PolicyError {
                    location: None,
                    ..error.clone()
                };
                write!(f, "{message}")
            }
        }
    }
}

impl std::error::Error for LoadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LoadError::Read { source, .. } => Some(source),
            LoadError::Invalid { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// An empty file is the default policy.
pub fn read_policy_file(path: &Path) -> Result<Policy, LoadError> {
    parse(path, read_bytes(path)?)
}

pub(super) fn read_bytes(path: &Path) -> Result<Vec<u8>, LoadError> {
    let read_error = |source| LoadError::Read {
        path: path.to_owned(),
        source,
    };
    // Checked before opening: opening a FIFO would block.
    let meta = std::fs::metadata(path).map_err(read_error)?;
    if !meta.is_file() {
        return Err(LoadError::NotAFile {
            path: path.to_owned(),
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0).min(1 << 16));
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_POLICY_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_POLICY_FILE_BYTES {
        return Err(LoadError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

pub(super) fn parse(path: &Path, bytes: Vec<u8>) -> Result<Policy, LoadError> {
    Policy::from_bytes(&bytes).map_err(|error| LoadError::Invalid {
        path: path.to_owned(),
        error,
    })
}
