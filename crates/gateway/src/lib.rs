//! A reference OpenAI-compatible reverse proxy built on the [`Pool`]:
//! `retryctl serve --config gateway.toml`.
//!
//! The pool decides *whether* to retry; a gateway decides *what a retry
//! may repeat*. This module is that second half, done the way the pool's
//! guarantees require:
//!
//! * **An attempt ends where the client's first byte begins.** A
//!   non-streaming attempt reads the whole upstream body; a streaming one
//!   reads up to the first SSE event and treats an error event there as
//!   an upstream failure. Everything before that point is retried under
//!   the policy; nothing after it ever is (modules `attempt`, `stream`).
//! * **The body is forwarded as the client sent it.** Only `model` and
//!   `stream` are read; a provider that names the model differently gets
//!   the same bytes with the `model` value spliced (module `request`).
//! * **Failures say whose fault they were.** An upstream 4xx passes
//!   through with its status and body; "all providers failed" is a 502,
//!   503 (budget, Retry-After) or 504 (deadline) with the reason, attempts
//!   and rounds (module `errors`).
//! * **Nothing internal leaks.** Every client-facing message and every log
//!   line the gateway writes is [redacted](Redactor): upstream URLs, IP
//!   addresses and API keys never leave it. Keys come from environment
//!   variables named in the configuration, never from the file.
//! * **Unknown models create no metric series**: the pool counts them in
//!   one unlabelled counter, whatever name a client sends.
//!
//! # Upstream client
//!
//! Not reqwest: reqwest wraps hyper-util's client, pool and connector in
//! layers the gateway does not need (its redirect layer re-parses each
//! request's URI into a `Url` even with redirects off, the response's
//! `Url` is parsed again, its retry layer clones each request, its
//! `Pending` future sits on top): 94,900 instructions per proxied request
//! against 64,600 without them (callgrind, `docs/benchmarks.md`). Every
//! provider connects through hyper-rustls's `HttpsConnector` over
//! hyper-util's `HttpConnector` (`client::connector`), and then:
//!
//! * **`http://` providers** send through a keep-alive pool of HTTP/1.1
//!   connections of their own (module `keepalive`, hyper's connection
//!   API): one host, one protocol, so a stack of idle connections does
//!   what hyper-util's multi-host pool did, for ~7,800 fewer instructions
//!   per request (54,300 -> 46,000);
//! * **`https://` providers** go through hyper-util's legacy client (TLS,
//!   HTTP/2 by ALPN, its pool).
//!
//! Each provider's endpoint URIs and request headers are built once, when
//! the gateway is. Kept as reqwest had it: `http://` and `https://` base
//! URLs (rustls with the platform's certificate verifier, HTTP/1.1 or
//! HTTP/2 by ALPN), the connect timeout (the TCP connect and the TLS
//! handshake), `TCP_NODELAY`, reqwest's TCP keep-alive and
//! `TCP_USER_TIMEOUT`, keep-alive pooling with the provider's
//! `idle_timeout`, no redirects, a `User-Agent` of `retryctl/<version>`,
//! and the `Host` header as the URI gives it. Failures classify as they
//! did: a refused connect, a connect timeout, a reset, a body cut short
//! each get the same cause ([`retryctl::Rules::hyper_client`], and
//! [`retryctl::Rules::hyper_connect`] and [`retryctl::Rules::hyper_send`]
//! for the pool's own errors).
//!
//! Given up: **no proxy from the environment.** reqwest sent requests
//! through `HTTP_PROXY`/`HTTPS_PROXY`/`ALL_PROXY` (minus `NO_PROXY`) when
//! they were set; the gateway now always connects to the provider's
//! address itself. A gateway calls internal model servers, which such a
//! proxy would normally be bypassed for (and a proxy variable set for
//! something else no longer reroutes them); providers reachable only
//! through a forward proxy are not supported (a reverse proxy in
//! `base_url` still is). Also gone with reqwest: HTTP/3, response
//! decompression and cookies, none of which the gateway enabled.
//!
//! ```no_run
//! use retryctl_gateway::{Gateway, GatewayConfig};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = GatewayConfig::load("config/gateway.toml".as_ref())?;
//! let listener = tokio::net::TcpListener::bind(config.listen).await?;
//! let gateway = Gateway::new(config)?; // reads the API keys from the environment
//! gateway.serve(listener, async { tokio::signal::ctrl_c().await.ok(); }).await?;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(missing_debug_implementations, unreachable_pub, rust_2018_idioms)]

mod attempt;
mod client;
mod config;
mod errors;
mod keepalive;
mod listener;
pub mod metrics_endpoint;
mod proxy;
mod redact;
mod request;
mod stream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use tokio::net::TcpListener;

pub use self::config::{
    ConfigError, DEFAULT_BODY_LIMIT, DEFAULT_IDLE_TIMEOUT, DEFAULT_LISTEN,
    DEFAULT_MAX_RESPONSE_BODY, DEFAULT_SHUTDOWN_TIMEOUT, GatewayConfig, MAX_HEADERS_LIMIT,
    ModelConfig, ProviderConfig, RouteConfig,
};
pub use self::redact::{Redactor, redact};

use self::attempt::{EndpointUrls, Provider, RequestHeaders, Transport};
use self::proxy::{ProviderHeaders, Shared};
use crate::listener::{Connections, serve_connections};
use crate::metrics_endpoint::MetricsError;
use retryctl::policy::LivePolicy;
use retryctl::reload::{PolicyWatcher, ReloadOptions, ReloadStatus, StartError};
use retryctl::stats::ProviderStats;
use retryctl::{BuildError, Pool};

/// Why the gateway cannot start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The configuration is invalid.
    #[error("{0}")]
    Config(Box<ConfigError>),
    /// The policy file is missing or invalid, or cannot be watched.
    #[error("policy file {0}")]
    Policy(Box<StartError>),
    /// A provider's `api_key_env` names a variable that is not set (or is
    /// empty, or not Unicode).
    #[error(
        "provider {provider:?}: environment variable {env} (api_key_env) is not set; \
         export the provider's API key in it, or remove api_key_env"
    )]
    MissingApiKey {
        /// The provider.
        provider: String,
        /// The variable.
        env: String,
    },
    /// A provider's key cannot be sent in a header (e.g. it has a newline).
    #[error("provider {provider:?}: the key in {env} (api_key_env) is not a valid header value")]
    InvalidApiKey {
        /// The provider.
        provider: String,
        /// The variable.
        env: String,
    },
    /// The providers' HTTP client cannot be built: the TLS settings (e.g.
    /// the system has no root certificates for an `https://` provider).
    #[error("provider {provider:?}: cannot build the HTTP client: {source}")]
    Client {
        /// The provider (the first `https://` one, when TLS is the cause).
        provider: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The pool refused the routes.
    #[error("cannot build the provider pool: {0}")]
    Pool(#[from] BuildError),
    /// The metrics endpoint cannot start.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The server failed while running.
    #[error("server error: {0}")]
    Serve(std::io::Error),
}

impl From<ConfigError> for GatewayError {
    fn from(e: ConfigError) -> Self {
        GatewayError::Config(Box::new(e))
    }
}

/// A gateway ready to serve: the pool built, the keys read, the policy in
/// force.
#[derive(Debug)]
pub struct Gateway {
    shared: Arc<Shared>,
    shutdown_timeout: Duration,
    /// Follows the policy file while the gateway lives.
    watcher: Option<PolicyWatcher>,
}

impl Gateway {
    /// Builds the gateway, reading API keys from the process environment.
    ///
    /// Install the metrics recorder first (as [`run`] does) if the pool's
    /// metrics should be recorded: the pool resolves its handles here.
    pub fn new(config: GatewayConfig) -> Result<Gateway, GatewayError> {
        Gateway::with_env(config, |name| std::env::var(name).ok())
    }

    /// Builds the gateway, reading API keys through `env` (a name to value
    /// lookup; [`Gateway::new`] passes the process environment).
    pub fn with_env(
        config: GatewayConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Gateway, GatewayError> {
        config.validate()?;
        // The watcher loads the file (a missing or bad one is an error
        // here) and then keeps `live` in step with it.
        let live = LivePolicy::default();
        let watcher = match &config.policy {
            Some(path) => Some(
                PolicyWatcher::start(path.clone(), live.clone(), ReloadOptions::default())
                    .map_err(|e| GatewayError::Policy(Box::new(e)))?,
            ),
            None => None,
        };
        let active = live.load();
        let policy = active.policy();
        // Keys first: the redactor must know every one of them before any
        // provider can fail.
        let mut keys = Vec::new();
        let mut auth = Vec::with_capacity(config.providers.len());
        for p in &config.providers {
            let header = match &p.api_key_env {
                None => None,
                Some(name) => {
                    let key = env(name).filter(|k| !k.trim().is_empty()).ok_or_else(|| {
                        GatewayError::MissingApiKey {
                            provider: p.name.clone(),
                            env: name.clone(),
                        }
                    })?;
                    let mut value = HeaderValue::from_str(&format!("Bearer {}", key.trim()))
                        .map_err(|_| GatewayError::InvalidApiKey {
                            provider: p.name.clone(),
                            env: name.clone(),
                        })?;
                    value.set_sensitive(true);
                    keys.push(key.trim().to_owned());
                    Some(value)
                }
            };
            auth.push(header);
        }
        let redactor = Arc::new(Redactor::new(keys));
        // One TLS configuration (one read of the root store) for all.
        let https = config
            .providers
            .iter()
            .find(|p| p.base_url.scheme() == "https");
        let tls = client::tls_config(https.is_some()).map_err(|source| GatewayError::Client {
            provider: https.map_or_else(String::new, |p| p.name.clone()),
            source,
        })?;
        let mut clients = Vec::with_capacity(config.providers.len());
        for (p, auth) in config.providers.iter().zip(auth) {
            let urls = EndpointUrls::new(&p.base_url).map_err(|e| {
                ConfigError::provider_field(
                    &p.name,
                    "base_url",
                    format!("cannot be followed by the endpoints' paths ({e})"),
                )
            })?;
            let headers = RequestHeaders::new(&urls, auth);
            // No redirect is followed (neither transport follows any): a
            // POST is never replayed to another location, a 3xx fails the
            // attempt and the next provider is tried. A model's routes to
            // one provider share its connections.
            let connector = client::connector(
                tls.clone(),
                &policy.timeouts,
                p.connect_timeout.unwrap_or(policy.timeouts.connect),
            );
            let transport = Transport::new(
                urls.get(attempt::Endpoint::ChatCompletions),
                connector,
                p.idle_timeout,
            );
            clients.push((transport, urls, headers));
        }
        let mut pool = Pool::builder().policy(live);
        for p in &config.providers {
            if let Some(t) = p.connect_timeout {
                // The gate's connect phase ends with the client's.
                pool = pool.connect_timeout(&p.name, t);
            }
        }
        for m in &config.models {
            for r in &m.routes {
                let Some(i) = config.providers.iter().position(|p| p.name == r.provider) else {
                    continue; // validate() refused unknown providers
                };
                let p = &config.providers[i];
                let provider = Provider {
                    transport: clients[i].0.clone(),
                    urls: clients[i].1.clone(),
                    headers: clients[i].2.clone(),
                    upstream_model: r.upstream_model.as_deref().map(Arc::from),
                    attempt_timeout: p.attempt_timeout,
                    redactor: redactor.clone(),
                };
                pool = pool.provider(&m.name, &p.name, provider);
            }
        }
        let shared = Shared {
            pool: pool.build()?,
            redactor,
            body_limit: config.body_limit,
            max_response_body: config.max_response_body,
            max_headers: config.max_headers,
            request_timeout: config.request_timeout,
            provider_headers: config
                .providers
                .iter()
                .filter_map(|p| Some((p.name.clone(), ProviderHeaders::new(&p.name)?)))
                .collect(),
        };
        Ok(Gateway {
            shared: Arc::new(shared),
            shutdown_timeout: config.shutdown_timeout,
            watcher,
        })
    }

    /// The policy in force (kept in step with the policy file, if one is
    /// configured); store a new one to change retries live.
    pub fn policy(&self) -> &LivePolicy {
        self.shared.pool.policy()
    }

    /// Health and recent statistics of every provider of every model.
    pub fn stats(&self) -> Vec<ProviderStats> {
        self.shared.pool.stats()
    }

    /// What the policy file watcher has done (reloads applied, unchanged,
    /// rejected; the last error), when a policy file is configured.
    pub fn reload_status(&self) -> Option<Arc<ReloadStatus>> {
        self.watcher.as_ref().map(PolicyWatcher::status)
    }

    /// The redactor built with the providers' keys.
    pub fn redactor(&self) -> &Redactor {
        &self.shared.redactor
    }

    /// The routes, for embedding in a larger `axum` application:
    /// `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
    /// and `GET /healthz`.
    pub fn router(&self) -> axum::Router {
        proxy::router(self.shared.clone())
    }

    /// Serves on `listener` until `shutdown` completes, then stops
    /// accepting and lets in-flight requests (streams included) finish for
    /// up to the configured `shutdown_timeout`; after that it returns and
    /// the remaining connections are dropped with the runtime.
    ///
    /// Clients are served HTTP/1.1 by hyper, each connection watched: one
    /// that does not send a complete request head within
    /// `request_timeout` (at most 30 s; 30 s when unset) is closed, and a
    /// keep-alive one idle for one to two of it, so a client that trickles
    /// its headers, or sends nothing, holds no socket for long.
    pub async fn serve<F>(self, listener: TcpListener, shutdown: F) -> Result<(), GatewayError>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let service = proxy::service(self.shared.clone());
        // The policy file is followed until the server stops.
        let _watcher = self.watcher;
        let connections = Connections {
            server: "gateway",
            header_read_timeout: header_read_timeout(self.shared.request_timeout),
            drain: self.shutdown_timeout,
        };
        let tasks = tokio::spawn(count_tasks(self.shared.pool.metrics_prefix().to_owned()));
        serve_connections(listener, service, connections, shutdown).await;
        tasks.abort();
        Ok(())
    }
}

/// Keeps `{prefix}runtime_alive_tasks` current while the gateway serves:
/// the tasks its runtime holds (a connection and its watchdog, a stream, a timer of the
/// policy watcher each), the number a leak grows. Read once a second, so a
/// scrape sees it at most a second old.
async fn count_tasks(prefix: String) {
    let name = format!("{prefix}runtime_alive_tasks");
    metrics::describe_gauge!(
        name.clone(),
        "Tasks alive in the gateway's tokio runtime (connections, streams, timers), read once a second."
    );
    let gauge = metrics::gauge!(name);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let alive = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        gauge.set(alive as f64);
    }
}

/// The longest a client may take to send a request head (hyper's
/// default): the request's time limit when it is shorter.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

fn header_read_timeout(request_timeout: Option<Duration>) -> Duration {
    request_timeout.map_or(HEADER_READ_TIMEOUT, |t| t.min(HEADER_READ_TIMEOUT))
}

/// Builds a [`Gateway`] from `config`, with API keys from the process
/// environment, and serves on `listener` until `shutdown` completes.
pub async fn serve<F>(
    config: GatewayConfig,
    listener: TcpListener,
    shutdown: F,
) -> Result<(), GatewayError>
where
    F: Future<Output = ()> + Send + 'static,
{
    Gateway::new(config)?.serve(listener, shutdown).await
}

/// What `retryctl serve` runs: the metrics endpoint (installed before the
/// pool is built, so its handles record), the gateway on
/// `config.listen`, and a graceful shutdown on SIGTERM or Ctrl-C.
pub async fn run(config: GatewayConfig) -> Result<(), GatewayError> {
    let metrics = match config.metrics_listen {
        Some(addr) => {
            let server = metrics_endpoint::serve(addr)?;
            tracing::info!(
                target: "retryctl::gateway",
                addr = %server.local_addr(),
                "metrics on /metrics"
            );
            Some(server)
        }
        None => None,
    };
    let listen = config.listen;
    let gateway = Gateway::new(config)?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| GatewayError::Bind {
            addr: listen,
            source,
        })?;
    // The gateway's own address, for the operator (not an upstream's).
    let bound = listener.local_addr().unwrap_or(listen);
    tracing::info!(target: "retryctl::gateway", addr = %bound, "gateway listening");
    let result = gateway.serve(listener, shutdown_signal()).await;
    drop(metrics);
    result
}

/// Completes on Ctrl-C or (on Unix) SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
