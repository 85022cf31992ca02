//! `cgroup/getsockopt` at the cgroup v2 root: answers `getsockopt(SOL_IP, SO_ORIGINAL_DST)`
//! (and `SOL_IPV6, IP6T_SO_ORIGINAL_DST`) the way netfilter's conntrack would, so any
//! Istio-style proxy works unmodified.

use aya_ebpf::{macros::cgroup_sockopt, programs::SockoptContext};
use interceptor_common::{addr::is_v4_mapped, counters::Counter, sockmap::SockKey};

use crate::{
    connect::{AF_INET, AF_INET6},
    ctx,
    maps::{self, count, netns_key, pod_of, PAGE_SIZE},
    sockaddr::{SockaddrIn, SockaddrIn6},
};

const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h) and `IP6T_SO_ORIGINAL_DST` share the number.
const SO_ORIGINAL_DST: i32 = 80;

#[cgroup_sockopt(getsockopt)]
pub fn orig_dst(ctx: SockoptContext) -> i32 {
    let level = ctx::so_level(&ctx);
    if ctx::so_optname(&ctx) == SO_ORIGINAL_DST && (level == SOL_IP || level == SOL_IPV6) {
        answer(&ctx, level == SOL_IPV6);
    } else if ctx::so_optlen(&ctx) > PAGE_SIZE.load() as i32 {
        // This program sees at most a page of the value. Before 6.5 the kernel fails the
        // syscall with EFAULT unless the program sets optlen to 0 ("use the kernel's buffer"):
        // without this, e.g. iptables-legacy-save on a large ruleset would break on the host.
        ctx::so_set_optlen(&ctx, 0);
    }
    // Never reject a getsockopt call.
    1
}

#[inline(always)]
fn answer(ctx: &SockoptContext, v6: bool) {
    let Some(sk) = ctx::so_sk(ctx) else {
        return;
    };
    let family = ctx::sock_family(sk);
    if family != AF_INET && family != AF_INET6 {
        return;
    }
    let (local_ip, remote_ip, local_port, remote_port) = ctx::sock_tuple(sk);
    let key = SockKey {
        local_ip,
        remote_ip,
        local_port,
        remote_port,
        netns: netns_key(ctx),
    };
    // A connection connect4/6 redirected: its recorded destination.
    let (ip, port, counter) = if let Some(orig) = maps::tuple_orig(&key) {
        (orig.ip, orig.port, Counter::OrigDstAnswered)
    // A connection to a pod address (steered here by sk_lookup): like conntrack for a
    // connection without NAT, the original destination is the local address itself.
    } else if pod_of(&local_ip) != 0 {
        (local_ip, local_port, Counter::OrigDstLocal)
    } else {
        return;
    };
    let len = if v6 {
        let sa = SockaddrIn6 {
            family: AF_INET6 as u16,
            port: (port as u16).to_be(),
            flowinfo: 0,
            addr: ip,
            scope_id: 0,
        };
        if !ctx::so_write(ctx, sa) {
            return;
        }
        core::mem::size_of::<SockaddrIn6>()
    } else {
        // An IPv4 socket asked for IPv4: an IPv6 destination has no answer here.
        if !is_v4_mapped(&ip) {
            return;
        }
        let sa = SockaddrIn {
            family: AF_INET as u16,
            port: (port as u16).to_be(),
            addr: ip[3],
            zero: [0; 8],
        };
        if !ctx::so_write(ctx, sa) {
            return;
        }
        core::mem::size_of::<SockaddrIn>()
    };
    finish(ctx, len);
    count(counter);
}

/// Tells the kernel the answer's length and that the call succeeded.
#[inline(always)]
fn finish(ctx: &SockoptContext, len: usize) {
    ctx::so_set_optlen(ctx, len as i32);
    ctx::so_set_retval(ctx, 0);
}
