//! The `/metrics` endpoint: Prometheus text from a [`MetricsHandle`] over
//! the gateway's hardened listener.
//!
//! The core crate records and renders metrics; serving them is an
//! application's job (an embedder mounts
//! [`MetricsHandle::render`] on a route of its own server). This is the
//! reference gateway's and the demo's server.

use std::net::SocketAddr;
use std::time::Duration;

use retryctl::telemetry::{MetricsHandle, Recorder};

use crate::listener::{Connections, serve_connections};

/// The default `/metrics` address: loopback only.
pub const DEFAULT_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9464);

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// Another global metrics recorder is already installed.
    #[error("cannot install the metrics recorder: another one is installed")]
    RecorderInstalled,
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// A running `/metrics` endpoint. Dropping it stops the server (the
/// recorder stays installed).
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    handle: MetricsHandle,
    server: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The current metrics in Prometheus text format.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// The recorder's handle.
    pub fn handle(&self) -> &MetricsHandle {
        &self.handle
    }
}

/// Stops accepting; open connections close gracefully (idle ones at once,
/// a scrape in flight when it is answered).
impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// How the `/metrics` listener treats its connections (see
/// [`serve_handle`]). A scrape sends a request head of a few hundred bytes
/// at once, so the limits are far tighter than the gateway's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListenerOptions {
    /// The longest a client may take to send a request head, and the
    /// longest a keep-alive connection may stay idle between scrapes (one
    /// watchdog per connection checks both, once per timeout: a silent
    /// or trickling new connection closes after one, an idle keep-alive
    /// one after one to two). [`METRICS_HEADER_READ_TIMEOUT`] by default.
    pub header_read_timeout: Duration,
}

/// The `/metrics` listener's default header-read and idle keep-alive
/// timeout: a third of the gateway's longest, and below a 15 s scrape
/// interval (a scraper then connects once per scrape).
pub const METRICS_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for ListenerOptions {
    fn default() -> Self {
        ListenerOptions {
            header_read_timeout: METRICS_HEADER_READ_TIMEOUT,
        }
    }
}

impl ListenerOptions {
    /// Sets [`ListenerOptions::header_read_timeout`].
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
        self
    }
}

/// Installs a [`Recorder`] as the global recorder and serves `GET /metrics` on
/// `addr` (port 0 picks a free port), with the default [`ListenerOptions`].
/// Must run inside a tokio runtime. Bind loopback ([`DEFAULT_ADDR`]) unless
/// the network is trusted.
pub fn serve(addr: SocketAddr) -> Result<MetricsServer, MetricsError> {
    let listener = bind(addr)?;
    let handle = Recorder::new()
        .install()
        .map_err(|_| MetricsError::RecorderInstalled)?;
    Ok(serve_on(listener, handle, ListenerOptions::default()))
}

/// Serves `GET /metrics` from `handle` (e.g. a [`Recorder`] that is not the
/// global one) on `addr`, with `options`. Installs nothing. Must run inside
/// a tokio runtime.
///
/// The listener is the gateway's: HTTP/1.1 by hyper, each connection
/// watched, so a client that trickles its request head, or holds a
/// keep-alive connection idle, is closed after
/// `options.header_read_timeout` (one to two of it when idle).
/// Connections are not counted or capped: a cap would let whoever holds
/// that many connections shut the scraper out, while the timeout bounds
/// what each one costs.
pub fn serve_handle(
    addr: SocketAddr,
    handle: MetricsHandle,
    options: ListenerOptions,
) -> Result<MetricsServer, MetricsError> {
    Ok(serve_on(bind(addr)?, handle, options))
}

fn bind(addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), MetricsError> {
    let bind_err = |source| MetricsError::Bind { addr, source };
    let std_listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
    std_listener.set_nonblocking(true).map_err(bind_err)?;
    let local = std_listener.local_addr().map_err(bind_err)?;
    let listener = tokio::net::TcpListener::from_std(std_listener).map_err(bind_err)?;
    Ok((listener, local))
}

fn serve_on(
    (listener, local): (tokio::net::TcpListener, SocketAddr),
    handle: MetricsHandle,
    options: ListenerOptions,
) -> MetricsServer {
    let render = handle.clone();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    render.render(),
                )
            }
        }),
    );
    let connections = Connections {
        server: "metrics",
        header_read_timeout: options.header_read_timeout,
        // Never used: the server stops when its task is aborted.
        drain: Duration::ZERO,
    };
    let server = tokio::spawn(serve_connections(
        listener,
        hyper_util::service::TowerToHyperService::new(app),
        connections,
        std::future::pending(),
    ));
    MetricsServer {
        addr: local,
        handle,
        server,
    }
}
