//! `interceptor agent`: load, attach and pin the datapath, keep the pods right, until a signal.

use anyhow::Result;
use interceptor_common::config::{
    CONFIG_APP_NODELAY, CONFIG_MSG_ADAPTIVE, CONFIG_MSG_REDIRECT, CONFIG_POD_TO_POD, GlobalConfig,
};

use crate::{
    agent::{self, AgentOptions},
    bpf::{LoadOptions, Pins},
    cli::{self, AgentArgs},
    kube::KubeOptions,
    signal,
};

pub fn run(pins: Pins, args: AgentArgs) -> Result<()> {
    // Checked before anything is loaded: a misconfigured DaemonSet fails fast.
    let kube = match (args.kube, args.node_name.clone()) {
        (false, _) => None,
        (true, Some(node_name)) if !node_name.is_empty() => Some(KubeOptions {
            kubeconfig: args.kubeconfig.clone(),
            node_name,
            // The host's: the DaemonSet runs with hostPID, and the registry's own
            // lookups (gone pods, listeners) read /proc too.
            proc_root: "/proc".into(),
            daemonset: args.daemonset.clone(),
            dns_capture: args.dns_capture,
        }),
        (true, _) => return Err(crate::kube::Error::NoNodeName.into()),
    };
    let (cgroup, features) = agent::preflight(args.cgroup.as_deref())?;
    let mut config = GlobalConfig::istio_defaults();
    config.outbound_port = args.outbound_port.into();
    config.inbound_port = args.inbound_port.into();
    if args.no_msg_redirect {
        config.flags &= !CONFIG_MSG_REDIRECT;
    }
    if args.msg_redirect_policy == cli::MsgRedirectPolicy::Adaptive {
        config.flags |= CONFIG_MSG_ADAPTIVE;
    }
    if args.no_pod_to_pod {
        config.flags &= !CONFIG_POD_TO_POD;
    }
    // Below 6.1 the programs' bpf_setsockopt would fail on every in-pod connection.
    if args.no_app_nodelay || !features.app_nodelay() {
        config.flags &= !CONFIG_APP_NODELAY;
    }
    let opts = AgentOptions {
        pins,
        load: LoadOptions {
            cgroup,
            config,
            bpf_log_level: args.bpf_log_level.into(),
            replace: args.replace,
        },
        keep_pinned: args.keep_pinned,
        wait_for_old_agent: args.wait_for_old_agent,
        reconcile_every: cli::secs(args.reconcile_seconds.max(0.05)),
        kube,
        health_addr: args.health_addr,
        features: Some(features),
        tcp_pressure_source: args.tcp_pressure_source.clone(),
    };
    let rt = super::runtime()?;
    // Handlers registered before anything is attached (see `signal::shutdown`).
    let shutdown = {
        let _entered = rt.enter();
        signal::shutdown()
    };
    rt.block_on(agent::run(opts, shutdown))?;
    Ok(())
}
