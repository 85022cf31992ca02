//! DNS capture (Istio's `ISTIO_META_DNS_CAPTURE`), shared by sendmsg4/6, recvmsg4/6 and
//! connect4/6: an enabled pod's port-53 traffic to its nameservers (or to anyone, with
//! capture-all) goes to the proxy's DNS port on loopback; the proxy's own queries never do.
//! UDP replies get the resolver's address back as their source, since stub resolvers (glibc,
//! dig) drop answers from anyone but the server they asked.

use aya_ebpf::{helpers::bpf_get_current_uid_gid, programs::SockAddrContext};
use interceptor_common::{
    addr::{is_unspecified, is_v4_mapped, Addr, LOCALHOST_V4, LOCALHOST_V6},
    config::GlobalConfig,
    counters::Counter,
    dns::{DnsOrig, DNS_PORT},
    origdst::{OrigDst, KIND_OUTBOUND, ORIG_DNS, ORIG_NO_SOCKMAP},
    pod::{POD_DNS_CAPTURE, POD_DNS_CAPTURE_ALL, POD_NO_SOCKMAP},
};

use crate::{
    connect::{current_pod, settings, Outcome, Pod, Verdict},
    ctx,
    maps::{count, dns_orig, DNS_ORIG},
};

/// Whether the pod's port-53 traffic to `dst` is captured, the proxy aside: the order of
/// istio-iptables' DNS rules once the proxy's own traffic has returned.
#[inline(always)]
fn to_captured_resolver(pod: &Pod, dst: &Addr) -> bool {
    if pod.config.flags & POD_DNS_CAPTURE_ALL != 0 {
        return true;
    }
    let ns = &pod.config.dns_servers;
    // An empty slot is all zeroes: never a match, even for a query to the unspecified address.
    let hit = (!is_unspecified(&ns[0]) && ns[0] == *dst)
        || (!is_unspecified(&ns[1]) && ns[1] == *dst)
        || (!is_unspecified(&ns[2]) && ns[2] == *dst);
    if !hit {
        count(Counter::DnsSkippedNotNameserver);
    }
    hit
}

/// The proxy's own identity (UID/GID; never 0, as in connect).
#[inline(always)]
fn is_proxy(pod: &Pod) -> bool {
    // sock_addr programs run in process context: the caller's credentials are meaningful.
    let uid_gid = bpf_get_current_uid_gid();
    let (uid, gid) = (uid_gid as u32, (uid_gid >> 32) as u32);
    (pod.config.proxy_uid != 0 && uid == pod.config.proxy_uid)
        || (pod.config.proxy_gid != 0 && gid == pod.config.proxy_gid)
}

/// A TCP connect of an app (not the proxy: connect's `decide` has returned for it) to port 53
/// of a captured resolver: to the proxy's DNS port, the resolver recorded as the original
/// destination (the proxy's TCP DNS listener reads it with `SO_ORIGINAL_DST`).
#[inline(always)]
pub(crate) fn tcp_verdict(pod: &Pod, cfg: &GlobalConfig, dst: &Addr, port: u16) -> Option<Verdict> {
    if port != DNS_PORT || pod.config.flags & POD_DNS_CAPTURE == 0 {
        return None;
    }
    if !to_captured_resolver(pod, dst) {
        return None;
    }
    Some(Verdict::ToProxy {
        port: cfg.dns_port as u16,
        orig: OrigDst {
            ip: *dst,
            port: u32::from(port),
            pod_id: pod.config.pod_id,
            kind: KIND_OUTBOUND,
            flags: ORIG_DNS
                | if pod.config.flags & POD_NO_SOCKMAP != 0 {
                    ORIG_NO_SOCKMAP
                } else {
                    0
                },
        },
        counter: Counter::DnsTcpRedirected,
    })
}

/// A UDP datagram (sendmsg) or UDP connect of a pod's socket to `dst`:`port`: when captured,
/// records the resolver under the socket's cookie and returns the proxy's DNS port, which the
/// caller writes as the destination (on loopback of the socket's family).
#[inline(always)]
pub(crate) fn udp_to_proxy(
    ctx: &SockAddrContext,
    dst: &Addr,
    port: u16,
    counter: Counter,
) -> Option<u16> {
    // Port first: every other datagram of the node leaves after one comparison.
    if port != DNS_PORT {
        return None;
    }
    let pod = current_pod(ctx)?;
    if pod.config.flags & POD_DNS_CAPTURE == 0 {
        return None;
    }
    let cfg = settings()?;
    if is_proxy(&pod) {
        count(Counter::DnsSkippedProxy);
        return None;
    }
    if !to_captured_resolver(&pod, dst) {
        return None;
    }
    let orig = DnsOrig {
        ip: *dst,
        port: u32::from(port),
        pod_id: pod.config.pod_id,
    };
    // Without the record the reply would come from loopback and be dropped by the app: better
    // let this query reach the resolver itself (counted).
    if DNS_ORIG.insert(&ctx::socket_cookie(ctx), &orig, 0).is_err() {
        count(Counter::DnsMapFull);
        return None;
    }
    count(counter);
    Some(cfg.dns_port as u16)
}

/// A datagram the socket is about to receive from `src`:`port`: if it comes from the proxy's
/// DNS port on loopback and the socket had a query captured, the resolver it asked.
#[inline(always)]
pub(crate) fn reply_source(ctx: &SockAddrContext, src: &Addr, port: u16) -> Option<DnsOrig> {
    let cfg = settings()?;
    if u32::from(port) != cfg.dns_port {
        return None;
    }
    let from_proxy = if is_v4_mapped(src) {
        src[3] == LOCALHOST_V4
    } else {
        *src == LOCALHOST_V6
    };
    if !from_proxy {
        return None;
    }
    let orig = dns_orig(ctx::socket_cookie(ctx))?;
    count(Counter::DnsReplyRewritten);
    Some(orig)
}

/// The proxy's loopback address in the family of `dst`: `::ffff:127.0.0.1` for an IPv4-mapped
/// resolver (a dual-stack socket), else `::1`.
#[inline(always)]
pub(crate) fn loopback_like(dst: &Addr) -> Addr {
    if is_v4_mapped(dst) {
        interceptor_common::addr::v4_mapped(LOCALHOST_V4)
    } else {
        LOCALHOST_V6
    }
}

/// connect4 of a UDP socket (glibc and dig connect theirs): a captured query's socket is
/// connected to the proxy's DNS port instead, so its `send()`s need no sendmsg program.
#[inline(always)]
pub(crate) fn connect_udp4(ctx: &SockAddrContext, dst4: u32, port: u16) -> Outcome {
    let dst = interceptor_common::addr::v4_mapped(dst4);
    let Some(proxy_port) = udp_to_proxy(ctx, &dst, port, Counter::DnsConnectRedirected) else {
        return Outcome::Pass;
    };
    ctx::sa_set_user_ip4(ctx, LOCALHOST_V4);
    ctx::sa_set_user_port(ctx, proxy_port);
    Outcome::Redirect
}

/// connect6 of a UDP socket: as [`connect_udp4`].
#[inline(always)]
pub(crate) fn connect_udp6(ctx: &SockAddrContext) -> Outcome {
    let dst = ctx::sa_user_ip6(ctx);
    let port = ctx::sa_user_port(ctx);
    let Some(proxy_port) = udp_to_proxy(ctx, &dst, port, Counter::DnsConnectRedirected) else {
        return Outcome::Pass;
    };
    ctx::sa_set_user_ip6(ctx, &loopback_like(&dst));
    ctx::sa_set_user_port(ctx, proxy_port);
    Outcome::Redirect
}
