//! What the programs know about an enabled pod.

use crate::addr::Addr;

/// Capture the pod's outbound connections.
pub const POD_OUTBOUND: u32 = 1 << 0;
/// Capture the pod's inbound connections.
pub const POD_INBOUND: u32 = 1 << 1;
/// `includeOutboundIPRanges: "*"`: every destination not excluded is captured.
pub const POD_OUTBOUND_ALL_CIDRS: u32 = 1 << 2;
/// `includeInboundPorts: "*"`: every inbound port not excluded is captured.
pub const POD_INBOUND_ALL_PORTS: u32 = 1 << 3;
/// Keep the pod's app↔proxy hops on loopback TCP (no sockhash, no sk_msg): for apps that
/// block in read() while another thread writes to or half-closes the same socket (see README,
/// "Known kernel behaviour").
pub const POD_NO_SOCKMAP: u32 = 1 << 4;
/// Fail open: a connect the datapath cannot send through the proxy goes direct instead of
/// being refused. Off by default (fail closed), as Istio never lets such a connection through.
pub const POD_FAIL_OPEN: u32 = 1 << 5;
/// Capture the pod's DNS (UDP and TCP port 53 to `dns_servers`) to the proxy's DNS port, as
/// Istio's `ISTIO_META_DNS_CAPTURE`.
pub const POD_DNS_CAPTURE: u32 = 1 << 6;
/// With `POD_DNS_CAPTURE`: every port-53 destination, not only `dns_servers` (Istio's
/// `CAPTURE_ALL_DNS`).
pub const POD_DNS_CAPTURE_ALL: u32 = 1 << 7;

/// Nameservers a pod's `PodConfig` holds: glibc's resolver uses at most three (`MAXNS`).
pub const DNS_SERVERS: usize = 3;

/// Value of `POD_CONFIG`, keyed by the pod's network-namespace cookie (`u64`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodConfig {
    /// Agent-assigned id, unique on the node; keys the per-pod maps.
    pub pod_id: u32,
    /// `POD_*` flags.
    pub flags: u32,
    /// Connections of this UID are the proxy's own and never redirected (Istio: 1337).
    pub proxy_uid: u32,
    /// Likewise for this GID.
    pub proxy_gid: u32,
    /// The pod's IPv4 address, network byte order; 0 when it has none. Redirected IPv4
    /// connections are bound to it, which keeps sockhash 4-tuples unique across pods.
    pub ip4: u32,
    /// The pod's IPv6 address, network byte order words; zero when it has none.
    pub ip6: Addr,
    /// The pod's resolv.conf nameservers whose port-53 traffic is captured (without
    /// `POD_DNS_CAPTURE_ALL`), network byte order words, IPv4-mapped for IPv4; unused slots
    /// are all zero.
    pub dns_servers: [Addr; DNS_SERVERS],
}

/// Direction of a `PortKey`.
pub const DIR_OUTBOUND: u16 = 1;
pub const DIR_INBOUND: u16 = 2;

/// `POD_PORTS` value: capture this port (include list).
pub const PORT_INCLUDE: u32 = 1;
/// `POD_PORTS` value: never capture this port.
pub const PORT_EXCLUDE: u32 = 2;

/// Key of `POD_PORTS`: one port of one pod in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub pod_id: u32,
    /// Host byte order.
    pub port: u16,
    /// `DIR_*`.
    pub direction: u16,
}

/// Data part of the `CIDR_EXCLUDE` / `CIDR_INCLUDE` LPM-trie keys. The trie matches bytes from
/// the first, so `pod_id` and `family` come first and are always matched whole (prefix =
/// 64 + address bits).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CidrKey {
    /// Big-endian, so the LPM byte order and the numeric order agree.
    pub pod_id_be: u32,
    /// `CIDR_V4` or `CIDR_V6`: the family of the range, and of the destination looked up. It
    /// keeps an IPv6 range that covers `::ffff:0:0/96` (e.g. `::/0`) from applying to IPv4
    /// destinations, which are stored IPv4-mapped (istio-iptables gives IPv6 ranges to
    /// ip6tables only).
    pub family: u32,
    /// Network byte order words; IPv4-mapped for IPv4 (prefix then counts 96 + v4 bits).
    pub ip: Addr,
}

/// `CidrKey::family` of IPv4 ranges and destinations (IPv4-mapped included).
pub const CIDR_V4: u32 = 4;
/// `CidrKey::family` of IPv6 ranges and destinations.
pub const CIDR_V6: u32 = 6;

impl CidrKey {
    /// Prefix length of a key that matches `pod_id` and `family` exactly and the first
    /// `addr_bits` bits of the 128-bit address.
    pub const fn prefix_len(addr_bits: u32) -> u32 {
        64 + addr_bits
    }

    /// The key of pod `pod_id`'s range `ip/prefix` (prefix in the address's own family), with
    /// the LPM prefix length that matches it.
    pub fn range(pod_id: u32, ip: core::net::IpAddr, prefix: u8) -> (Self, u32) {
        let (family, bits) = match ip {
            core::net::IpAddr::V4(_) => (CIDR_V4, 96 + u32::from(prefix)),
            core::net::IpAddr::V6(_) => (CIDR_V6, u32::from(prefix)),
        };
        let key = Self {
            pod_id_be: pod_id.to_be(),
            family,
            ip: crate::addr::from_ip(ip),
        };
        (key, Self::prefix_len(bits))
    }

    /// The pod id.
    pub const fn pod_id(&self) -> u32 {
        u32::from_be(self.pod_id_be)
    }

    /// The inverse of [`CidrKey::range`]: the range `(ip, prefix)` of a key and its LPM prefix
    /// length. An IPv6 range inside `::ffff:0:0/96` stays IPv6.
    pub fn to_range(&self, prefix_len: u32) -> (core::net::IpAddr, u8) {
        let bits = prefix_len.saturating_sub(64);
        match crate::addr::to_ip(self.ip) {
            core::net::IpAddr::V4(v4) if self.family == CIDR_V4 => {
                (core::net::IpAddr::V4(v4), bits.saturating_sub(96) as u8)
            }
            core::net::IpAddr::V4(v4) => (core::net::IpAddr::V6(v4.to_ipv6_mapped()), bits as u8),
            ip => (ip, bits as u8),
        }
    }
}

/// Bytes of `PodInfo::name`.
pub const POD_NAME_LEN: usize = 128;

/// How the pod was named when enabled.
pub const SOURCE_NETNS: u32 = 1;
pub const SOURCE_PID: u32 = 2;
pub const SOURCE_KUBERNETES: u32 = 3;

/// Intercepted by the eBPF datapath (the pod has `POD_CONFIG` and `POD_IPS` entries).
pub const MODE_EBPF: u32 = 0;
/// Intercepted by istio-iptables' rules in its namespace: no datapath entry but this one.
pub const MODE_IPTABLES: u32 = 1;

pub const BACKEND_NFT: u32 = 1;
pub const BACKEND_LEGACY: u32 = 2;

/// Value of `POD_INFO` (keyed by pod id): what user space needs to list and find the pod again.
/// The programs never read it; it is pinned with the rest so an agent restart loses nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub netns_cookie: u64,
    /// Inode and device of the pod's network namespace (`stat` of its nsfs file).
    pub netns_ino: u64,
    pub netns_dev: u64,
    /// `SOURCE_*`.
    pub source: u32,
    /// Process the pod was enabled by (`--pid`), else 0.
    pub pid: u32,
    /// `MODE_*`: how the pod is intercepted.
    pub mode: u32,
    /// `BACKEND_*` of an iptables-mode pod, else 0.
    pub backend: u32,
    /// NUL-padded UTF-8: the netns name, `pid:N`, or `namespace/name` for Kubernetes pods.
    pub name: [u8; POD_NAME_LEN],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_range_round_trip() {
        for (ip, prefix) in [
            ("10.1.0.0", 16),
            ("fd00::", 8),
            ("::", 0),
            ("::ffff:10.0.0.0", 104),
            ("0.0.0.0", 0),
        ] {
            let ip: core::net::IpAddr = ip.parse().unwrap();
            let (key, len) = CidrKey::range(7, ip, prefix);
            assert_eq!(key.pod_id(), 7);
            assert_eq!(key.to_range(len), (ip, prefix), "{ip}/{prefix}");
        }
    }
}
