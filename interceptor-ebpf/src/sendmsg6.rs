//! `cgroup/sendmsg6`: the same for IPv6 sockets, including dual-stack sockets sending to an
//! IPv4-mapped resolver (those go to `::ffff:127.0.0.1`).

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use interceptor_common::counters::Counter;

use crate::{ctx, dns};

#[cgroup_sock_addr(sendmsg6)]
pub fn dns_query6(ctx: SockAddrContext) -> i32 {
    redirect_query(&ctx);
    // Never refuse a datagram.
    1
}

#[inline(always)]
fn redirect_query(ctx: &SockAddrContext) {
    let dst = ctx::sa_user_ip6(ctx);
    let port = ctx::sa_user_port(ctx);
    if let Some(proxy_port) = dns::udp_to_proxy(ctx, &dst, port, Counter::DnsQueryRedirected) {
        ctx::sa_set_user_ip6(ctx, &dns::loopback_like(&dst));
        ctx::sa_set_user_port(ctx, proxy_port);
    }
}
