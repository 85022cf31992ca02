//! The sidecar proxy's settings for running it in-process in a test: every listener on
//! 127.0.0.1 port 0 (the test reads the bound ports back from `Bound`), the routing config
//! written to a file of its own. Callers adjust the rest (poll period, drain, workers, DNS).

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use interceptor::proxy::ProxyConfig;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Writes `yaml` to a fresh file under the temp dir (named after `tag`, this process and a
/// sequence number, so parallel tests never share one) and returns settings that load it, with
/// every listener on 127.0.0.1:0 and no IPv6 outbound listener. Panics on I/O errors (tests).
pub fn config(tag: &str, yaml: &str) -> (ProxyConfig, PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "interceptor-{tag}-test-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let config_path = dir.join("proxy.yaml");
    std::fs::write(&config_path, yaml).expect("write config");
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let config = ProxyConfig {
        outbound: any,
        outbound_v6: None,
        inbound: any,
        metrics: any,
        health: any,
        admin: any,
        config_file: Some(config_path.clone()),
        ..ProxyConfig::default()
    };
    (config, config_path)
}
