//! The 4-tuple key of the `SOCKS` sockhash.

use crate::addr::Addr;

/// A socket's 4-tuple, from that socket's point of view.
///
/// Unique on the node: the app side of a redirected connection is bound to its pod's own
/// address (connect4 binds it), and pod addresses are unique on a node; the passthrough side
/// goes to a pod address. That is why no network-namespace id is needed in the key.
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
        }
    }
}
