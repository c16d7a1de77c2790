//! Unit tests of the reload thread and the event filter.

use std::collections::BTreeMap;
use std::sync::Mutex;

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString,
    Unit,
};
use notify_debouncer_full::notify::event::{AccessKind, AccessMode};
use notify_debouncer_full::notify::event::{CreateKind, ModifyKind, RenameMode};
use notify_debouncer_full::notify::{Event, EventKind};

use super::events::touches;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::reloader::{Outcome, ReloadMetrics, Reloader, hex};
use super::watcher::ReloadStatus;
use super::*;
use crate::policy::{LivePolicy, Policy};

/// Keeps the last value of every series, keyed `name{label=value,...}`.
#[derive(Clone, Default)]
struct Values(Arc<Mutex<BTreeMap<String, f64>>>);

struct Series(Values, String);

impl Series {
    fn update(&self, f: impl FnOnce(&mut f64)) {
        if let Ok(mut values) = self.0.0.lock() {
            f(values.entry(self.1.clone()).or_insert(0.0));
        }
    }
}

impl CounterFn for Series {
    fn increment(&self, value: u64) {
        self.update(|v| *v += value as f64);
    }
    fn absolute(&self, value: u64) {
        self.update(|v| *v = v.max(value as f64));
    }
}

impl GaugeFn for Series {
    fn increment(&self, value: f64) {
        self.update(|v| *v += value);
    }
    fn decrement(&self, value: f64) {
        self.update(|v| *v -= value);
    }
    fn set(&self, value: f64) {
        self.update(|v| *v = value);
    }
}

impl Values {
    fn series(&self, key: &Key) -> Arc<Series> {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = if labels.is_empty() {
            key.name().to_owned()
        } else {
            format!("{}{{{}}}", key.name(), labels.join(","))
        };
        Arc::new(Series(self.clone(), name))
    }

    fn get(&self, series: &str) -> Option<f64> {
        self.0.lock().ok()?.get(series).copied()
    }
}

impl Recorder for Values {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.series(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.series(key))
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

fn reloader(path: &Path, live: &LivePolicy) -> Reloader {
    Reloader {
        path: path.to_owned(),
        live: live.clone(),
        status: Arc::new(ReloadStatus::default()),
        settle: Duration::ZERO,
        last_read: None,
        info_hash: None,
        names: ReloadMetrics::new(&crate::telemetry::DEFAULT_PREFIX.into()),
    }
}

#[test]
fn metrics_follow_applied_unchanged_and_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    let live = LivePolicy::default();
    let default_hash = hex(live.load().version());
    let mut r = reloader(&path, &live);
    let values = Values::default();
    let applied = format!("{RELOADS_TOTAL}{{result=applied}}");
    let unchanged = format!("{RELOADS_TOTAL}{{result=unchanged}}");
    let rejected = format!("{RELOADS_TOTAL}{{result=rejected}}");
    metrics::with_local_recorder(&values, || {
        std::fs::write(&path, "").unwrap();
        assert_eq!(r.reload(), Outcome::Unchanged, "empty = the defaults");
        assert_eq!(values.get(&unchanged), Some(1.0));
        assert_eq!(values.get(RELOAD_FAILING), Some(0.0));
        assert!(values.get(LAST_RELOAD_SUCCESS_TIMESTAMP).unwrap() > 1.7e9);
        let info_default = format!("{POLICY_INFO}{{hash={default_hash}}}");
        assert_eq!(values.get(&info_default), Some(1.0));

        std::fs::write(&path, "[budget]\nratio = 2.0\n").unwrap();
        assert_eq!(r.reload(), Outcome::Rejected);
        assert_eq!(values.get(&rejected), Some(1.0));
        assert_eq!(values.get(RELOAD_FAILING), Some(1.0));
        let e = r.status.last_error().unwrap();
        assert_eq!(e.policy_error().unwrap().location, Some((2, 9)));
        assert_eq!(values.get(&info_default), Some(1.0), "still in force");

        std::fs::write(&path, "max_rounds = 3\n").unwrap();
        assert_eq!(r.reload(), Outcome::Applied);
        let new_hash = hex(live.load().version());
        assert_eq!(new_hash.len(), 16);
        assert_ne!(new_hash, default_hash);
        assert_eq!(values.get(&applied), Some(1.0));
        assert_eq!(values.get(RELOAD_FAILING), Some(0.0));
        assert_eq!(
            values.get(&info_default),
            Some(0.0),
            "the old series is zeroed"
        );
        assert_eq!(
            values.get(&format!("{POLICY_INFO}{{hash={new_hash}}}")),
            Some(1.0)
        );
        assert!(r.status.last_error().is_none());
        std::fs::remove_file(&path).unwrap();
        assert_eq!(r.reload(), Outcome::Rejected);
        assert!(r.status.last_error().unwrap().is_not_found());
        assert_eq!(values.get(RELOAD_FAILING), Some(1.0));
    });
    assert_eq!(
        r.status.counts(),
        ReloadCounts {
            applied: 1,
            unchanged: 1,
            rejected: 2
        }
    );
    assert_eq!(live.load().policy().max_rounds, 3);
}

#[test]
fn directories_devices_and_huge_files_are_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        read_policy_file(dir.path()),
        Err(LoadError::NotAFile { .. })
    ));
    let big = dir.path().join("big.toml");
    let line = "# comment\n".repeat(110_000);
    std::fs::write(&big, line).unwrap();
    let e = read_policy_file(&big).unwrap_err();
    assert!(matches!(e, LoadError::TooLarge { .. }), "{e}");
    #[cfg(unix)]
    {
        let e = read_policy_file(Path::new("/dev/zero")).unwrap_err();
        assert!(matches!(e, LoadError::NotAFile { .. }), "{e}");
    }
}

#[test]
fn only_events_on_the_file_or_data_link_count_and_reads_do_not() {
    let name = OsStr::new("policy.toml");
    let event = |kind, path: &str| Event::new(kind).add_path(PathBuf::from(path));
    let modify = EventKind::Modify(ModifyKind::Any);
    assert!(touches(&event(modify, "/etc/r/policy.toml"), name));
    assert!(touches(&event(modify, "/etc/r/..data"), name));
    assert!(!touches(&event(modify, "/etc/r/other.toml"), name));
    assert!(!touches(&event(modify, "/etc/r/..data_tmp"), name));
    let create = EventKind::Create(CreateKind::File);
    assert!(touches(&event(create, "/etc/r/policy.toml"), name));
    let rename = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
    let swap = event(rename, "/etc/r/..data_tmp").add_path(PathBuf::from("/etc/r/..data"));
    assert!(touches(&swap, name));
    let open = EventKind::Access(AccessKind::Open(AccessMode::Any));
    assert!(
        !touches(&event(open, "/etc/r/policy.toml"), name),
        "our own read"
    );
    let closed = EventKind::Access(AccessKind::Close(AccessMode::Write));
    assert!(touches(&event(closed, "/etc/r/policy.toml"), name));
    let rescan = Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
    assert!(touches(&rescan, name));
}

#[test]
fn load_errors_read_like_compiler_errors() {
    let e = LoadError::Invalid {
        path: PathBuf::from("config/policy.toml"),
        error: Policy::from_toml("\n[budget]\nratio = 3.0\n").unwrap_err(),
    };
    assert_eq!(
        e.to_string(),
        "config/policy.toml:3:9: `budget.ratio` = 3.0 is invalid: a number within 0.0..=1.0"
    );
}
