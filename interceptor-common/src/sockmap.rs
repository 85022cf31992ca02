//! The 4-tuple key of the `SOCKS` sockhash.

use crate::addr::{is_loopback, Addr};

/// A socket's 4-tuple, from that socket's point of view.
///
/// Unique on the node with `netns`: both ends of an intercepted connection live in one pod's
/// network namespace, so the cookie tells apart two pods whose loopback tuples are equal (an app
/// that bound `0.0.0.0:P` before connecting reaches the proxy from `127.0.0.1:P`). On kernels
/// whose sockops, sk_msg and getsockopt programs cannot read the cookie (< 5.15) `netns` is 0
/// and connect4/6 keep the tuple unique instead, by binding the pod's address as the source.
///
/// The one hop that crosses namespaces — a sidecar in one enabled pod connected to another
/// enabled pod on this node (see [`is_pod_to_pod`]) — is keyed with `netns` =
/// [`POD_TO_POD_NETNS`] at both ends, so each end finds the other by mirroring the tuple. That
/// key is unique on the node because sockops only inserts a socket whose namespace is the one
/// `POD_IPS` says owns its local address, and a 4-tuple is unique within one namespace.
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

/// `SockKey::netns` of a same-node pod→pod hop (no namespace cookie is 0). Only used where every
/// program reads namespace cookies (>= 5.15): there no in-pod key has `netns` 0.
pub const POD_TO_POD_NETNS: u64 = 0;

/// Whether a connection between these two addresses can be a hop between two pods: neither end
/// is loopback or the IPv6 passthrough source. Every in-pod hop has such an end (the app↔proxy
/// hop goes to loopback, the passthrough hop comes from 127.0.0.6 / `passthrough6`), so sockops
/// and sk_msg pick a socket's key family from its tuple alone, without a map lookup per message.
#[inline(always)]
pub fn is_pod_to_pod(local: &Addr, remote: &Addr, passthrough6: &Addr) -> bool {
    !is_loopback(local)
        && !is_loopback(remote)
        && !words_eq(local, passthrough6)
        && !words_eq(remote, passthrough6)
}

/// Word-wise comparison (the verifier sees four compares, not a loop or a memcmp).
#[inline(always)]
const fn words_eq(a: &Addr, b: &Addr) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{addr::from_ip, config::GlobalConfig};

    fn a(s: &str) -> Addr {
        from_ip(s.parse().unwrap())
    }

    #[test]
    fn only_hops_without_a_loopback_or_passthrough_end_are_pod_to_pod() {
        let pt6 = GlobalConfig::istio_defaults().passthrough_ip6;
        assert!(is_pod_to_pod(&a("198.18.0.2"), &a("198.18.0.3"), &pt6));
        assert!(is_pod_to_pod(
            &a("fd00:198:18::2"),
            &a("fd00:198:18::3"),
            &pt6
        ));
        // app → proxy, passthrough, IPv6 passthrough: in-pod hops keep their namespace.
        assert!(!is_pod_to_pod(&a("198.18.0.2"), &a("127.0.0.1"), &pt6));
        assert!(!is_pod_to_pod(&a("127.0.0.6"), &a("198.18.0.2"), &pt6));
        assert!(!is_pod_to_pod(&a("::6"), &a("fd00:198:18::2"), &pt6));
        assert!(!is_pod_to_pod(&a("fd00:198:18::2"), &a("::1"), &pt6));
    }
}
