//! Loopback HTTP, A/B interleaved: plain `reqwest` (without and with a
//! per-request timeout), the pool, and `reqwest-middleware` +
//! `reqwest-retry`, in short alternating blocks.
//!
//! On a shared 2-core machine a neighbour's build moves a 45 us loopback
//! request by tens of percent within seconds, and criterion measures one
//! variant after the other, so its ratio between variants drifts with the
//! neighbours. Here every round runs a block of each variant (in rotating
//! order) back to back, and the ratio is taken per round: drift hits both
//! sides of a ratio alike. The median over the rounds is the answer.
//!
//! `cargo bench -p retryctl-bench --bench http_ab` prints the table.

mod common;

use std::time::Instant;

use reqwest_middleware::ClientWithMiddleware;
use reqwest_retry::{RetryTransientMiddleware, policies::ExponentialBackoff};
use retryctl::policy::Policy;
use retryctl::upstream;

use common::{REQUEST, http_plain, http_plain_timeout, http_pool, runtime, start_server, upkeep};

const ROUNDS: usize = 200;
const BLOCK: u32 = 200;
const WARM_UP: u32 = 2_000;

async fn middleware(client: &ClientWithMiddleware, url: &str) -> usize {
    let response = client.post(url).body(REQUEST).send().await.expect("sent");
    let response = upstream::check(response).await.expect("2xx");
    response.bytes().await.expect("body").len()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let rt = runtime();
    let addr = start_server();
    let url = format!("http://{addr}/v1/chat/completions");
    let policy = Policy::default();
    let client = upstream::client_builder(&policy.timeouts)
        .build()
        .expect("client");
    common::prometheus();
    let pool = common::loopback_pool(&client, &url);
    let retry = ExponentialBackoff::builder().build_with_max_retries(1);
    let with_retry = reqwest_middleware::ClientBuilder::new(client.clone())
        .with(RetryTransientMiddleware::new_with_policy(retry))
        .build();

    const NAMES: [&str; 4] = [
        "plain_reqwest",
        "plain_reqwest_timeout",
        "pool_1p",
        "reqwest_middleware_retry",
    ];
    // per_request[variant][round], in microseconds
    let mut per_request: [Vec<f64>; 4] = Default::default();
    rt.block_on(async {
        for _ in 0..WARM_UP {
            http_plain(&client, &url).await;
            http_plain_timeout(&client, &url).await;
            http_pool(&pool).await;
            middleware(&with_retry, &url).await;
        }
        for round in 0..ROUNDS {
            for k in 0..NAMES.len() {
                let variant = (round + k) % NAMES.len();
                let start = Instant::now();
                for _ in 0..BLOCK {
                    match variant {
                        0 => http_plain(&client, &url).await,
                        1 => http_plain_timeout(&client, &url).await,
                        2 => http_pool(&pool).await,
                        _ => middleware(&with_retry, &url).await,
                    };
                }
                let us = start.elapsed().as_secs_f64() * 1e6 / f64::from(BLOCK);
                per_request[variant].push(us);
            }
            upkeep();
        }
    });
    println!("loopback HTTP, {ROUNDS} rounds x {BLOCK} requests per variant, interleaved");
    println!(
        "{:<28}{:>14}{:>16}{:>12}{:>12}",
        "variant", "median us/req", "ratio to plain", "ratio p25", "ratio p75"
    );
    for (v, name) in NAMES.iter().enumerate() {
        let ratios: Vec<f64> = (0..ROUNDS)
            .map(|r| per_request[v][r] / per_request[0][r])
            .collect();
        let mut sorted = ratios.clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "{name:<28}{:>14.2}{:>16.4}{:>12.4}{:>12.4}",
            median(per_request[v].clone()),
            median(ratios),
            sorted[ROUNDS / 4],
            sorted[ROUNDS * 3 / 4],
        );
    }
}
