//! `cgroup/connect4` at the cgroup v2 root: an enabled pod's IPv4 TCP connects go to its proxy.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use interceptor_common::{
    addr::{v4_mapped, LOCALHOST_V4},
    counters::Counter,
    names::{NETNS_PROBE_IP4, NETNS_PROBE_PORT},
};

use crate::{
    connect::{
        current_pod, decide, proxy_absent_open, redirect, settings, unique_source, Outcome,
        Verdict, AF_INET, SOCK_DGRAM, SOCK_STREAM,
    },
    ctx,
    maps::{count, NETNS_PROBE},
    sockaddr::SockaddrIn,
};

#[cgroup_sock_addr(connect4)]
pub fn redirect_conn4(ctx: SockAddrContext) -> i32 {
    // 0 refuses the connect (EPERM): only for a connect that must not bypass the proxy.
    match intercept(&ctx) {
        Outcome::Refuse => 0,
        Outcome::Redirect | Outcome::Pass => 1,
    }
}

#[inline(always)]
fn intercept(ctx: &SockAddrContext) -> Outcome {
    let kind = ctx::sa_type(ctx);
    let dst4 = ctx::sa_user_ip4(ctx);
    let port = ctx::sa_user_port(ctx);
    if kind == SOCK_DGRAM {
        record_netns_probe(ctx, dst4, port);
        return crate::dns::connect_udp4(ctx, dst4, port);
    }
    if kind != SOCK_STREAM {
        return Outcome::Pass;
    }
    let Some(pod) = current_pod(ctx) else {
        return Outcome::Pass;
    };
    let Some(cfg) = settings() else {
        return Outcome::Pass;
    };
    let src = ctx::sa_bound_src(ctx, false);
    let passthrough = v4_mapped(cfg.passthrough_ip4);
    let dst = v4_mapped(dst4);
    let Verdict::ToProxy {
        port,
        orig,
        counter,
    } = decide(ctx, &pod, &cfg, &src, &passthrough, &dst, port)
    else {
        return Outcome::Pass;
    };
    if proxy_absent_open(ctx, &pod, false, port) {
        return Outcome::Pass;
    }
    // The pod's own address as the source: the source the app would have had (as with
    // iptables REDIRECT), and what keeps the 4-tuple unique on kernels < 5.15.
    let unique = unique_source(&src, || {
        if pod.config.ip4 == 0 {
            return false;
        }
        let mut sa = SockaddrIn {
            family: AF_INET as u16,
            port: 0,
            addr: pod.config.ip4,
            zero: [0; 8],
        };
        ctx::bind(ctx, &mut sa) == 0
    });
    let outcome = redirect(ctx, &pod, unique, &orig, counter);
    if let Outcome::Redirect = outcome {
        ctx::sa_set_user_ip4(ctx, LOCALHOST_V4);
        ctx::sa_set_user_port(ctx, port);
    }
    outcome
}

/// The agent's UDP "connect" to the probe address: remember this socket's network namespace.
#[inline(always)]
fn record_netns_probe(ctx: &SockAddrContext, dst4: u32, port: u16) {
    if dst4 != u32::from_ne_bytes(NETNS_PROBE_IP4) || port != NETNS_PROBE_PORT {
        return;
    }
    let (cookie, netns) = (ctx::socket_cookie(ctx), ctx::netns_cookie(ctx));
    if NETNS_PROBE.insert(&cookie, &netns, 0).is_ok() {
        count(Counter::NetnsProbe);
    }
}
