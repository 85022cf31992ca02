//! `cgroup/connect6`: the same for IPv6 sockets, including dual-stack sockets connecting to an
//! IPv4-mapped address (those are redirected to `::ffff:127.0.0.1` and bound to the pod's IPv4).

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use interceptor_common::addr::{
    is_unspecified, is_v4_mapped, v4_mapped, LOCALHOST_V4, LOCALHOST_V6,
};

use crate::{
    connect::{
        current_pod, decide, proxy_absent_open, redirect, settings, unique_source, Outcome,
        Verdict, AF_INET6, SOCK_STREAM,
    },
    ctx,
    sockaddr::SockaddrIn6,
};

#[cgroup_sock_addr(connect6)]
pub fn redirect_conn6(ctx: SockAddrContext) -> i32 {
    match intercept(&ctx) {
        Outcome::Refuse => 0,
        Outcome::Redirect | Outcome::Pass => 1,
    }
}

#[inline(always)]
fn intercept(ctx: &SockAddrContext) -> Outcome {
    let kind = ctx::sa_type(ctx);
    if kind == crate::connect::SOCK_DGRAM {
        return crate::dns::connect_udp6(ctx);
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
    let dst = ctx::sa_user_ip6(ctx);
    let port = ctx::sa_user_port(ctx);
    let src = ctx::sa_bound_src(ctx, true);
    let mapped = is_v4_mapped(&dst);
    let passthrough = if mapped {
        v4_mapped(cfg.passthrough_ip4)
    } else {
        cfg.passthrough_ip6
    };
    let Verdict::ToProxy {
        port,
        orig,
        counter,
    } = decide(ctx, &pod, &cfg, &src, &passthrough, &dst, port)
    else {
        return Outcome::Pass;
    };
    if proxy_absent_open(ctx, &pod, !mapped, port) {
        return Outcome::Pass;
    }
    let (proxy, source) = if mapped {
        (
            v4_mapped(LOCALHOST_V4),
            (pod.config.ip4 != 0).then(|| v4_mapped(pod.config.ip4)),
        )
    } else {
        (
            LOCALHOST_V6,
            (!is_unspecified(&pod.config.ip6)).then_some(pod.config.ip6),
        )
    };
    let unique = unique_source(&src, || {
        let Some(source) = source else {
            return false;
        };
        let mut sa = SockaddrIn6 {
            family: AF_INET6 as u16,
            port: 0,
            flowinfo: 0,
            addr: source,
            scope_id: 0,
        };
        ctx::bind(ctx, &mut sa) == 0
    });
    let outcome = redirect(ctx, &pod, unique, &orig, counter);
    if let Outcome::Redirect = outcome {
        ctx::sa_set_user_ip6(ctx, &proxy);
        ctx::sa_set_user_port(ctx, port);
    }
    outcome
}
