//! The upstream connector, and the client of `https://` providers:
//! hyper-util's legacy client, directly (`http://` providers use
//! [`KeepAlive`](crate::keepalive::KeepAlive) over the same connector).
//!
//! reqwest wraps this same client (its pool, its `HttpConnector`, its
//! hyper-rustls connector) in layers the gateway does not use: a redirect
//! layer that re-parses every request's URI into a `Url` (even with
//! redirects off), a retry layer that clones every request, a response
//! `Url` parsed from the URI again, and its own `Pending` future. Without
//! them a proxied request costs a third fewer instructions.
//! Here an attempt hands the client an `http::Request` whose `Uri` was
//! built when the gateway was, and gets back `http::Response<Incoming>`.
//!
//! What reqwest did and this client still does: `https://` base URLs
//! (rustls with the platform's verifier, ALPN `h2` and `http/1.1`), the
//! connect timeout (covering the TLS handshake too), `TCP_NODELAY`,
//! reqwest's TCP keep-alive and `TCP_USER_TIMEOUT`, keep-alive pooling
//! with the provider's `idle_timeout`, no redirects followed (the legacy
//! client follows none), the `Host` header (set from the URI for HTTP/1.1,
//! `:authority` for HTTP/2). What it does not: the system proxy from
//! `HTTP_PROXY`/`HTTPS_PROXY`/`NO_PROXY` (see the crate docs).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use http::Uri;
use http_body_util::Full;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::{ConfigBuilderExt, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use retryctl::policy::Timeouts;
use retryctl::upstream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How the client connects: TCP, then TLS for `https://`, under one
/// timer.
pub(crate) type Connector = ConnectTimeout<HttpsConnector<HttpConnector>>;

/// One provider's client (cloning it shares its pool).
pub(crate) type UpstreamClient = Client<Connector, Full<Bytes>>;

/// The TLS settings every provider's client starts from: rustls with the
/// process's default crypto provider (aws-lc-rs unless the application
/// installed another), the platform's certificate verifier, as reqwest
/// 0.13's default TLS does. The verifier reads the system's root store
/// once here; a gateway whose providers are all `http://` does not read it
/// (no TLS is ever negotiated), so it starts where no CA store exists.
pub(crate) fn tls_config(any_https: bool) -> io::Result<rustls::ClientConfig> {
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?;
    Ok(if any_https {
        builder
            .try_with_platform_verifier()
            .map_err(io::Error::other)?
            .with_no_client_auth()
    } else {
        builder
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth()
    })
}

/// A provider's connector: TCP (`connect_timeout` per address,
/// hyper-util's timer, `TCP_NODELAY`, the policy's keep-alive settings),
/// then TLS for `https://`, the whole connect under `connect_timeout`.
pub(crate) fn connector(
    tls: rustls::ClientConfig,
    timeouts: &Timeouts,
    connect_timeout: Duration,
) -> Connector {
    let mut http = upstream::http_connector(timeouts);
    http.set_connect_timeout(Some(connect_timeout));
    // The TLS connector in front handles `https://`.
    http.enforce_http(false);
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    ConnectTimeout {
        inner: https,
        limit: connect_timeout,
    }
}

/// An `https://` provider's client over `connector`: pooled connections
/// dropped after `idle_timeout` idle, or never pooled when it is zero.
/// (`http://` providers use [`KeepAlive`](crate::keepalive::KeepAlive).)
pub(crate) fn build(connector: Connector, idle_timeout: Duration) -> UpstreamClient {
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        // Requests are written from one buffer, as the listener writes
        // responses (see there): ~500 instructions per request; a large
        // prompt costs one more copy, small next to its upstream time.
        .http1_writev(false);
    if idle_timeout.is_zero() {
        builder.pool_max_idle_per_host(0);
    } else {
        builder.pool_idle_timeout(idle_timeout);
    }
    builder.build(connector)
}

/// A connector whose whole connect (TCP and, for `https://`, the TLS
/// handshake) must finish within `limit`, as reqwest's connect timeout
/// did. A handshake that stalls fails like a stalled TCP connect: with an
/// `io::Error` of kind `TimedOut` below the client's connect error, which
/// classifies as `connect_timeout` (the upstream never saw the request).
/// hyper-util's own timer covers the TCP part alone.
#[derive(Clone, Debug)]
pub(crate) struct ConnectTimeout<C> {
    inner: C,
    limit: Duration,
}

impl<C> tower_service::Service<Uri> for ConnectTimeout<C>
where
    C: tower_service::Service<Uri>,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
    C::Response: Send + 'static,
{
    type Response = Unlabelled<C::Response>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let limit = self.limit;
        Box::pin(async move {
            match tokio::time::timeout(limit, connecting).await {
                Ok(connected) => connected.map(Unlabelled).map_err(Into::into),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connect (TCP and TLS) timed out",
                )
                .into()),
            }
        })
    }
}

/// A connection whose responses are not labelled with its addresses.
///
/// `HttpConnector` describes every TCP connection with its local and
/// remote address (`HttpInfo`), and the client copies that description
/// into the extensions of every response on the connection: an extensions
/// map allocated and a type-keyed insert per request (~500 instructions),
/// for addresses the gateway never reads (and must not show a client).
/// This wrapper reports the connection without them; what the client's
/// pool does act on is kept (HTTP/2 negotiated by ALPN, a proxied
/// connection).
#[derive(Debug)]
pub(crate) struct Unlabelled<T>(T);

impl<T: Connection> Connection for Unlabelled<T> {
    fn connected(&self) -> Connected {
        let inner = self.0.connected();
        let connected = Connected::new().proxy(inner.is_proxied());
        if inner.is_negotiated_h2() {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

impl<T: Read + Unpin> Read for Unlabelled<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for Unlabelled<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}
