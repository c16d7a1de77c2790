//! A small driver for profilers: runs one pool path in a loop, nothing else.
//!
//! ```sh
//! cargo bench -p retryctl-bench --no-run --bench profile          # prints the binary's path
//! valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*measured_calls*' \
//!     target/release/deps/profile-HASH success 20000
//! callgrind_annotate --inclusive=yes callgrind.out.PID | head -60
//! ```
//!
//! Cases: `success` (1 provider, statistics and Prometheus on),
//! `success_no_admission` (the same without the admission gate),
//! `success_no_metrics`, `retry` (refused once, zero delay), `tower` (tower's
//! `Retry` with `TpsBudget`, success), `direct`, and loopback HTTP through
//! reqwest, `http_plain`, `http_plain_timeout` (plain reqwest with the
//! per-request timeout the pool applies to an attempt), `http_pool` and
//! `http_pool_block` (its operation an async block around the send and
//! the check instead of `upstream::checked`), each
//! run in a task of its own, as a server runs a connection's requests (only
//! the calling thread's instructions are collected: the server's thread is
//! not in the region). Instructions per call are the difference between two
//! runs (e.g. 20,000 and 40,000 calls) / 20,000: repeatable, unlike times on
//! a shared machine. The allocator is mimalloc, as `retryctl serve` runs
//! with: under glibc's, an HTTP case's count moved by a few hundred with
//! the state of the heap (its consolidation of freed blocks), which any
//! change elsewhere in the binary could shift (+330 instructions for the
//! pool's request, +0.5% on its ratio to plain reqwest, from adding an
//! unused function).
//! Run under `cargo bench` it does a `success` run of 100,000 calls.
//!
//! `profile ab A B [ROUNDS] [CALLS]` times two cases in alternating
//! batches and prints the median difference per call with its quartiles
//! (e.g. `ab success_no_admission success`: what the open admission gate
//! costs).

mod common;

/// Allocation costs the same whatever the binary's layout (see above).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::hint::black_box;
use std::time::Instant;

use tower::retry::Retry;
use tower::{Service, ServiceExt, service_fn};

use common::{
    HttpProvider, TowerPolicy, default_policy, http_plain, http_plain_timeout, http_pool,
    http_pool_block, pool, pool_call, pool_call_refused_once, pool_without_metrics, runtime,
    start_server, upkeep, upstream, zero_delay_policy,
};

/// The pools of every case, built and warmed up outside the profiled region.
struct Pools {
    one: retryctl::Pool<()>,
    /// `one` without the admission gate: what the open gate costs.
    ungated: retryctl::Pool<()>,
    quiet: retryctl::Pool<()>,
    retry: retryctl::Pool<()>,
    http: retryctl::Pool<HttpProvider>,
    client: reqwest::Client,
    url: String,
}

/// Built once per process and never dropped: the HTTP cases run in a
/// task of their own, which borrows them for `'static`.
fn setup(rt: &tokio::runtime::Runtime) -> &'static Pools {
    let url = format!("http://{}/v1/chat/completions", start_server());
    let client = retryctl::upstream::client_builder(&default_policy().timeouts)
        .build()
        .expect("client");
    // The recorder first, as in production: a pool built before it
    // resolves its metric handles to nothing.
    common::prometheus();
    let http = common::loopback_pool(&client, &url);
    let pools = Pools {
        one: pool(1, default_policy()),
        ungated: pool(1, {
            let mut p = default_policy();
            p.admission.enabled = false;
            p
        }),
        quiet: pool_without_metrics(1, default_policy()),
        retry: pool(1, zero_delay_policy()),
        http,
        client,
        url,
    };
    rt.block_on(async {
        // First-touch costs and lazy initialisation, outside the profile.
        for _ in 0..1000 {
            black_box(pool_call(&pools.one).await);
            black_box(pool_call(&pools.quiet).await);
            black_box(pool_call_refused_once(&pools.retry).await);
            black_box(http_plain(&pools.client, &pools.url).await);
            black_box(http_plain_timeout(&pools.client, &pools.url).await);
            black_box(http_pool(&pools.http).await);
        }
    });
    upkeep();
    Box::leak(Box::new(pools))
}

/// The profiled region: `calls` calls of `case`, awaited in a loop.
#[inline(never)]
fn measured_calls(
    rt: &tokio::runtime::Runtime,
    pools: &'static Pools,
    case: &str,
    calls: u64,
) -> std::time::Duration {
    rt.block_on(async {
        let start = Instant::now();
        match case {
            "success" => {
                for _ in 0..calls {
                    black_box(pool_call(&pools.one).await);
                }
            }
            "success_no_admission" => {
                for _ in 0..calls {
                    black_box(pool_call(&pools.ungated).await);
                }
            }
            "success_no_metrics" => {
                for _ in 0..calls {
                    black_box(pool_call(&pools.quiet).await);
                }
            }
            "retry" => {
                for _ in 0..calls {
                    black_box(pool_call_refused_once(&pools.retry).await);
                }
            }
            "tower" => {
                let mut svc = Retry::new(
                    TowerPolicy::default_budget(),
                    service_fn(|_: u32| upstream()),
                );
                for _ in 0..calls {
                    let ready = svc.ready().await.expect("ready");
                    black_box(ready.call(0).await.expect("served"));
                }
            }
            "http_plain" | "http_plain_timeout" | "http_pool" | "http_pool_block" => {
                in_task(http_calls(pools, case.to_owned(), calls)).await;
            }
            "direct" => {
                for _ in 0..calls {
                    black_box(upstream().await.expect("ok"));
                }
            }
            other => panic!("unknown case {other:?}"),
        }
        start.elapsed()
    })
}

/// Runs `work` in a task of its own and waits for it: a request's task,
/// as a server runs each connection's requests, whose waker is the
/// task's own (the one an attempt's timer keeps between a task's
/// attempts), not `block_on`'s.
async fn in_task(work: impl std::future::Future<Output = ()> + Send + 'static) {
    tokio::spawn(work).await.expect("the measured task");
}

/// The HTTP cases' loop. Not a closure of [`measured_calls`]: callgrind's
/// `--toggle-collect` turns collection off again in a function whose name
/// matches, and the task's future would be one.
async fn http_calls(pools: &'static Pools, case: String, calls: u64) {
    for _ in 0..calls {
        let bytes = match case.as_str() {
            "http_plain" => http_plain(&pools.client, &pools.url).await,
            "http_plain_timeout" => http_plain_timeout(&pools.client, &pools.url).await,
            "http_pool_block" => http_pool_block(&pools.http).await,
            _ => http_pool(&pools.http).await,
        };
        black_box(bytes);
    }
}

/// `ab A B [ROUNDS] [CALLS]`: cases `A` and `B` in alternating batches
/// of `CALLS` calls (order swapped every round), so a shared machine's
/// drift touches both alike; prints each case's median ns/call and the
/// per-round difference B - A with its quartiles.
fn ab(rt: &tokio::runtime::Runtime, pools: &'static Pools, args: &[String]) {
    let a = args.get(1).map_or("success_no_admission", String::as_str);
    let b = args.get(2).map_or("success", String::as_str);
    let rounds: usize = args.get(3).and_then(|n| n.parse().ok()).unwrap_or(41);
    let calls: u64 = args.get(4).and_then(|n| n.parse().ok()).unwrap_or(20_000);
    let per_call =
        |case: &str| measured_calls(rt, pools, case, calls).as_nanos() as f64 / calls as f64;
    let (mut xs, mut ys, mut diffs) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (x, y) = if round % 2 == 0 {
            let x = per_call(a);
            (x, per_call(b))
        } else {
            let y = per_call(b);
            (per_call(a), y)
        };
        xs.push(x);
        ys.push(y);
        diffs.push(y - x);
    }
    let q = |v: &mut Vec<f64>, at: f64| {
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * at).round() as usize]
    };
    println!(
        "{a}: {:.1} ns/call, {b}: {:.1} ns/call (medians of {rounds} rounds of {calls} calls)",
        q(&mut xs, 0.5),
        q(&mut ys, 0.5)
    );
    println!(
        "{b} - {a}: median {:.1} ns/call, p25 {:.1}, p75 {:.1}",
        q(&mut diffs, 0.5),
        q(&mut diffs, 0.25),
        q(&mut diffs, 0.75)
    );
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let case = args.first().map_or("success", String::as_str);
    if case == "ab" {
        let rt = runtime();
        let pools = setup(&rt);
        ab(&rt, pools, &args);
        return;
    }
    let calls = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(100_000);
    let rt = runtime();
    let pools = setup(&rt);
    let elapsed = measured_calls(&rt, pools, case, calls);
    println!(
        "{case}: {calls} calls, {:.1} ns/call",
        elapsed.as_nanos() as f64 / calls as f64
    );
}
