//! What `Pool::call` costs on the hot path, against a direct call and
//! against peers (tower's `Retry` with its `TpsBudget`, and `backon`).
//!
//! * `success`: the operation succeeds at once; statistics and Prometheus
//!   metrics on (and one variant with metrics off, to isolate them).
//! * `retry`: the first attempt is refused (io `ConnectionRefused`), the
//!   retry succeeds; zero delay and a budget that never refuses.
//! * `contended`: the success path from 2 threads at once against one
//!   shared pool; the time is per call as each thread sees it.
//!
//! `cargo bench -p retryctl-bench --bench pool` (add `-- success` for one group).

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ConstantBuilder, Retryable};
use criterion::{Criterion, criterion_group, criterion_main};
use tokio::runtime::Runtime;
use tower::retry::Retry;
use tower::{Service, ServiceExt, service_fn};

use common::{
    TowerPolicy, default_policy, pool, pool_call, pool_call_refused_once, pool_without_metrics,
    refused_once, runtime, timed, upkeep, upstream, zero_delay_policy,
};

/// `iters` calls through tower's `Retry` (the service is always ready).
async fn tower_loop<S>(iters: u64, svc: &mut S) -> Duration
where
    S: Service<u32, Response = u64>,
    S::Error: std::fmt::Debug,
{
    let start = Instant::now();
    for _ in 0..iters {
        let ready = svc.ready().await.expect("ready");
        black_box(ready.call(0).await.expect("served"));
    }
    start.elapsed()
}

fn success(c: &mut Criterion) {
    let rt = runtime();
    let one = pool(1, default_policy());
    let three = pool(3, default_policy());
    let quiet = pool_without_metrics(1, default_policy());
    // The admission gate's cost when open: the same pool without it.
    let ungated = pool(1, {
        let mut p = default_policy();
        p.admission.enabled = false;
        p
    });
    let tower_policy = TowerPolicy::default_budget();
    let backoff = ConstantBuilder::new()
        .with_delay(Duration::ZERO)
        .with_max_times(1);

    let mut g = c.benchmark_group("success");
    g.bench_function("direct", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| timed(iters, || async { upstream().await.expect("ok") }));
    });
    for (id, p) in [
        ("pool_1p", &one),
        ("pool_1p_no_admission", &ungated),
        ("pool_3p", &three),
    ] {
        g.bench_function(id, |b| {
            b.to_async(&rt).iter_custom(|iters| async move {
                let d = timed(iters, || pool_call(p)).await;
                upkeep();
                d
            });
        });
    }
    g.bench_function("pool_1p_no_metrics", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| timed(iters, || pool_call(&quiet)));
    });
    g.bench_function("tower_tps_budget", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let policy = tower_policy.clone();
            async move {
                let mut svc = Retry::new(policy, service_fn(|_: u32| upstream()));
                tower_loop(iters, &mut svc).await
            }
        });
    });
    g.bench_function("backon", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            timed(iters, move || async move {
                upstream.retry(backoff).await.expect("ok")
            })
        });
    });
    g.finish();
}

fn retry(c: &mut Criterion) {
    let rt = runtime();
    let one = pool(1, zero_delay_policy());
    let two = pool(2, zero_delay_policy());
    let quiet = pool_without_metrics(1, zero_delay_policy());
    let tower_policy = TowerPolicy::huge_budget();
    let backoff = ConstantBuilder::new()
        .with_delay(Duration::ZERO)
        .with_max_times(1);

    let mut g = c.benchmark_group("retry");
    g.bench_function("direct", |b| {
        // The least any retry layer can do: call, see the error, call again.
        b.to_async(&rt).iter_custom(|iters| {
            timed(iters, || async {
                match refused_once(0).await {
                    Ok(v) => v,
                    Err(e) => {
                        black_box(e);
                        refused_once(1).await.expect("ok")
                    }
                }
            })
        });
    });
    for (id, p) in [("pool_1p", &one), ("pool_2p_fallback", &two)] {
        g.bench_function(id, |b| {
            b.to_async(&rt).iter_custom(|iters| async move {
                let d = timed(iters, || pool_call_refused_once(p)).await;
                upkeep();
                d
            });
        });
    }
    g.bench_function("pool_1p_no_metrics", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| timed(iters, || pool_call_refused_once(&quiet)));
    });
    g.bench_function("pool_1p_info_log", |b| {
        // A gateway logs at INFO: the pool's "retrying" line is formatted
        // (into a sink) on every retry.
        b.to_async(&rt).iter_custom(|iters| {
            let one = &one;
            async move {
                let subscriber = tracing_subscriber::fmt()
                    .with_max_level(tracing::Level::INFO)
                    .with_writer(std::io::sink)
                    .finish();
                let _guard = tracing::subscriber::set_default(subscriber);
                let d = timed(iters, || pool_call_refused_once(one)).await;
                upkeep();
                d
            }
        });
    });
    g.bench_function("tower_tps_budget", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let policy = tower_policy.clone();
            async move {
                let mut svc = Retry::new(policy, service_fn(refused_once));
                tower_loop(iters, &mut svc).await
            }
        });
    });
    g.bench_function("backon_tokio_sleep", |b| {
        // backon's default sleeper calls tokio::time::sleep even for a zero
        // delay: a timer registration and a wait for the next timer tick.
        b.to_async(&rt).iter_custom(|iters| {
            timed(iters, move || async move {
                let mut attempt = 0;
                (|| {
                    let n = attempt;
                    attempt += 1;
                    refused_once(n)
                })
                .retry(backoff)
                .await
                .expect("ok")
            })
        });
    });
    g.bench_function("backon_no_sleep", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            timed(iters, move || async move {
                let mut attempt = 0;
                (|| {
                    let n = attempt;
                    attempt += 1;
                    refused_once(n)
                })
                .retry(backoff)
                .sleep(|_| std::future::ready(()))
                .await
                .expect("ok")
            })
        });
    });
    g.finish();
}

/// `iters` success-path calls on each of 2 threads against one shared pool.
fn pool_on_two_threads(pool: Arc<retryctl::Pool<()>>, iters: u64) -> Duration {
    common::on_two_threads(
        iters,
        Arc::new(move |rt: &Runtime, n| rt.block_on(timed(n, || pool_call(&pool)))),
    )
}

fn contended(c: &mut Criterion) {
    let one = Arc::new(pool(1, default_policy()));
    let quiet = Arc::new(pool_without_metrics(1, default_policy()));
    let tower_policy = TowerPolicy::default_budget();

    let mut g = c.benchmark_group("contended");
    g.bench_function("direct_2t", |b| {
        b.iter_custom(|iters| {
            common::on_two_threads(
                iters,
                Arc::new(|rt: &Runtime, n| {
                    rt.block_on(timed(n, || async { upstream().await.expect("ok") }))
                }),
            )
        });
    });
    g.bench_function("pool_1p_2t", |b| {
        b.iter_custom(|iters| {
            let d = pool_on_two_threads(one.clone(), iters);
            upkeep();
            d
        });
    });
    g.bench_function("pool_1p_no_metrics_2t", |b| {
        b.iter_custom(|iters| pool_on_two_threads(quiet.clone(), iters));
    });
    g.bench_function("tower_tps_budget_2t", |b| {
        b.iter_custom(|iters| {
            let policy = tower_policy.clone();
            common::on_two_threads(
                iters,
                Arc::new(move |rt: &Runtime, n| {
                    let mut svc = Retry::new(policy.clone(), service_fn(|_: u32| upstream()));
                    rt.block_on(tower_loop(n, &mut svc))
                }),
            )
        });
    });
    g.finish();
}

criterion_group!(benches, success, retry, contended);
criterion_main!(benches);
