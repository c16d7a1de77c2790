//! Fuzz target `gateway_config`: the gateway's configuration file
//! (`GatewayConfig::from_toml`, what `retryctl serve --config` reads).
//!
//! Input: text (inputs that are not UTF-8 are skipped: the loader refuses
//! them before parsing). Checks: an accepted configuration validates and
//! names only declared providers; a refused one renders its error, and
//! its location points inside the text.

use retryctl_gateway::GatewayConfig;

/// One fuzz input.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match GatewayConfig::from_toml(text) {
        Ok(config) => {
            config.validate().expect("a parsed configuration validates");
            assert!(!config.models.is_empty());
            for m in &config.models {
                assert!(!m.routes.is_empty());
                for r in &m.routes {
                    assert!(config.provider(&r.provider).is_some(), "{}", r.provider);
                }
            }
        }
        Err(e) => {
            let rendered = e.to_string();
            assert!(!rendered.is_empty());
            if let Some((line, col)) = e.location {
                let lines = text.split('\n').count();
                assert!(line >= 1 && col >= 1, "location is 1-based: {e}");
                assert!(
                    line <= lines,
                    "line {line} past the text's {lines} lines: {e}"
                );
            }
        }
    }
}
