//! The file-event source: notify, debounced, on the file's directory.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use notify_debouncer_full::notify::event::{AccessKind, AccessMode};
use notify_debouncer_full::notify::{self, EventKind, RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};

use super::watcher::{Message, StartError};

/// The name Kubernetes swaps to update a mounted ConfigMap.
const KUBERNETES_DATA: &str = "..data";

/// Watches the file's directory; events that name the file (or `..data`)
/// become [`Message::Changed`].
pub(super) fn watch(
    path: &Path,
    debounce: Duration,
    tx: mpsc::Sender<Message>,
) -> Result<Debouncer<RecommendedWatcher, RecommendedCache>, StartError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(OsStr::to_owned).unwrap_or_default();
    let handler = move |result: DebounceEventResult| {
        let message = match result {
            Ok(events) if events.iter().any(|e| touches(e, &name)) => Message::Changed,
            Ok(_) => return,
            Err(errors) => Message::WatchErrors(errors.iter().map(ToString::to_string).collect()),
        };
        let _ = tx.send(message);
    };
    let watch_error = |source| StartError::Watch {
        dir: dir.clone(),
        source,
    };
    let mut debouncer = new_debouncer(debounce, None, handler).map_err(watch_error)?;
    debouncer
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(watch_error)?;
    Ok(debouncer)
}

/// Whether an event may have changed the file named `name`: anything on
/// that name or on `..data` except the watcher's own reads (opens).
pub(super) fn touches(event: &notify::Event, name: &OsStr) -> bool {
    if event.need_rescan() {
        return true;
    }
    if let EventKind::Access(kind) = event.kind {
        if kind != AccessKind::Close(AccessMode::Write) {
            return false;
        }
    }
    event
        .paths
        .iter()
        .filter_map(|p| p.file_name())
        .any(|n| n == name || n == KUBERNETES_DATA)
}
