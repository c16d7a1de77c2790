//! Heap allocations per call, counted by a global allocator, after warm-up.
//!
//! The target for the pool's success path is zero. Only allocations made
//! on the calling thread are counted (the loopback server's thread is
//! not), which covers everything a current-thread runtime runs for the
//! call, the HTTP connection task included.
//!
//! `cargo bench -p retryctl-bench --bench alloc` prints one line per case.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::future::Future;
use std::hint::black_box;
use std::time::Duration;

use backon::{ConstantBuilder, Retryable};
use retryctl::policy::Policy;
use tower::retry::Retry;
use tower::{ServiceExt, service_fn};

use common::{
    TowerPolicy, default_policy, http_plain, http_pool, pool, pool_call, pool_call_refused_once,
    pool_without_metrics, refused_once, runtime, start_server, upkeep, upstream, zero_delay_policy,
};

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
    static BYTES: Cell<u64> = const { Cell::new(0) };
}

/// Counts allocations (and reallocations) made on threads that opted in.
struct Counting;

fn count(size: usize) {
    // `try_with`: the allocator runs during thread teardown too.
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            let _ = ALLOCS.try_with(|n| n.set(n.get() + 1));
            let _ = BYTES.try_with(|n| n.set(n.get() + size as u64));
        }
    });
}

// SAFETY: every method forwards to `System` with the caller's arguments;
// the counting touches only `const`-initialised thread-locals, which never
// allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const WARM_UP: u64 = 20_000;
const CALLS: u64 = 200_000;
const HTTP_WARM_UP: u64 = 500;
const HTTP_CALLS: u64 = 5_000;

/// Runs `call` `warm_up` times, folds metric samples (as the exporter's
/// upkeep would), then counts allocations over `calls` calls.
fn measure<F, Fut>(name: &str, warm_up: u64, calls: u64, mut call: F)
where
    F: FnMut() -> Fut,
    Fut: Future,
{
    let rt = runtime();
    rt.block_on(async {
        for _ in 0..warm_up {
            black_box(call().await);
        }
        upkeep();
        ALLOCS.with(|n| n.set(0));
        BYTES.with(|n| n.set(0));
        COUNTING.with(|on| on.set(true));
        for _ in 0..calls {
            black_box(call().await);
        }
        COUNTING.with(|on| on.set(false));
    });
    let allocs = ALLOCS.with(Cell::get);
    let bytes = BYTES.with(Cell::get);
    println!(
        "{name:<34} {:>10.4} {:>12.1} {:>10}",
        allocs as f64 / calls as f64,
        bytes as f64 / calls as f64,
        calls
    );
}

fn main() {
    common::prometheus();
    println!(
        "{:<34} {:>10} {:>12} {:>10}",
        "case", "allocs/call", "bytes/call", "calls"
    );
    let one = pool(1, default_policy());
    let three = pool(3, default_policy());
    let quiet = pool_without_metrics(1, default_policy());
    let retry_one = pool(1, zero_delay_policy());
    let retry_quiet = pool_without_metrics(1, zero_delay_policy());

    measure("success/direct", WARM_UP, CALLS, || async {
        upstream().await.expect("ok")
    });
    measure("success/pool_1p", WARM_UP, CALLS, || pool_call(&one));
    measure("success/pool_3p", WARM_UP, CALLS, || pool_call(&three));
    measure("success/pool_1p_no_metrics", WARM_UP, CALLS, || {
        pool_call(&quiet)
    });
    let svc = Retry::new(
        TowerPolicy::default_budget(),
        service_fn(|_: u32| upstream()),
    );
    measure("success/tower_tps_budget", WARM_UP, CALLS, || {
        svc.clone().oneshot(0)
    });
    let backoff = ConstantBuilder::new()
        .with_delay(Duration::ZERO)
        .with_max_times(1);
    measure("success/backon", WARM_UP, CALLS, || async move {
        upstream.retry(backoff).await.expect("ok")
    });
    measure("retry/direct", WARM_UP, CALLS, || async {
        match refused_once(0).await {
            Ok(v) => v,
            Err(_) => refused_once(1).await.expect("ok"),
        }
    });
    measure("retry/pool_1p", WARM_UP, CALLS, || {
        pool_call_refused_once(&retry_one)
    });
    measure("retry/pool_1p_no_metrics", WARM_UP, CALLS, || {
        pool_call_refused_once(&retry_quiet)
    });

    let addr = start_server();
    let url = format!("http://{addr}/v1/chat/completions");
    let rt = runtime();
    let client = {
        let _enter = rt.enter();
        retryctl::upstream::client_builder(&Policy::default().timeouts)
            .build()
            .expect("client")
    };
    drop(rt);
    let http = common::loopback_pool(&client, &url);
    measure("http/plain_reqwest", HTTP_WARM_UP, HTTP_CALLS, || {
        http_plain(&client, &url)
    });
    measure("http/pool_1p", HTTP_WARM_UP, HTTP_CALLS, || {
        http_pool(&http)
    });
}
