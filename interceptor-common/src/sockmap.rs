//! The 4-tuple key of the `SOCKS` sockhash.

use crate::addr::Addr;

/// A socket's 4-tuple, from that socket's point of view.
///
/// Unique on the node with `netns`: both ends of an intercepted connection live in one pod's
/// network namespace, so the cookie tells apart two pods whose loopback tuples are equal (an app
/// that bound `0.0.0.0:P` before connecting reaches the proxy from `127.0.0.1:P`). On kernels
/// whose sockops, sk_msg and getsockopt programs cannot read the cookie (< 5.15) `netns` is 0
/// and connect4/6 keep the tuple unique instead, by binding the pod's address as the source.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// Network byte order words; IPv4-mapped for IPv4.
    pub local_ip: Addr,
    /// Network byte order words; IPv4-mapped for IPv4.
    pub remote_ip: Addr,
    /// Host byte order (as `bpf_sock_ops.local_port`).
    pub local_port: u32,
    /// Host byte order (converted from the network-order `remote_port` of sock_ops/sk_msg).
    pub remote_port: u32,
    /// Network-namespace cookie of the socket, or 0 where the kernel cannot tell (see above).
    pub netns: u64,
}

impl SockKey {
    /// The same connection as its peer socket sees it.
    #[inline(always)]
    pub const fn mirror(&self) -> Self {
        Self {
            local_ip: self.remote_ip,
            remote_ip: self.local_ip,
            local_port: self.remote_port,
            remote_port: self.local_port,
            netns: self.netns,
        }
    }
}
