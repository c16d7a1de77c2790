//! Requests per second over loopback HTTP: plain `reqwest`, the same client
//! through `Pool::call` (statistics and Prometheus metrics on), and
//! `reqwest-middleware` + `reqwest-retry` as the peer.
//!
//! The server is a minimal axum app on 127.0.0.1:0 in its own thread and
//! runtime; each request posts a small chat-completion body and reads the
//! whole response. Every variant uses one client built with
//! `retryctl::upstream::client_builder` (keep-alive, no Nagle), so they
//! differ only in the layer around `send()`.
//!
//! `cargo bench -p retryctl-bench --bench http`

mod common;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use reqwest_middleware::ClientWithMiddleware;
use reqwest_retry::{RetryTransientMiddleware, policies::ExponentialBackoff};
use retryctl::policy::Policy;
use retryctl::upstream;

use common::{
    REQUEST, RESPONSE, http_plain as plain, http_pool as through_pool, runtime, start_server,
    timed, upkeep,
};

async fn through_middleware(client: &ClientWithMiddleware, url: &str) -> usize {
    let response = client.post(url).body(REQUEST).send().await.expect("sent");
    let response = upstream::check(response).await.expect("2xx");
    response.bytes().await.expect("body").len()
}

fn http(c: &mut Criterion) {
    let rt = runtime();
    let addr = start_server();
    let url = format!("http://{addr}/v1/chat/completions");
    let policy = Policy::default();
    // Built inside the runtime: the client's connection pool uses its timer.
    let client = {
        let _enter = rt.enter();
        upstream::client_builder(&policy.timeouts)
            .build()
            .expect("client")
    };
    common::prometheus();
    let pool = common::loopback_pool(&client, &url);
    let retry = ExponentialBackoff::builder().build_with_max_retries(1);
    let middleware = reqwest_middleware::ClientBuilder::new(client.clone())
        .with(RetryTransientMiddleware::new_with_policy(retry))
        .build();
    // Warm the keep-alive connection and check every path works.
    rt.block_on(async {
        assert_eq!(plain(&client, &url).await, RESPONSE.len());
        assert_eq!(through_pool(&pool).await, RESPONSE.len());
        assert_eq!(through_middleware(&middleware, &url).await, RESPONSE.len());
    });

    let mut g = c.benchmark_group("http");
    g.throughput(Throughput::Elements(1));
    g.bench_function("plain_reqwest", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| timed(iters, || plain(&client, &url)));
    });
    g.bench_function("pool_1p", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let pool = &pool;
            async move {
                let d = timed(iters, || through_pool(pool)).await;
                upkeep();
                d
            }
        });
    });
    g.bench_function("reqwest_middleware_retry", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| timed(iters, || through_middleware(&middleware, &url)));
    });
    g.finish();
}

criterion_group!(benches, http);
criterion_main!(benches);
