//! The upstream faults: a seeded schedule of nginx reloads and restarts
//! per instance, carried out on time, each one recorded as a window.
//!
//! A response that is not a success must be explained by a fault: every
//! provider its failure names had a fault window overlapping the request.
//! The windows are what actually happened (from the moment the command
//! was sent until it returned, or until nginx listened again), not what
//! was planned, so a late or slow reload is attributed as it was.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::Error;
use crate::nginx::{Nginx, Stop};

/// How long a fault's effects are allowed to last after its window ends:
/// a connection the old worker closed can be found dead by the gateway's
/// next request on it, and after a restart the admission gate probes the
/// upstream again within its probe interval (100 ms doubling to 1 s with
/// the policies written here) and reopens with slow start.
pub(crate) const GRACE: Duration = Duration::from_secs(2);

/// What the schedule does to one instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// `nginx -s reload`.
    Reload,
    /// Stop the master, wait `gap` with the port closed, start it again
    /// on the same port.
    Restart { stop: Stop, gap: Duration },
}

/// One scheduled fault, `at` after the load starts.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Planned {
    pub(crate) at: Duration,
    pub(crate) action: Action,
}

/// How often faults come.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FaultOptions {
    /// Reloads of each instance are this far apart (uniform).
    pub(crate) reload_every: (Duration, Duration),
    /// Each instance is restarted about once per this period.
    pub(crate) restart_every: Duration,
    /// The port stays closed this long during a restart (uniform).
    pub(crate) restart_gap: (Duration, Duration),
}

fn uniform(rng: &mut fastrand::Rng, (lo, hi): (Duration, Duration)) -> Duration {
    let (lo, hi) = (
        lo.as_micros() as u64,
        hi.as_micros().max(lo.as_micros()) as u64,
    );
    Duration::from_micros(rng.u64(lo..=hi))
}

/// The faults of instance `index` of `instances` over `run`, from `seed`.
///
/// Restarts of different instances never overlap: instance `i` is
/// restarted at `(k + (i + 1) / (instances + 1)) x restart_every`, moved
/// by at most a sixteenth of the period, so the model always has a provider
/// that listens (the gaps are far shorter than a period). Reloads fill the
/// time between restarts.
pub(crate) fn plan(
    seed: u64,
    index: usize,
    instances: usize,
    run: Duration,
    options: &FaultOptions,
) -> Vec<Planned> {
    let mut rng =
        fastrand::Rng::with_seed(seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let period = options.restart_every;
    let mut restarts = Vec::new();
    let phase = (index + 1) as f64 / (instances + 1) as f64;
    let mut k = 0u32;
    loop {
        // The phase is at least a fifth, the jitter at most a sixteenth
        // either way: never negative.
        let jitter = (rng.f64() - 0.5) / 8.0;
        let at = period.mul_f64(f64::from(k) + phase + jitter);
        if at >= run {
            break;
        }
        let stop = if rng.bool() {
            Stop::Fast
        } else {
            Stop::Graceful
        };
        let gap = uniform(&mut rng, options.restart_gap);
        restarts.push(Planned {
            at,
            action: Action::Restart { stop, gap },
        });
        k += 1;
    }
    let mut planned = Vec::new();
    let mut at = uniform(&mut rng, options.reload_every);
    let mut next_restart = restarts.into_iter().peekable();
    while at < run {
        while let Some(r) = next_restart.next_if(|r| r.at <= at) {
            planned.push(r);
        }
        planned.push(Planned {
            at,
            action: Action::Reload,
        });
        at += uniform(&mut rng, options.reload_every);
    }
    planned.extend(next_restart);
    planned
}

/// What happened: one fault on one instance, as offsets from the start
/// of the load.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Window {
    pub(crate) instance: usize,
    pub(crate) action: Action,
    pub(crate) start: Duration,
    pub(crate) end: Duration,
}

impl Window {
    /// Whether a request that ran from `start` to `end` overlaps the
    /// window or its [`GRACE`].
    pub(crate) fn overlaps(&self, start: Duration, end: Duration) -> bool {
        start <= self.end + GRACE && end >= self.start
    }
}

/// The windows recorded so far, shared by the instances' runners.
#[derive(Debug, Default)]
pub(crate) struct Windows(Mutex<Vec<Window>>);

impl Windows {
    fn push(&self, w: Window) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(w);
    }

    pub(crate) fn take(&self) -> Vec<Window> {
        let mut all = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        all.sort_by_key(|w| w.start);
        all
    }
}

/// Carries out `planned` on `nginx` from `epoch` until `end`, recording
/// each fault. A reload whose time passed while the instance was being
/// restarted is skipped rather than fired in a burst. Returns the
/// instance, running, for the final stop.
pub(crate) async fn run(
    mut nginx: Nginx,
    index: usize,
    planned: Vec<Planned>,
    epoch: Instant,
    end: Instant,
    windows: Arc<Windows>,
) -> Result<Nginx, Error> {
    for p in planned {
        let due = epoch + p.at;
        if due >= end {
            break;
        }
        if p.action == Action::Reload && Instant::now() > due + Duration::from_millis(50) {
            continue;
        }
        tokio::time::sleep_until(due).await;
        let start = Instant::now();
        match p.action {
            Action::Reload => nginx.reload().await?,
            Action::Restart { stop, gap } => {
                nginx.stop(stop).await?;
                tokio::time::sleep(gap).await;
                nginx.launch().await?;
            }
        }
        windows.push(Window {
            instance: index,
            action: p.action,
            start: start - epoch,
            end: Instant::now() - epoch,
        });
    }
    Ok(nginx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> FaultOptions {
        FaultOptions {
            reload_every: (Duration::from_millis(100), Duration::from_millis(500)),
            restart_every: Duration::from_secs(20),
            restart_gap: (Duration::from_millis(200), Duration::from_millis(1500)),
        }
    }

    fn restarts(planned: &[Planned]) -> Vec<(Duration, Duration)> {
        planned
            .iter()
            .filter_map(|p| match p.action {
                Action::Restart { gap, .. } => Some((p.at, p.at + gap)),
                Action::Reload => None,
            })
            .collect()
    }

    #[test]
    fn the_same_seed_plans_the_same_faults_in_order() {
        let run = Duration::from_secs(600);
        let a = plan(7, 0, 2, run, &options());
        let b = plan(7, 0, 2, run, &options());
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        assert!(a.windows(2).all(|w| w[0].at <= w[1].at));
        assert!(a.iter().all(|p| p.at < run));
        // About three restarts a minute, reloads every 0.3 s on average.
        assert!(
            (25..=35).contains(&restarts(&a).len()),
            "{}",
            restarts(&a).len()
        );
        let reloads = a.iter().filter(|p| p.action == Action::Reload).count();
        assert!((1500..=2500).contains(&reloads), "{reloads}");
    }

    #[test]
    fn restarts_of_different_instances_never_overlap() {
        for seed in 0..50 {
            let run = Duration::from_secs(600);
            let a = restarts(&plan(seed, 0, 2, run, &options()));
            let b = restarts(&plan(seed, 1, 2, run, &options()));
            for (s, e) in &a {
                assert!(
                    b.iter().all(|(bs, be)| be < s || bs > e),
                    "seed {seed}: a's restart at {s:?} overlaps one of b's"
                );
            }
        }
    }
}
