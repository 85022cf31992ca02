//! What connect4 and connect6 share: which pod a socket belongs to and what to do with its
//! connect.

use aya_ebpf::{helpers::bpf_get_current_uid_gid, programs::SockAddrContext};
use interceptor_common::{
    addr::{is_loopback, is_unspecified, Addr},
    config::GlobalConfig,
    counters::Counter,
    origdst::{
        OrigDst, KIND_OUTBOUND, KIND_PASSTHROUGH, KIND_SELF_INBOUND, ORIG_DNS, ORIG_NO_SOCKMAP,
    },
    pod::{PodConfig, POD_FAIL_OPEN, POD_INBOUND, POD_NO_SOCKMAP, POD_OUTBOUND},
};

use crate::{
    ctx,
    maps::{self, config, count, pod_of, COOKIE_ORIG, NETNS_KEYS},
    policy::{self, Outbound},
};

pub(crate) const AF_INET: u32 = 2;
pub(crate) const AF_INET6: u32 = 10;
pub(crate) const SOCK_STREAM: u32 = 1;
pub(crate) const SOCK_DGRAM: u32 = 2;

/// What the connect program does with a connect.
pub(crate) enum Verdict {
    /// Leave the connect alone.
    Pass,
    /// Rewrite the destination to the proxy's `port` on loopback, once the socket's source is
    /// pod-unique (see [`redirect`]); `orig` is recorded for sockops and getsockopt, `counter`
    /// counts it.
    ToProxy {
        port: u16,
        orig: OrigDst,
        counter: Counter,
    },
}

/// Whether the app↔proxy 4-tuple will be unique on the node, which the sockhash and
/// `TUPLE_ORIG` keys rely on. Where the kernel puts the network-namespace cookie in those keys
/// (>= 5.15) it always is, whatever the socket was bound to. Elsewhere the source must be
/// pod-unique (loopback is per pod, so `127.0.0.1:P` is not). `bind_pod_address` binds the
/// pod's address of the socket's family when nothing is bound yet and says whether it worked
/// (false: the pod has none, or the socket already has a port, e.g. after `bind(0.0.0.0:0)`);
/// it is tried in any case, so the app's source is the one iptables REDIRECT would leave.
#[inline(always)]
pub(crate) fn unique_source(src: &Addr, bind_pod_address: impl FnOnce() -> bool) -> bool {
    if is_unspecified(src) {
        bind_pod_address() || netns_keyed()
    } else {
        !is_loopback(src) || netns_keyed()
    }
}

#[inline(always)]
fn netns_keyed() -> bool {
    NETNS_KEYS.load() != 0
}

/// What the program does with the connect in the end.
pub(crate) enum Outcome {
    /// Rewrite the destination to the proxy.
    Redirect,
    /// Let it go where it asked.
    Pass,
    /// Refuse it (the connect fails with EPERM): it could not go through the proxy and the pod
    /// fails closed.
    Refuse,
}

/// Finishes a `ToProxy` verdict: with a unique source, records the original destination and
/// says to rewrite. A connect that cannot be redirected (no unique source, or no room to
/// record its destination) is refused, or goes direct in a fail-open pod: never silently.
#[inline(always)]
pub(crate) fn redirect(
    ctx: &SockAddrContext,
    pod: &Pod,
    unique_source: bool,
    orig: &OrigDst,
    counter: Counter,
) -> Outcome {
    // Without a recorded original destination the proxy could not route the connection.
    if unique_source && remember(ctx, orig) {
        count(counter);
        return Outcome::Redirect;
    }
    // DNS over TCP is answered without it (see ORIG_DNS); unrecorded, it never enters the
    // sockhash either, so a non-unique 4-tuple cannot be confused with another pod's.
    if orig.flags & ORIG_DNS != 0 {
        count(Counter::DnsTcpUnrecorded);
        return Outcome::Redirect;
    }
    if pod.config.flags & POD_FAIL_OPEN != 0 {
        count(Counter::ConnectSkippedSource);
        Outcome::Pass
    } else {
        if !unique_source {
            count(Counter::ConnectRefusedSource);
        }
        Outcome::Refuse
    }
}

/// Whether a fail-open pod's connect must go direct because nothing listens on the proxy's
/// loopback `port` in the socket's network namespace right now (decided here, from the
/// listener's presence, not from what the agent believes). A fail-closed pod is never asked:
/// its connect goes to the port and is refused there, as iptables REDIRECT to a closed port.
#[inline(always)]
pub(crate) fn proxy_absent_open(ctx: &SockAddrContext, pod: &Pod, v6: bool, port: u16) -> bool {
    if pod.config.flags & POD_FAIL_OPEN == 0 || ctx::tcp_listener_on_loopback(ctx, v6, port) {
        return false;
    }
    count(Counter::ConnectNoProxyDirect);
    true
}

/// An enabled pod, as seen from one of its sockets.
pub(crate) struct Pod {
    /// Network-namespace cookie: the pod's identity in the kernel.
    pub(crate) netns: u64,
    pub(crate) config: PodConfig,
}

/// The pod the calling socket lives in (by network namespace), if it is enabled.
#[inline(always)]
pub(crate) fn current_pod(ctx: &SockAddrContext) -> Option<Pod> {
    // sock_addr programs have the helper from 5.7, the oldest kernel the loader accepts.
    let netns = ctx::netns_cookie(ctx);
    let config = maps::pod_config(netns)?;
    Some(Pod { netns, config })
}

#[inline(always)]
fn is_pod_address(pod: &Pod, addr: &Addr) -> bool {
    pod_of(addr) == pod.netns
}

/// `OrigDst` flags for connections of this pod.
#[inline(always)]
fn orig_flags(pod: &Pod) -> u32 {
    if pod.config.flags & POD_NO_SOCKMAP != 0 {
        ORIG_NO_SOCKMAP
    } else {
        0
    }
}

#[inline(always)]
fn remember(ctx: &SockAddrContext, orig: &OrigDst) -> bool {
    let cookie = ctx::socket_cookie(ctx);
    if COOKIE_ORIG.insert(&cookie, orig, 0).is_err() {
        count(Counter::ConnectMapFull);
        return false;
    }
    true
}

/// Decides a TCP connect of a socket in `pod` to `dst`:`port`, `src` being the socket's
/// already-bound source (unspecified if none). Mirrors Istio's ISTIO_OUTPUT chain.
#[inline(always)]
pub(crate) fn decide(
    ctx: &SockAddrContext,
    pod: &Pod,
    cfg: &GlobalConfig,
    src: &Addr,
    passthrough: &Addr,
    dst: &Addr,
    port: u16,
) -> Verdict {
    // Rule 1: the proxy's inbound passthrough hop (bound to 127.0.0.6) to its pod's app. Never
    // redirected; remembered so sockops accelerates the hop through the sockhash.
    if src == passthrough {
        if is_pod_address(pod, dst) {
            let orig = OrigDst {
                ip: *dst,
                port: port as u32,
                pod_id: pod.config.pod_id,
                kind: KIND_PASSTHROUGH,
                flags: orig_flags(pod),
            };
            if remember(ctx, &orig) {
                count(Counter::ConnectPassthrough);
            }
        }
        return Verdict::Pass;
    }

    // sock_addr programs run in process context, so the caller's credentials are meaningful.
    let uid_gid = bpf_get_current_uid_gid();
    let (uid, gid) = (uid_gid as u32, (uid_gid >> 32) as u32);
    // Never root: exempting UID 0 would let every root process of the pod bypass the proxy (a
    // root proxy is exempted by its GID); the agent refuses 0, this holds whatever the map says.
    let proxy_uid = pod.config.proxy_uid != 0 && uid == pod.config.proxy_uid;
    let proxy_gid = pod.config.proxy_gid != 0 && gid == pod.config.proxy_gid;
    if proxy_uid || proxy_gid {
        // Rules 2/5: the proxy calling its own pod goes through its inbound handler.
        if pod.config.flags & POD_INBOUND != 0 && is_pod_address(pod, dst) {
            return Verdict::ToProxy {
                port: cfg.inbound_port as u16,
                orig: OrigDst {
                    ip: *dst,
                    port: port as u32,
                    pod_id: pod.config.pod_id,
                    kind: KIND_SELF_INBOUND,
                    flags: orig_flags(pod),
                },
                counter: Counter::ConnectSelfInbound,
            };
        }
        // Rules 4/7: the proxy's own upstream connections.
        count(Counter::ConnectSkippedProxy);
        return Verdict::Pass;
    }

    // DNS capture (TCP 53): before the loopback rule, as istio-iptables orders it, so a
    // resolver on localhost is captured too.
    if let Some(verdict) = crate::dns::tcp_verdict(pod, cfg, dst, port) {
        return verdict;
    }
    if pod.config.flags & POD_OUTBOUND == 0 {
        count(Counter::ConnectSkippedOutboundOff);
        return Verdict::Pass;
    }
    // Rule 8 (and rule 3 for other loopback addresses).
    if is_loopback(dst) {
        count(Counter::ConnectSkippedLoopback);
        return Verdict::Pass;
    }
    // Rule 3: the app calling its own pod address stays inside the pod.
    if is_pod_address(pod, dst) {
        count(Counter::ConnectSkippedPodLocal);
        return Verdict::Pass;
    }
    match policy::outbound(&pod.config, dst, port) {
        Outbound::Capture => {}
        Outbound::ExcludedPort => {
            count(Counter::ConnectSkippedPort);
            return Verdict::Pass;
        }
        Outbound::ExcludedCidr => {
            count(Counter::ConnectSkippedCidr);
            return Verdict::Pass;
        }
        Outbound::NotIncluded => {
            count(Counter::ConnectSkippedNotIncluded);
            return Verdict::Pass;
        }
    }

    Verdict::ToProxy {
        port: cfg.outbound_port as u16,
        orig: OrigDst {
            ip: *dst,
            port: port as u32,
            pod_id: pod.config.pod_id,
            kind: KIND_OUTBOUND,
            flags: orig_flags(pod),
        },
        counter: Counter::ConnectRedirected,
    }
}

/// Node settings, or None before the agent wrote them (then nothing is intercepted).
#[inline(always)]
pub(crate) fn settings() -> Option<GlobalConfig> {
    config().copied()
}
