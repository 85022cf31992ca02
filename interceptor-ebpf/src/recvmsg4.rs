//! `cgroup/recvmsg4` at the cgroup v2 root: a reply from the proxy's DNS port to a socket whose
//! query was captured shows the resolver the app asked as its source.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use interceptor_common::addr::{is_v4_mapped, v4_mapped};

use crate::{ctx, dns};

#[cgroup_sock_addr(recvmsg4)]
pub fn dns_reply4(ctx: SockAddrContext) -> i32 {
    restore_source(&ctx);
    // recvmsg programs must return 1.
    1
}

#[inline(always)]
fn restore_source(ctx: &SockAddrContext) {
    let src = v4_mapped(ctx::sa_user_ip4(ctx));
    let port = ctx::sa_user_port(ctx);
    let Some(orig) = dns::reply_source(ctx, &src, port) else {
        return;
    };
    // An IPv4 socket only ever asked an IPv4 resolver.
    if is_v4_mapped(&orig.ip) {
        ctx::sa_set_user_ip4(ctx, orig.ip[3]);
        ctx::sa_set_user_port(ctx, orig.port as u16);
    }
}
