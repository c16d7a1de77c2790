//! What the reference gateway exposes, and to whom.
//!
//! * `secrets`: API keys, upstream addresses, credentials in URLs and the
//!   client's IP never appear in a client-facing answer, a metric or a log
//!   line, whichever way a request fails.
//! * `cardinality`: outside input (10,000 unknown model names) creates no
//!   metric series; every label value comes from the configuration.
//! * `exposure`: loopback by default; limits on bodies, headers and slow
//!   clients; HTTP/1.1 only (h2c refused).
//! * `metrics_endpoint`: the `/metrics` listener closes slow-loris, silent
//!   and idle keep-alive connections and keeps answering scrapes.
//!
//! Real sockets on loopback, real time, short durations. The client binds
//! `127.0.0.3` so its address differs from the gateway's and the
//! upstreams' (`127.0.0.1`): any `127.0.0.3` in the output is the client's
//! IP, any `127.0.0.1` an upstream's (or the gateway's own) address.

use retryctl_testkit as support;

mod cardinality;
mod exposure;
#[path = "../fixtures/mod.rs"]
mod fixtures;
mod metrics_endpoint;
mod secrets;
#[path = "../fixtures/test_gateway.rs"]
mod test_gateway;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Once;

use fixtures::POLICY;
use retryctl::policy::Policy;
use retryctl_testkit::LogBuffer;
pub use test_gateway::TestGateway;
use tracing_subscriber::layer::SubscriberExt;

/// The providers' API key, as the environment holds it.
pub const KEY: &str = "sk-test-SECRET123456";
/// The environment variable the configuration names for it.
pub const KEY_ENV: &str = "RETRYCTL_SECURITY_TEST_KEY";
/// A second provider's key, of no recognisable shape: only the
/// redactor's known-secret layer can catch it.
pub const PLAIN_KEY: &str = "k3y-0123456789-plain-ZZ";
/// The environment variable holding [`PLAIN_KEY`].
pub const PLAIN_KEY_ENV: &str = "RETRYCTL_SECURITY_TEST_PLAIN_KEY";
/// The address the test client connects from.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// The gateway tests' fast policy, without the admission gate: what leaks
/// is checked per failure as rounds report it; a refused upstream would
/// otherwise be waited for at its gate.
pub fn fast_policy() -> Policy {
    Policy::from_toml(&format!("{POLICY}\n[admission]\nenabled = false\n")).expect("valid policy")
}

/// Log lines written while it lives, on this thread (a current-thread
/// tokio test runs the gateway's tasks here too).
pub struct Logs {
    /// What the binary logs by default (`info`, every crate) plus
    /// everything retryctl itself logs, at every level.
    pub ours: LogBuffer,
    /// Everything, every crate, every level (third-party debug and trace
    /// included, and `log` records from reqwest).
    pub all: LogBuffer,
    _guard: tracing::subscriber::DefaultGuard,
}

/// Starts capturing log lines.
pub fn capture_logs() -> Logs {
    // `log` records (reqwest's) become tracing events, as they do in the
    // binary (`fmt().init()` installs the same bridge); they are then
    // dispatched to the thread's default subscriber below.
    static BRIDGE: Once = Once::new();
    BRIDGE.call_once(|| {
        // A bare registry: every level enabled, nothing formatted.
        use tracing_subscriber::util::SubscriberInitExt;
        let _ = tracing_subscriber::registry().try_init();
    });
    let ours = LogBuffer::default();
    let all = LogBuffer::default();
    let (to_ours, to_all) = (ours.clone(), all.clone());
    use tracing_subscriber::Layer;
    let subscriber = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .without_time()
                .with_writer(move || to_ours.clone())
                .with_filter(tracing_subscriber::EnvFilter::new("info,retryctl=trace")),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .without_time()
                .with_writer(move || to_all.clone())
                .with_filter(tracing_subscriber::filter::LevelFilter::TRACE),
        );
    Logs {
        ours,
        all,
        _guard: tracing::subscriber::set_default(subscriber),
    }
}

/// A client that connects from [`CLIENT_IP`].
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::V4(CLIENT_IP))
        .build()
        .expect("client")
}

/// Starts a gateway for `config` (TOML, without `metrics_listen` and
/// `policy`) under `policy`, with the providers' keys set.
pub async fn start(config: &str, policy: Policy) -> TestGateway {
    let env = |name: &str| match name {
        KEY_ENV => Some(KEY.to_owned()),
        PLAIN_KEY_ENV => Some(PLAIN_KEY.to_owned()),
        _ => None,
    };
    TestGateway::start(config, &policy.to_toml(), env, client())
        .await
        .expect("gateway")
}

/// One answer as the client received it: status, every header, the body.
pub struct Answer {
    pub status: u16,
    pub text: String,
    pub body: String,
}

impl TestGateway {
    /// POSTs `body` to `path` and reads the whole answer.
    pub async fn answer_to(&self, path: &str, body: impl Into<reqwest::Body>) -> Answer {
        answer(self.post(path, body).await).await
    }
}

/// Renders a response as the client saw it.
pub async fn answer(response: reqwest::Response) -> Answer {
    let status = response.status().as_u16();
    let mut text = format!("HTTP {status}\n");
    for (name, value) in response.headers() {
        text.push_str(&format!(
            "{name}: {}\n",
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    let body = response.text().await.expect("a body");
    text.push('\n');
    text.push_str(&body);
    Answer { status, text, body }
}
