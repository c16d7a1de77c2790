//! The seeded fault schedule: when each failure mode strikes.
//!
//! Connection-level faults (reload, restart, backlog) are time windows: they
//! hit every new connection while they last, whichever request it carries.
//! Response-level noise (5xx, client errors, slow responses) is decided per
//! request id and attempt number from the seed, so the baseline pool and the
//! retrying pool see the same noise on the same requests. Windows are
//! separated by at least 1.5 seconds, longer than any retry wait of the
//! default policy, so a retry never lands in the *next* window by chance.

use std::time::Duration;

use serde::Serialize;

/// A failure mode of the demo's upstreams.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// A listen backlog of 1 accepting slowly (a VM network stack): bursts
    /// of new connections stall until the client's connect timeout.
    Backlog,
    /// A reload window (nginx): new connections refused or reset.
    Reload,
    /// A restart (container): the port is closed for seconds.
    Restart,
    /// A 502 or 503 (some with Retry-After).
    Status5xx,
    /// A genuine client error (400): must never be retried.
    ClientError,
    /// A slow response.
    Slow,
}

impl FaultKind {
    /// Every kind, in report order.
    pub const ALL: [FaultKind; 6] = [
        FaultKind::Reload,
        FaultKind::Backlog,
        FaultKind::Restart,
        FaultKind::Status5xx,
        FaultKind::ClientError,
        FaultKind::Slow,
    ];

    /// A short human description.
    pub fn describe(self) -> &'static str {
        match self {
            FaultKind::Backlog => "backlog 1, slow accept",
            FaultKind::Reload => "reload: refused/reset",
            FaultKind::Restart => "restart: down 2-5 s",
            FaultKind::Status5xx => "502/503",
            FaultKind::ClientError => "client error 400",
            FaultKind::Slow => "slow response",
        }
    }
}

/// A connection-level fault window, relative to the start of traffic.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Window {
    /// What happens.
    pub kind: FaultKind,
    /// When it starts.
    #[serde(with = "humantime_serde")]
    pub start: Duration,
    /// When it ends.
    #[serde(with = "humantime_serde")]
    pub end: Duration,
    /// For a reload: reset accepted connections instead of refusing them.
    pub reset: bool,
}

/// What the upstream does to one attempt, outside connection faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Noise {
    /// A normal 200.
    None,
    /// A 5xx, with an optional Retry-After in seconds.
    Status(u16, Option<u32>),
    /// A 400 for a bad request (decided by request id only).
    ClientError,
    /// A 200 after a delay.
    Slow(Duration),
}

impl Noise {
    /// The fault kind this noise counts as, if any.
    pub fn kind(self) -> Option<FaultKind> {
        match self {
            Noise::None => None,
            Noise::Status(..) => Some(FaultKind::Status5xx),
            Noise::ClientError => Some(FaultKind::ClientError),
            Noise::Slow(_) => Some(FaultKind::Slow),
        }
    }
}

/// Per-attempt noise rates.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct NoiseRates {
    /// Share of attempts answered 502.
    pub bad_gateway: f64,
    /// Share of attempts answered 503 (half of them with Retry-After: 1).
    pub unavailable: f64,
    /// Share of *requests* that are genuinely bad (400 on every attempt).
    pub client_error: f64,
    /// Share of attempts answered slowly.
    pub slow: f64,
    /// How slow.
    #[serde(with = "humantime_serde")]
    pub slow_delay: Duration,
}

impl Default for NoiseRates {
    fn default() -> Self {
        NoiseRates {
            bad_gateway: 0.01,
            unavailable: 0.01,
            client_error: 0.005,
            slow: 0.005,
            slow_delay: Duration::from_millis(800),
        }
    }
}

/// The whole schedule of one demo run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Schedule {
    /// The seed everything derives from.
    pub seed: u64,
    /// Connection-level windows, in time order, never overlapping.
    pub windows: Vec<Window>,
    /// Per-attempt noise.
    pub noise: NoiseRates,
}

/// The least time between two windows: longer than any retry wait of the
/// default policy (500 ms + 20%) plus a reload window.
const MIN_GAP: Duration = Duration::from_millis(1500);

impl Schedule {
    /// A reproducible schedule for a run of `duration`: reloads and backlog
    /// stalls every few seconds, one restart near the middle of runs of
    /// 15 s or more.
    pub fn generate(seed: u64, duration: Duration) -> Schedule {
        let mut rng = fastrand::Rng::with_seed(seed);
        let ms =
            |lo: u64, hi: u64, rng: &mut fastrand::Rng| Duration::from_millis(rng.u64(lo..=hi));
        let mut windows = Vec::new();
        let restart_at = (duration >= Duration::from_secs(15)).then(|| duration.mul_f64(0.55));
        let mut restarted = false;
        let mut t = Duration::from_secs(1) + ms(0, 1000, &mut rng);
        while t + Duration::from_secs(1) < duration {
            let (kind, len) = match restart_at {
                Some(at) if !restarted && t >= at => {
                    restarted = true;
                    (FaultKind::Restart, ms(2000, 5000, &mut rng))
                }
                _ if rng.f64() < 0.55 => (FaultKind::Reload, ms(100, 300, &mut rng)),
                _ => (FaultKind::Backlog, ms(150, 600, &mut rng)),
            };
            let end = (t + len).min(duration);
            windows.push(Window {
                kind,
                start: t,
                end,
                reset: kind == FaultKind::Reload && rng.bool(),
            });
            t = end + MIN_GAP + ms(0, 1500, &mut rng);
        }
        Schedule {
            seed,
            windows,
            noise: NoiseRates::default(),
        }
    }

    /// The window active at `t`, if any.
    pub fn window_at(&self, t: Duration) -> Option<&Window> {
        self.windows.iter().find(|w| w.start <= t && t < w.end)
    }

    /// The first window edge (start or end) after `t`.
    pub fn next_edge(&self, t: Duration) -> Option<Duration> {
        self.windows
            .iter()
            .flat_map(|w| [w.start, w.end])
            .find(|&e| e > t)
    }

    /// What the upstream does to attempt `attempt` (1-based) of request
    /// `request`.
    pub fn noise(&self, request: u64, attempt: u32) -> Noise {
        let n = &self.noise;
        let bad_request =
            fastrand::Rng::with_seed(self.seed ^ request.wrapping_mul(0x9E37_79B9_7F4A_7C15)).f64();
        if bad_request < n.client_error {
            return Noise::ClientError;
        }
        let mut rng = fastrand::Rng::with_seed(
            self.seed
                ^ request.wrapping_mul(0xD1B5_4A32_D192_ED03)
                ^ u64::from(attempt).wrapping_mul(0xA24B_AED4_963E_E407),
        );
        let x = rng.f64();
        if x < n.bad_gateway {
            Noise::Status(502, None)
        } else if x < n.bad_gateway + n.unavailable {
            Noise::Status(503, rng.bool().then_some(1))
        } else if x < n.bad_gateway + n.unavailable + n.slow {
            Noise::Slow(n.slow_delay)
        } else {
            Noise::None
        }
    }

    /// Total time covered by windows of `kind`.
    pub fn time_in(&self, kind: FaultKind) -> Duration {
        self.windows
            .iter()
            .filter(|w| w.kind == kind)
            .map(|w| w.end - w.start)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_schedule_and_noise() {
        let a = Schedule::generate(7, Duration::from_secs(30));
        let b = Schedule::generate(7, Duration::from_secs(30));
        assert_eq!(a, b);
        assert_ne!(a, Schedule::generate(8, Duration::from_secs(30)));
        for id in 0..1000 {
            assert_eq!(a.noise(id, 1), b.noise(id, 1));
        }
    }

    #[test]
    fn windows_are_ordered_separated_and_cover_every_kind() {
        let s = Schedule::generate(42, Duration::from_secs(30));
        for pair in s.windows.windows(2) {
            assert!(pair[1].start >= pair[0].end + MIN_GAP);
        }
        assert_eq!(
            s.windows
                .iter()
                .filter(|w| w.kind == FaultKind::Restart)
                .count(),
            1
        );
        assert!(s.windows.iter().any(|w| w.kind == FaultKind::Reload));
        assert!(s.windows.iter().any(|w| w.kind == FaultKind::Backlog));
        assert!(s.windows.last().unwrap().end <= Duration::from_secs(30));
    }

    #[test]
    fn noise_rates_are_roughly_as_configured() {
        let s = Schedule::generate(1, Duration::from_secs(30));
        let n = 100_000;
        let count =
            |f: fn(Noise) -> bool| (0..n).filter(|&i| f(s.noise(i, 1))).count() as f64 / n as f64;
        assert!((count(|x| matches!(x, Noise::Status(502, _))) - 0.01).abs() < 0.002);
        assert!((count(|x| matches!(x, Noise::ClientError)) - 0.005).abs() < 0.002);
        // a bad request is bad on every attempt; other noise is per attempt
        for id in 0..n {
            if s.noise(id, 1) == Noise::ClientError {
                assert_eq!(s.noise(id, 2), Noise::ClientError);
            }
        }
    }
}
