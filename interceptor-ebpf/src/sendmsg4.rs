//! `cgroup/sendmsg4` at the cgroup v2 root: an enabled pod's UDP DNS queries (sendto on an
//! unconnected socket) go to the proxy's DNS port on 127.0.0.1.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use interceptor_common::{
    addr::{v4_mapped, LOCALHOST_V4},
    counters::Counter,
};

use crate::{ctx, dns};

#[cgroup_sock_addr(sendmsg4)]
pub fn dns_query4(ctx: SockAddrContext) -> i32 {
    redirect_query(&ctx);
    // Never refuse a datagram.
    1
}

#[inline(always)]
fn redirect_query(ctx: &SockAddrContext) {
    let dst = v4_mapped(ctx::sa_user_ip4(ctx));
    let port = ctx::sa_user_port(ctx);
    if let Some(proxy_port) = dns::udp_to_proxy(ctx, &dst, port, Counter::DnsQueryRedirected) {
        ctx::sa_set_user_ip4(ctx, LOCALHOST_V4);
        ctx::sa_set_user_port(ctx, proxy_port);
    }
}
