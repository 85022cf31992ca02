//! `cgroup/connect4` at the cgroup v2 root: an enabled pod's IPv4 TCP connects go to its proxy.

use aya_ebpf::{
    helpers::{bpf_bind, bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext as _,
};
use interceptor_common::{
    addr::{v4_mapped, LOCALHOST_V4},
    counters::Counter,
    names::{NETNS_PROBE_IP4, NETNS_PROBE_PORT},
};

use crate::{
    connect::{
        current_pod, decide, pod_unique_source, redirect, settings, Verdict, AF_INET, SOCK_DGRAM,
        SOCK_STREAM,
    },
    ctx,
    maps::{count, NETNS_PROBE},
    sockaddr::SockaddrIn,
};

#[cgroup_sock_addr(connect4)]
pub fn redirect_conn4(ctx: SockAddrContext) -> i32 {
    intercept(&ctx);
    // Always let the connect proceed: interception only ever changes where it goes.
    1
}

#[inline(always)]
fn intercept(ctx: &SockAddrContext) {
    let kind = ctx::sa_type(ctx);
    let dst4 = ctx::sa_user_ip4(ctx);
    let port = ctx::sa_user_port(ctx);
    if kind == SOCK_DGRAM {
        record_netns_probe(ctx, dst4, port);
        return;
    }
    if kind != SOCK_STREAM {
        return;
    }
    let Some(pod) = current_pod(ctx) else {
        return;
    };
    let Some(cfg) = settings() else {
        return;
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
        return;
    };
    // The pod's own address as the source: it makes the app↔proxy 4-tuple unique on the node
    // and is the source the app would have had (as with iptables REDIRECT).
    let unique = pod_unique_source(&src, || {
        if pod.config.ip4 == 0 {
            return false;
        }
        let mut sa = SockaddrIn {
            family: AF_INET as u16,
            port: 0,
            addr: pod.config.ip4,
            zero: [0; 8],
        };
        // SAFETY: bpf_bind on a connect4 context with a sockaddr_in on the stack.
        let ret = unsafe {
            bpf_bind(
                ctx.as_ptr().cast(),
                (&mut sa as *mut SockaddrIn).cast(),
                core::mem::size_of::<SockaddrIn>() as i32,
            )
        };
        ret == 0
    });
    if redirect(ctx, unique, &orig, counter) {
        ctx::sa_set_user_ip4(ctx, LOCALHOST_V4);
        ctx::sa_set_user_port(ctx, port);
    }
}

/// The agent's UDP "connect" to the probe address: remember this socket's network namespace.
#[inline(always)]
fn record_netns_probe(ctx: &SockAddrContext, dst4: u32, port: u16) {
    if dst4 != u32::from_ne_bytes(NETNS_PROBE_IP4) || port != NETNS_PROBE_PORT {
        return;
    }
    // SAFETY: both helpers take the sock_addr context.
    let (cookie, netns) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_netns_cookie(ctx.as_ptr()),
        )
    };
    if NETNS_PROBE.insert(&cookie, &netns, 0).is_ok() {
        count(Counter::NetnsProbe);
    }
}
