//! `cgroup/recvmsg6`: the same for IPv6 and dual-stack sockets.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::{ctx, dns};

#[cgroup_sock_addr(recvmsg6)]
pub fn dns_reply6(ctx: SockAddrContext) -> i32 {
    restore_source(&ctx);
    // recvmsg programs must return 1.
    1
}

#[inline(always)]
fn restore_source(ctx: &SockAddrContext) {
    let src = ctx::sa_user_ip6(ctx);
    let port = ctx::sa_user_port(ctx);
    if let Some(orig) = dns::reply_source(ctx, &src, port) {
        ctx::sa_set_user_ip6(ctx, &orig.ip);
        ctx::sa_set_user_port(ctx, orig.port as u16);
    }
}
