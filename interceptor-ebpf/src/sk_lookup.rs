//! `sk_lookup` on each enabled pod's network namespace: a connection to the pod's address on a
//! captured port is handed to the proxy's inbound listener. The accepted socket's local
//! address is then the original destination, and no iptables rule is involved.

use aya_ebpf::{bindings::sk_action, macros::sk_lookup, programs::SkLookupContext};
use interceptor_common::{
    addr::is_loopback,
    counters::Counter,
    pod::{PodConfig, POD_FAIL_OPEN, POD_INBOUND},
};

use crate::{
    connect::AF_INET6,
    ctx,
    maps::{self, config, count, pod_of, LISTENERS},
    policy,
};

const IPPROTO_TCP: u32 = 6;

#[sk_lookup]
pub fn steer_inbound(ctx: SkLookupContext) -> u32 {
    steer(&ctx)
}

#[inline(always)]
fn steer(ctx: &SkLookupContext) -> u32 {
    let (family, protocol, local, local_port, remote) = ctx::lookup_tuple(ctx);
    if protocol != IPPROTO_TCP {
        return sk_action::SK_PASS;
    }
    // Only connections to a pod address are inbound traffic.
    let netns = pod_of(&local);
    if netns == 0 {
        return sk_action::SK_PASS;
    }
    // From inside the pod (the proxy's 127.0.0.6 / ::6 passthrough hop, or the pod calling its
    // own address): stays local, as with Istio.
    let passthrough6 = match config() {
        Some(cfg) => cfg.passthrough_ip6,
        None => return sk_action::SK_PASS,
    };
    if is_loopback(&remote) || remote == passthrough6 || pod_of(&remote) == netns {
        count(Counter::InboundSkippedLocal);
        return sk_action::SK_PASS;
    }
    let Some(pod) = maps::pod_config(netns) else {
        return sk_action::SK_PASS;
    };
    if pod.flags & POD_INBOUND == 0 || !policy::inbound_captures(&pod, local_port as u16) {
        count(Counter::InboundSkippedPort);
        return sk_action::SK_PASS;
    }
    // One listener per address family: an IPv6 SYN handed to an IPv4 socket is dropped.
    let Some(cookie) = maps::pod_listener(pod.pod_id, family == AF_INET6) else {
        // No proxy listening: refuse, as a REDIRECT to a closed port would, rather than let the
        // connection bypass the proxy; unless the pod fails open.
        return no_proxy(&pod, Counter::InboundNoListener);
    };
    match LISTENERS.redirect_sk_lookup(ctx, cookie, 0) {
        Ok(()) => {
            count(Counter::InboundAssigned);
            sk_action::SK_PASS
        }
        // The listener is gone (closed sockets leave LISTENERS by themselves).
        Err(_) => no_proxy(&pod, Counter::InboundAssignFailed),
    }
}

#[inline(always)]
fn no_proxy(pod: &PodConfig, refused: Counter) -> u32 {
    if pod.flags & POD_FAIL_OPEN != 0 {
        count(Counter::InboundNoProxyDirect);
        sk_action::SK_PASS
    } else {
        count(refused);
        sk_action::SK_DROP
    }
}
