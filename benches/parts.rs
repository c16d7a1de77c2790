//! The parts of a pool call, one at a time: where the nanoseconds of
//! `Pool::call` can go.
//!
//! * `clock`: `Instant::now()`, std and tokio (the reference for "one clock
//!   reading").
//! * `policy`: `LivePolicy::load`, the per-request policy snapshot
//!   (`ArcSwap::load_full`), next to a guard `load()` for reference.
//! * `budget`: `RetryBudget::deposit` / `withdraw` on 1 and 2 threads, and
//!   tower's `TpsBudget` deposit for reference. The clock reading is taken
//!   once per sample and passed in, as the pool passes the request's.
//! * `classify`: `Rules::io_kind`, `io::Error::classify` (walks the
//!   `source()` chain), `Rules::status`, `Rules::text` on a 120-byte message.
//! * `blocks`: the building blocks of the success path that the crate keeps
//!   private (per-route statistics, metric handles, the attempt timer), so
//!   they are measured as the same library calls made the same way:
//!   hdrhistogram behind a `Mutex` `try_lock` (what `RouteStats::record`
//!   does), a Prometheus histogram and counter handle, `tokio::time::timeout`
//!   around a ready future, an `Arc<str>` clone, a `HashMap<Arc<str>, _>`
//!   lookup of a model name (std's SipHash). `Pool::stats` (public) is
//!   measured as is.
//!
//! `cargo bench -p retryctl-bench --bench parts`

mod common;

use std::collections::HashMap;
use std::hint::black_box;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use criterion::{Criterion, criterion_group, criterion_main};
use retryctl::policy::{BudgetPolicy, LivePolicy, Policy};
use retryctl::{Classify, RetryBudget, Rules};
use tokio::runtime::Runtime;
use tower::retry::budget::{Budget, TpsBudget};

use common::{default_policy, on_two_threads, pool, runtime, timed, upkeep, upstream};

/// A transient failure as reqwest and hyper display it, 120 bytes.
const TEXT_TRANSIENT: &str = "error sending request for url (http://10.0.0.1:8000/v1/chat/completions): upstream: a Connection RESET by peer (os 104).";
/// 120 bytes with no keyword: the whole text is scanned.
const TEXT_OPAQUE: &str = "upstream returned an unexpected payload: expected value at line 1 column 1 while parsing the completion chunk from it...";

fn clock(c: &mut Criterion) {
    let mut g = c.benchmark_group("clock");
    g.bench_function("std_instant_now", |b| b.iter(std::time::Instant::now));
    g.bench_function("tokio_instant_now", |b| b.iter(tokio::time::Instant::now));
    g.finish();
}

fn policy(c: &mut Criterion) {
    let live = LivePolicy::new(Policy::default()).expect("valid");
    let swap = ArcSwap::from_pointee(Policy::default());
    let mut g = c.benchmark_group("policy");
    g.bench_function("live_policy_load", |b| b.iter(|| live.load()));
    g.bench_function("arcswap_load_guard", |b| {
        b.iter(|| black_box(swap.load().max_rounds))
    });
    g.finish();
}

/// Enabled, 20%, and a reserve of 10^7 retries: a withdrawal is always
/// granted within a sample (a new budget per sample), so the bench
/// measures a granted withdrawal, the pool's retry path.
fn deep_budget() -> BudgetPolicy {
    BudgetPolicy {
        enabled: true,
        min_per_second: 1_000_000,
        ..BudgetPolicy::default()
    }
}

fn budget(c: &mut Criterion) {
    let deposit_policy = BudgetPolicy::default();
    let withdraw_policy = deep_budget();
    let mut g = c.benchmark_group("budget");
    g.bench_function("deposit_1t", |b| {
        let budget = RetryBudget::new();
        b.iter_custom(|iters| {
            let now = tokio::time::Instant::now();
            let start = std::time::Instant::now();
            for _ in 0..iters {
                budget.deposit(black_box(now), &deposit_policy);
            }
            start.elapsed()
        });
    });
    g.bench_function("withdraw_1t", |b| {
        b.iter_custom(|iters| {
            let budget = RetryBudget::new();
            let now = tokio::time::Instant::now();
            let start = std::time::Instant::now();
            for _ in 0..iters {
                assert!(budget.withdraw(black_box(now), &withdraw_policy));
            }
            start.elapsed()
        });
    });
    g.bench_function("deposit_2t", |b| {
        let budget = Arc::new(RetryBudget::new());
        b.iter_custom(|iters| {
            let budget = budget.clone();
            let now = tokio::time::Instant::now();
            on_two_threads(
                iters,
                Arc::new(move |_: &Runtime, n| {
                    let policy = BudgetPolicy::default();
                    let start = std::time::Instant::now();
                    for _ in 0..n {
                        budget.deposit(black_box(now), &policy);
                    }
                    start.elapsed()
                }),
            )
        });
    });
    g.bench_function("withdraw_2t", |b| {
        b.iter_custom(|iters| {
            let budget = Arc::new(RetryBudget::new());
            let now = tokio::time::Instant::now();
            on_two_threads(
                iters,
                Arc::new(move |_: &Runtime, n| {
                    let policy = deep_budget();
                    let start = std::time::Instant::now();
                    for _ in 0..n {
                        assert!(budget.withdraw(black_box(now), &policy));
                    }
                    start.elapsed()
                }),
            )
        });
    });
    g.bench_function("tower_tps_deposit_1t", |b| {
        let budget = TpsBudget::default();
        b.iter(|| budget.deposit());
    });
    g.bench_function("tower_tps_deposit_2t", |b| {
        let budget = Arc::new(TpsBudget::default());
        b.iter_custom(|iters| {
            let budget = budget.clone();
            on_two_threads(
                iters,
                Arc::new(move |_: &Runtime, n| {
                    let start = std::time::Instant::now();
                    for _ in 0..n {
                        budget.deposit();
                    }
                    start.elapsed()
                }),
            )
        });
    });
    g.finish();
}

fn classify(c: &mut Criterion) {
    assert_eq!(TEXT_TRANSIENT.len(), 120);
    assert_eq!(TEXT_OPAQUE.len(), 120);
    let rules = Rules::default();
    let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
    let mut g = c.benchmark_group("classify");
    g.bench_function("io_kind", |b| {
        b.iter(|| rules.io_kind(black_box(io::ErrorKind::ConnectionRefused)))
    });
    g.bench_function("io_error", |b| {
        b.iter(|| black_box(&refused).classify(&rules))
    });
    g.bench_function("status_503", |b| {
        b.iter(|| rules.status(black_box(503), None, ""))
    });
    g.bench_function("status_500_body_120b", |b| {
        b.iter(|| rules.status(black_box(500), None, black_box(TEXT_OPAQUE)))
    });
    g.bench_function("text_120b_transient", |b| {
        b.iter(|| rules.text(black_box(TEXT_TRANSIENT)))
    });
    g.bench_function("text_120b_opaque", |b| {
        b.iter(|| rules.text(black_box(TEXT_OPAQUE)))
    });
    g.finish();
}

fn blocks(c: &mut Criterion) {
    let rt = runtime();
    let pool = pool(1, default_policy());
    common::prometheus();
    let histogram =
        metrics::histogram!("bench_attempt_duration_seconds", "model" => "m", "provider" => "p");
    let counter = metrics::counter!("bench_attempts_total", "model" => "m", "provider" => "p", "result" => "ok");
    let stats = Mutex::new(
        hdrhistogram::Histogram::<u32>::new_with_bounds(1, 600_000_000, 2).expect("bounds"),
    );
    let mut plain =
        hdrhistogram::Histogram::<u32>::new_with_bounds(1, 600_000_000, 2).expect("bounds");
    let name: Arc<str> = Arc::from("proxy-a");
    // The pool's model index: `HashMap<Arc<str>, usize>`, std's SipHash.
    let models: HashMap<Arc<str>, usize> =
        ["zai-org/GLM-5-FP8", common::MODEL, "Qwen/Qwen3.5-122B-A10B"]
            .into_iter()
            .enumerate()
            .map(|(i, m)| (Arc::from(m), i))
            .collect();

    let mut g = c.benchmark_group("blocks");
    g.bench_function("hdrhistogram_record", |b| {
        b.iter(|| plain.saturating_record(black_box(300)))
    });
    g.bench_function("mutex_try_lock_hdr_record", |b| {
        b.iter(|| {
            if let Ok(mut h) = stats.try_lock() {
                h.saturating_record(black_box(300));
            }
        })
    });
    g.bench_function("prometheus_histogram_record", |b| {
        b.iter_custom(|iters| {
            let start = std::time::Instant::now();
            for _ in 0..iters {
                histogram.record(black_box(0.0003));
            }
            let d = start.elapsed();
            upkeep();
            d
        })
    });
    g.bench_function("prometheus_counter_increment", |b| {
        b.iter(|| counter.increment(1))
    });
    g.bench_function("tokio_timeout_ready", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            timed(iters, || {
                tokio::time::timeout(Duration::from_secs(90), upstream())
            })
        })
    });
    g.bench_function("arc_str_clone", |b| b.iter(|| name.clone()));
    g.bench_function("model_lookup_siphash", |b| {
        b.iter(|| models.get(black_box(common::MODEL)).copied())
    });
    g.bench_function("pool_stats_snapshot", |b| b.iter(|| pool.stats()));
    g.finish();
}

criterion_group!(benches, clock, policy, budget, classify, blocks);
criterion_main!(benches);
