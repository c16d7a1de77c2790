//! The gateway's configuration file: where to listen, which models exist
//! and which providers serve them.
//!
//! The retry *policy* lives in its own file (`policy = "policy.toml"`), so
//! it can be reloaded while the gateway runs; this file describes the
//! topology, which only changes with a restart.
//!
//! Providers are declared once (`[providers.NAME]`) and referenced by
//! models (`providers = ["a", "b"]`, in failover order): most gateways
//! send every model through the same one or two internal proxies, and one
//! declaration means one HTTP client and one place for its key.
//!
//! API keys never appear in the file: a provider names the environment
//! variable that holds its key (`api_key_env`); the gateway reads it at
//! startup and refuses to start when it is missing. Writing `api_key`
//! is an error that says so.
//!
//! Like the policy, an invalid file is refused with the line, column and
//! dotted path of the offending field, and what would have been accepted.
//! See `config/gateway.toml` for a documented example of every field.

use retryctl::toml_error::{Seg, display_path, line_col, locate, path_at};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Visitor};

/// The default client-facing address: loopback only.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8080);
/// The default largest request body accepted (4 MiB).
pub const DEFAULT_BODY_LIMIT: usize = 4 << 20;
/// The default largest non-streaming upstream response read (64 MiB).
pub const DEFAULT_MAX_RESPONSE_BODY: usize = 64 << 20;
/// The default and largest `max_headers` (hyper's own limit is 100).
pub const MAX_HEADERS_LIMIT: usize = 100;
/// The default time a draining gateway waits for in-flight requests.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// The default idle time after which a pooled upstream connection is
/// dropped: below uvicorn's 5 s keep-alive (vLLM, SGLang), so the client
/// never reuses a connection the server is closing at the same moment.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// The whole gateway configuration, validated.
///
/// Read it with [`GatewayConfig::load`] (a file; a relative `policy` path
/// is resolved against the file's directory) or [`GatewayConfig::from_toml`].
/// A value built in code is checked by [`GatewayConfig::validate`] when the
/// gateway is built.
#[derive(Clone, Debug, PartialEq)]
pub struct GatewayConfig {
    /// Where clients connect (default `127.0.0.1:8080`).
    pub listen: SocketAddr,
    /// Where `GET /metrics` is served (default `127.0.0.1:9464`); `None`
    /// (`metrics_listen = "off"`) installs no recorder.
    pub metrics_listen: Option<SocketAddr>,
    /// The retry policy file (reloaded while running when the watcher is
    /// available); `None` uses the built-in defaults.
    pub policy: Option<PathBuf>,
    /// The largest request body accepted, in bytes (larger: 413).
    pub body_limit: usize,
    /// The largest non-streaming upstream response body read, in bytes.
    pub max_response_body: usize,
    /// The most request headers accepted (more: 431), at most
    /// [`MAX_HEADERS_LIMIT`].
    pub max_headers: usize,
    /// The time limit of one client request: reading its body, every
    /// attempt and wait, and the response (a stream is ended when it
    /// passes). `None`: the policy's `timeouts.request`.
    pub request_timeout: Option<Duration>,
    /// How long a shutdown waits for in-flight requests before it drops
    /// them.
    pub shutdown_timeout: Duration,
    /// The upstream providers, by name.
    pub providers: Vec<ProviderConfig>,
    /// The models clients may ask for.
    pub models: Vec<ModelConfig>,
}

/// One upstream provider (`[providers.NAME]`).
#[derive(Clone, Debug, PartialEq)]
pub struct ProviderConfig {
    /// Its name: the `provider` label of metrics, and what logs show
    /// instead of its URL.
    pub name: String,
    /// The OpenAI-compatible base URL, `/v1` included
    /// (`http://10.0.0.5:8000/v1`); the gateway appends
    /// `/chat/completions`, `/completions` or `/embeddings`.
    pub base_url: url::Url,
    /// The environment variable holding the API key sent as
    /// `Authorization: Bearer`; `None` sends no key.
    pub api_key_env: Option<String>,
    /// TCP connect limit; `None`: the policy's `timeouts.connect` at startup.
    pub connect_timeout: Option<Duration>,
    /// A per-attempt limit for this provider, applied inside the attempt;
    /// the policy's `timeouts.attempt` still applies, so the shorter wins.
    pub attempt_timeout: Option<Duration>,
    /// Idle pooled connections are dropped after this; zero disables
    /// connection reuse.
    pub idle_timeout: Duration,
}

/// One model (`[[models]]`).
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// The name clients send in the body's `model` field.
    pub name: String,
    /// Its providers, in failover order.
    pub routes: Vec<RouteConfig>,
}

/// One provider of one model.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteConfig {
    /// The provider's name (a key of `[providers]`).
    pub provider: String,
    /// The model name this provider expects, when it differs from the one
    /// clients use; the body's `model` field is rewritten for it.
    pub upstream_model: Option<String>,
}

/// A configuration that cannot be used: where, which field, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, when read from one.
    pub file: Option<PathBuf>,
    /// Dotted path of the field (`providers.proxy-a.base_url`,
    /// `models[1].providers`); empty for syntax errors.
    pub field: String,
    /// What is wrong and what would be accepted.
    pub message: String,
    /// 1-based line and column, when known.
    pub location: Option<(usize, usize)>,
    path: Vec<Seg>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        if let Some((line, col)) = self.location {
            write!(f, "line {line}, column {col}: ")?;
        }
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "`{}`: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// An error in one field of one provider, found after validation.
    pub(crate) fn provider_field(provider: &str, field: &str, message: impl Into<String>) -> Self {
        ConfigError::at(
            path(&[key("providers"), key(provider), key(field)]),
            message,
        )
    }

    fn at(path: Vec<Seg>, message: impl Into<String>) -> Self {
        ConfigError {
            file: None,
            field: display_path(&path),
            message: message.into(),
            location: None,
            path,
        }
    }

    fn located(mut self, text: &str) -> Self {
        // A missing field is reported at its nearest enclosing table.
        self.location = (0..=self.path.len())
            .rev()
            .find_map(|n| locate(text, &self.path[..n]));
        self
    }
}

fn key(k: &str) -> Seg {
    Seg::key(k)
}

fn path(segs: &[Seg]) -> Vec<Seg> {
    segs.to_vec()
}

/// A byte size: an integer (bytes) or a string with a unit.
#[derive(Clone, Copy, Debug)]
struct Size(u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size: a number of bytes or a string like \"4MiB\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// `"4MiB"`, `"512 KiB"`, `"1MB"`, `"100"`.
fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size like \"4MiB\" or \"512KiB\""))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" => 1 << 10,
        "mb" => 1_000_000,
        "mib" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (use B, KB, KiB, MB, MiB, GB or GiB)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    metrics_listen: Option<String>,
    policy: Option<String>,
    body_limit: Option<Size>,
    max_response_body: Option<Size>,
    max_headers: Option<u64>,
    request_timeout: Option<String>,
    shutdown_timeout: Option<String>,
    #[serde(default)]
    providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    models: Vec<RawModel>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    base_url: String,
    api_key_env: Option<String>,
    /// Only to refuse it with a useful message.
    api_key: Option<toml::Value>,
    connect_timeout: Option<String>,
    attempt_timeout: Option<String>,
    idle_timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: String,
    providers: Vec<String>,
    #[serde(default)]
    upstream_model: BTreeMap<String, String>,
}

fn duration(text: &str, at: &[Seg]) -> Result<Duration, ConfigError> {
    humantime::parse_duration(text).map_err(|e| {
        ConfigError::at(
            path(at),
            format!("{text:?} is not a duration like \"30s\" or \"500ms\" ({e})"),
        )
    })
}

fn socket_addr(text: &str, at: &[Seg]) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        ConfigError::at(
            path(at),
            format!("{text:?} is not an address like \"127.0.0.1:8080\" or \"[::1]:8080\""),
        )
    })
}

fn in_range(value: Duration, min: Duration, max: Duration, at: &[Seg]) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(ConfigError::at(
            path(at),
            format!(
                "\"{}\" is out of range: allowed \"{}\"..=\"{}\"",
                humantime::format_duration(value),
                humantime::format_duration(min),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(())
}

fn size_in_range(value: usize, min: usize, max: usize, at: &[Seg]) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(ConfigError::at(
            path(at),
            format!("{value} bytes is out of range: allowed {min}..={max} bytes"),
        ));
    }
    Ok(())
}

/// Provider names become metric label values and log fields.
fn valid_provider_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn valid_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn valid_model_name(name: &str) -> bool {
    !name.trim().is_empty() && name.len() <= 256 && !name.chars().any(char::is_control)
}

impl GatewayConfig {
    /// Reads, parses and validates a configuration file. A relative
    /// `policy` path is resolved against the file's directory.
    pub fn load(file: &Path) -> Result<GatewayConfig, ConfigError> {
        let with_file = |mut e: ConfigError| {
            e.file = Some(file.to_owned());
            e
        };
        let bytes = std::fs::read(file)
            .map_err(|e| with_file(ConfigError::at(Vec::new(), format!("cannot read: {e}"))))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            with_file(ConfigError::at(
                Vec::new(),
                format!(
                    "not UTF-8 text (invalid byte at offset {})",
                    e.utf8_error().valid_up_to()
                ),
            ))
        })?;
        let mut config = GatewayConfig::from_toml(&text).map_err(with_file)?;
        if let Some(policy) = &mut config.policy {
            if policy.is_relative() {
                let dir = file.parent().unwrap_or(Path::new(""));
                *policy = dir.join(&*policy);
            }
        }
        Ok(config)
    }

    /// Parses and validates a configuration. A relative `policy` path is
    /// left as written (relative to the working directory).
    pub fn from_toml(text: &str) -> Result<GatewayConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let offset = e.span().map(|s| s.start);
            let path = offset.and_then(|o| path_at(text, o)).unwrap_or_default();
            ConfigError {
                file: None,
                field: display_path(&path),
                message: e.message().trim().to_owned(),
                location: offset.map(|o| line_col(text, o)),
                path,
            }
        })?;
        let config = GatewayConfig::from_raw(raw).map_err(|e| e.located(text))?;
        config.validate().map_err(|e| e.located(text))?;
        Ok(config)
    }

    fn from_raw(raw: RawConfig) -> Result<GatewayConfig, ConfigError> {
        let listen = match &raw.listen {
            Some(s) => socket_addr(s, &[key("listen")])?,
            None => DEFAULT_LISTEN,
        };
        let metrics_listen = match raw.metrics_listen.as_deref() {
            Some("off") => None,
            Some(s) => Some(socket_addr(s, &[key("metrics_listen")]).map_err(|mut e| {
                e.message.push_str(", or \"off\"");
                e
            })?),
            None => Some(crate::metrics_endpoint::DEFAULT_ADDR),
        };
        let policy = match raw.policy {
            Some(p) if p.trim().is_empty() => {
                return Err(ConfigError::at(
                    vec![key("policy")],
                    "an empty path; leave `policy` out to use the built-in defaults",
                ));
            }
            p => p.map(PathBuf::from),
        };
        let to_usize = |s: Option<Size>, default: usize| {
            s.map_or(default, |s| usize::try_from(s.0).unwrap_or(usize::MAX))
        };
        let request_timeout = match &raw.request_timeout {
            Some(s) => Some(duration(s, &[key("request_timeout")])?),
            None => None,
        };
        let shutdown_timeout = match &raw.shutdown_timeout {
            Some(s) => duration(s, &[key("shutdown_timeout")])?,
            None => DEFAULT_SHUTDOWN_TIMEOUT,
        };
        let mut providers = Vec::with_capacity(raw.providers.len());
        for (name, p) in raw.providers {
            let at = |field: &str| [key("providers"), key(&name), key(field)];
            if p.api_key.is_some() {
                return Err(ConfigError::at(
                    path(&at("api_key")),
                    "API keys do not belong in the configuration file: put the key in an \
                     environment variable and name it in `api_key_env`",
                ));
            }
            let base_url = url::Url::parse(&p.base_url).map_err(|e| {
                ConfigError::at(
                    path(&at("base_url")),
                    format!("not a URL ({e}); expected e.g. \"http://127.0.0.1:8000/v1\""),
                )
            })?;
            let optional = |field: &str, value: &Option<String>| match value {
                Some(s) => duration(s, &at(field)).map(Some),
                None => Ok(None),
            };
            providers.push(ProviderConfig {
                connect_timeout: optional("connect_timeout", &p.connect_timeout)?,
                attempt_timeout: optional("attempt_timeout", &p.attempt_timeout)?,
                idle_timeout: optional("idle_timeout", &p.idle_timeout)?
                    .unwrap_or(DEFAULT_IDLE_TIMEOUT),
                name,
                base_url,
                api_key_env: p.api_key_env,
            });
        }
        let models = raw
            .models
            .into_iter()
            .map(|m| {
                let mut upstream = m.upstream_model;
                let routes = m
                    .providers
                    .into_iter()
                    .map(|provider| RouteConfig {
                        upstream_model: upstream.remove(&provider),
                        provider,
                    })
                    .collect();
                (m.name, routes, upstream)
            })
            .enumerate()
            .map(|(i, (name, routes, leftover))| {
                // An upstream name for a provider the model does not use
                // is a typo: say so rather than ignore it.
                if let Some((provider, _)) = leftover.into_iter().next() {
                    return Err(ConfigError::at(
                        vec![
                            key("models"),
                            Seg::Index(i),
                            key("upstream_model"),
                            key(&provider),
                        ],
                        format!("{provider:?} is not one of this model's `providers`"),
                    ));
                }
                Ok(ModelConfig { name, routes })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(GatewayConfig {
            listen,
            metrics_listen,
            policy,
            body_limit: to_usize(raw.body_limit, DEFAULT_BODY_LIMIT),
            max_response_body: to_usize(raw.max_response_body, DEFAULT_MAX_RESPONSE_BODY),
            max_headers: raw.max_headers.map_or(MAX_HEADERS_LIMIT, |n| {
                usize::try_from(n).unwrap_or(usize::MAX)
            }),
            request_timeout,
            shutdown_timeout,
            providers,
            models,
        })
    }

    /// Checks every value and every reference between providers and
    /// models. Errors name the field's path; [`GatewayConfig::from_toml`]
    /// adds where it is written.
    pub fn validate(&self) -> Result<(), ConfigError> {
        size_in_range(self.body_limit, 1 << 10, 256 << 20, &[key("body_limit")])?;
        size_in_range(
            self.max_response_body,
            1 << 10,
            1 << 30,
            &[key("max_response_body")],
        )?;
        if !(1..=MAX_HEADERS_LIMIT).contains(&self.max_headers) {
            return Err(ConfigError::at(
                vec![key("max_headers")],
                format!(
                    "{} is out of range: allowed 1..={MAX_HEADERS_LIMIT}",
                    self.max_headers
                ),
            ));
        }
        if let Some(t) = self.request_timeout {
            let limit = Duration::from_secs(86_400);
            in_range(
                t,
                Duration::from_millis(10),
                limit,
                &[key("request_timeout")],
            )?;
        }
        in_range(
            self.shutdown_timeout,
            Duration::ZERO,
            Duration::from_secs(3600),
            &[key("shutdown_timeout")],
        )?;
        for (i, p) in self.providers.iter().enumerate() {
            let at = |field: &str| vec![key("providers"), key(&p.name), key(field)];
            if !valid_provider_name(&p.name) {
                return Err(ConfigError::at(
                    vec![key("providers"), key(&p.name)],
                    "a provider name is 1 to 64 characters among A-Z a-z 0-9 - _ . \
                     (it becomes a metric label)",
                ));
            }
            if self.providers[..i].iter().any(|q| q.name == p.name) {
                return Err(ConfigError::at(
                    vec![key("providers"), key(&p.name)],
                    "declared twice",
                ));
            }
            let url = &p.base_url;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(ConfigError::at(
                    at("base_url"),
                    "an http:// or https:// URL with a host is required",
                ));
            }
            if !url.username().is_empty() || url.password().is_some() {
                return Err(ConfigError::at(
                    at("base_url"),
                    "credentials do not belong in the URL: name an environment variable \
                     in `api_key_env`",
                ));
            }
            if url.query().is_some() || url.fragment().is_some() {
                return Err(ConfigError::at(
                    at("base_url"),
                    "a base URL has no query or fragment",
                ));
            }
            if let Some(env) = &p.api_key_env {
                if !valid_env_name(env) {
                    return Err(ConfigError::at(
                        at("api_key_env"),
                        format!(
                            "{env:?} is not an environment variable name \
                             (letters, digits and _, not starting with a digit)"
                        ),
                    ));
                }
            }
            let limit = Duration::from_secs(3600);
            if let Some(t) = p.connect_timeout {
                in_range(
                    t,
                    Duration::from_millis(1),
                    Duration::from_secs(300),
                    &at("connect_timeout"),
                )?;
            }
            if let Some(t) = p.attempt_timeout {
                in_range(t, Duration::from_millis(1), limit, &at("attempt_timeout"))?;
            }
            in_range(
                p.idle_timeout,
                Duration::ZERO,
                Duration::from_secs(600),
                &at("idle_timeout"),
            )?;
        }
        if self.models.is_empty() {
            return Err(ConfigError::at(
                vec![key("models")],
                "no model is configured: add a [[models]] table",
            ));
        }
        for (i, m) in self.models.iter().enumerate() {
            let at = |field: &str| vec![key("models"), Seg::Index(i), key(field)];
            if !valid_model_name(&m.name) {
                return Err(ConfigError::at(
                    at("name"),
                    format!(
                        "{:?} is not a model name (1 to 256 bytes, not blank, no control characters)",
                        m.name
                    ),
                ));
            }
            if let Some(j) = self.models[..i].iter().position(|n| n.name == m.name) {
                return Err(ConfigError::at(
                    at("name"),
                    format!("model {:?} is already declared by models[{j}]", m.name),
                ));
            }
            if m.routes.is_empty() {
                return Err(ConfigError::at(
                    at("providers"),
                    "a model needs at least one provider",
                ));
            }
            if m.routes.len() > retryctl::policy::MAX_PROVIDERS_PER_MODEL {
                return Err(ConfigError::at(
                    at("providers"),
                    format!(
                        "{} providers; at most {} are allowed",
                        m.routes.len(),
                        retryctl::policy::MAX_PROVIDERS_PER_MODEL
                    ),
                ));
            }
            for (k, r) in m.routes.iter().enumerate() {
                let mut at_route = at("providers");
                at_route.push(Seg::Index(k));
                if !self.providers.iter().any(|p| p.name == r.provider) {
                    return Err(ConfigError::at(
                        at_route,
                        format!(
                            "no provider {:?} is declared (add a [providers.{}] table)",
                            r.provider, r.provider
                        ),
                    ));
                }
                if m.routes[..k].iter().any(|q| q.provider == r.provider) {
                    return Err(ConfigError::at(
                        at_route,
                        format!("provider {:?} is listed twice", r.provider),
                    ));
                }
                if let Some(u) = &r.upstream_model {
                    if !valid_model_name(u) {
                        let mut at_up = at("upstream_model");
                        at_up.push(key(&r.provider));
                        return Err(ConfigError::at(at_up, format!("{u:?} is not a model name")));
                    }
                }
            }
        }
        Ok(())
    }

    /// The provider named `name`.
    pub fn provider(&self, name: &str) -> Option<&ProviderConfig> {
        self.providers.iter().find(|p| p.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[providers.a]
base_url = "http://127.0.0.1:8000/v1"

[[models]]
name = "m"
providers = ["a"]
"#;

    fn err(text: &str) -> ConfigError {
        GatewayConfig::from_toml(text).unwrap_err()
    }

    #[test]
    fn minimal_config_gets_the_defaults() {
        let c = GatewayConfig::from_toml(MINIMAL).unwrap();
        assert_eq!(c.listen, DEFAULT_LISTEN);
        assert_eq!(
            c.metrics_listen,
            Some(crate::metrics_endpoint::DEFAULT_ADDR)
        );
        assert_eq!(c.policy, None);
        assert_eq!(c.body_limit, 4 << 20);
        assert_eq!(c.max_headers, 100);
        assert_eq!(c.request_timeout, None);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
        let p = c.provider("a").unwrap();
        assert_eq!(p.base_url.as_str(), "http://127.0.0.1:8000/v1");
        assert_eq!(p.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(
            c.models,
            vec![ModelConfig {
                name: "m".into(),
                routes: vec![RouteConfig {
                    provider: "a".into(),
                    upstream_model: None
                }]
            }]
        );
    }

    #[test]
    fn sizes_and_durations() {
        let text = format!(
            "body_limit = \"512KiB\"\nmax_response_body = 2000000\nrequest_timeout = \"2m\"\n\
             metrics_listen = \"off\"\n{MINIMAL}"
        );
        let c = GatewayConfig::from_toml(&text).unwrap();
        assert_eq!(c.body_limit, 512 << 10);
        assert_eq!(c.max_response_body, 2_000_000);
        assert_eq!(c.request_timeout, Some(Duration::from_secs(120)));
        assert_eq!(c.metrics_listen, None);
        assert_eq!(parse_size("4 MiB"), Ok(4 << 20));
        assert_eq!(parse_size("1MB"), Ok(1_000_000));
        assert!(
            parse_size("4 parsecs")
                .unwrap_err()
                .contains("unknown size unit")
        );
    }

    #[test]
    fn errors_name_line_and_field() {
        let e = err(&format!(
            "{MINIMAL}\n[providers.b]\nbase_url = \"ftp://x\"\n"
        ));
        assert_eq!(e.field, "providers.b.base_url");
        assert_eq!(e.location, Some((10, 12)), "{e}");
        assert!(e.to_string().contains("http://"), "{e}");

        // keys are quoted and escaped the way TOML (and the policy) writes them
        let e = err(&format!(
            "{MINIMAL}\n[providers.\"a\\tb\"]\nbase_url = \"no url\"\n"
        ));
        assert_eq!(e.field, "providers.\"a\\u0009b\".base_url", "{e}");
        assert_eq!(e.location, Some((10, 12)), "{e}");

        let e = err(&MINIMAL.replace("providers = [\"a\"]", "providers = [\"a\", \"zz\"]"));
        assert_eq!(e.field, "models[0].providers[1]");
        assert_eq!(e.location.map(|l| l.0), Some(7), "{e}");
        assert!(e.message.contains("zz"));

        let e = err(&format!("listen = \"localhost\"\n{MINIMAL}"));
        assert_eq!((e.field.as_str(), e.location), ("listen", Some((1, 10))));

        let e = err(&format!("max_headers = 500\n{MINIMAL}"));
        assert!(
            e.to_string()
                .starts_with("line 1, column 15: `max_headers`"),
            "{e}"
        );
    }

    #[test]
    fn parser_errors_have_a_path() {
        let e = err(&MINIMAL.replace("base_url", "base_ur1"));
        assert!(e.message.contains("base_ur1"), "{e}");
        assert_eq!(e.field, "providers.a.base_ur1");
        assert_eq!(e.location.map(|l| l.0), Some(3));

        let e = err(&format!(
            "{MINIMAL}\n[[models]]\nname = 7\nproviders = []\n"
        ));
        assert_eq!(e.field, "models[1].name", "{e}");
        assert_eq!(e.location.map(|l| l.0), Some(10));
    }

    #[test]
    fn keys_never_in_the_file() {
        let e = err(&MINIMAL.replace(
            "base_url = \"http://127.0.0.1:8000/v1\"",
            "base_url = \"http://127.0.0.1:8000/v1\"\napi_key = \"sk-secret\"",
        ));
        assert_eq!(e.field, "providers.a.api_key");
        assert!(e.message.contains("api_key_env"));
        assert!(!e.to_string().contains("sk-secret"));
        let e = err(&MINIMAL.replace("http://", "http://user:pw@"));
        assert!(e.message.contains("credentials"), "{e}");
        let e = err(&MINIMAL.replace(
            "base_url = \"http://127.0.0.1:8000/v1\"",
            "base_url = \"http://h/v1\"\napi_key_env = \"1BAD\"",
        ));
        assert_eq!(e.field, "providers.a.api_key_env");
    }

    #[test]
    fn model_references_are_checked() {
        let e = err(&format!("{MINIMAL}upstream_model = {{ b = \"x\" }}\n"));
        assert_eq!(e.field, "models[0].upstream_model.b", "{e}");
        let e = err(&format!(
            "{MINIMAL}\n[[models]]\nname = \"m\"\nproviders = [\"a\"]\n"
        ));
        assert_eq!(e.field, "models[1].name");
        assert!(e.message.contains("models[0]"));
        let e = err(&MINIMAL.replace("providers = [\"a\"]", "providers = [\"a\", \"a\"]"));
        assert_eq!(e.field, "models[0].providers[1]");
        let e = err("[providers.a]\nbase_url = \"http://h\"\n");
        assert_eq!(e.field, "models");
        let with_upstream =
            GatewayConfig::from_toml(&format!("{MINIMAL}upstream_model = {{ a = \"real\" }}\n"))
                .unwrap();
        assert_eq!(
            with_upstream.models[0].routes[0].upstream_model.as_deref(),
            Some("real")
        );
    }
}
