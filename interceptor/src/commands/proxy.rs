//! `interceptor proxy`: the sidecar. Builds its config from the command line, drops to the proxy
//! identity and serves until a signal.

use std::sync::Arc;

use anyhow::{Context as _, Result};

use crate::{
    cli::{self, ProxyArgs},
    privileges,
    proxy::runtime::Bound,
    proxy::{ProxyConfig, orig_dst::OrigDstAddr},
    signal,
};

/// `interceptor proxy`: original destinations come from the sockets, as interception answers them.
pub fn run(args: ProxyArgs) -> Result<()> {
    run_with(args, None)
}

/// The proxy with another source of original destinations (`None`: the sockets'). Benchmarks
/// that run the sidecar without interception plug in a fixed one.
pub fn run_with(args: ProxyArgs, orig_dst: Option<Arc<dyn OrigDstAddr>>) -> Result<()> {
    if let Some(path) = &args.check_config {
        let config = crate::proxy::config::Config::load(path)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&config)?);
        } else {
            println!(
                "{}: valid ({} clusters, {} outbound listeners, {} virtual hosts)",
                path.display(),
                config.clusters.len(),
                config.outbound.listeners.len(),
                config
                    .outbound
                    .listeners
                    .iter()
                    .map(|l| l.virtual_hosts.len())
                    .sum::<usize>()
            );
        }
        return Ok(());
    }
    let config = config(&args)?;
    // Fail before dropping privileges, with the file's line and field.
    if let Some(path) = &config.config_file {
        crate::proxy::config::Config::load(path)?;
    }
    // Before any thread exists: every thread must run as the proxy identity.
    if !args.no_drop_privileges && privileges::drop_to(args.uid, args.gid)? {
        tracing::info!(
            uid = args.uid,
            gid = args.gid,
            "running as the proxy identity"
        );
    }
    // A proxy that interception does not exempt would capture its own upstream
    // connections. --no-drop-privileges is for a proxy run outside interception.
    if !args.no_drop_privileges {
        privileges::check_exempt(args.uid, args.gid)?;
    }
    // The control plane (admin, metrics, reload, signals) is light: one thread. The
    // data plane runs on its own worker threads (see `app.rs`).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async {
        let mut bound = Bound::bind(config)?;
        if let Some(orig_dst) = orig_dst {
            bound = bound.with_orig_dst(orig_dst);
        }
        bound.run(signal::shutdown()).await;
        Ok::<_, anyhow::Error>(())
    })
}

/// The listeners and timeouts the command line asks for.
pub fn config(args: &ProxyArgs) -> Result<ProxyConfig> {
    Ok(ProxyConfig {
        outbound: args.outbound,
        outbound_v6: match args.outbound_v6.as_str() {
            "none" | "" => None,
            s => Some(s.parse().context("--outbound-v6")?),
        },
        inbound: args.inbound,
        metrics: args.metrics,
        health: args.health,
        admin: args.admin,
        config_file: args.config.clone(),
        config_poll: cli::secs(args.config_poll_seconds),
        workers: args
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        connect_timeout: cli::secs(args.connect_timeout),
        drain_timeout: cli::secs(args.drain_timeout),
        dns: crate::proxy::dns::DnsSettings {
            listen: cli::optional_addr("--dns", &args.dns)?,
            listen_v6: cli::optional_addr("--dns-v6", &args.dns_v6)?,
            resolv_conf: args.dns_resolv_conf.clone(),
            upstreams: args.dns_upstream.clone(),
        },
        ..ProxyConfig::default()
    })
}
