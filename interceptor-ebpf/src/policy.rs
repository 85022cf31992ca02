//! Per-pod capture rules, with Istio's semantics (`istio-iptables` flags in brackets).

use aya_ebpf::maps::lpm_trie::Key;
use interceptor_common::{
    addr::{is_v4_mapped, Addr},
    pod::{
        CidrKey, PodConfig, PortKey, CIDR_V4, CIDR_V6, DIR_INBOUND, DIR_OUTBOUND,
        POD_INBOUND_ALL_PORTS, POD_OUTBOUND_ALL_CIDRS, PORT_EXCLUDE, PORT_INCLUDE,
    },
};

use crate::maps::{self, CIDR_EXCLUDE, CIDR_INCLUDE};

/// Why an outbound connection is or is not captured.
pub(crate) enum Outbound {
    Capture,
    ExcludedPort,
    ExcludedCidr,
    NotIncluded,
}

#[inline(always)]
fn port_rule(pod_id: u32, port: u16, direction: u16) -> u32 {
    let key = PortKey {
        pod_id,
        port,
        direction,
    };
    maps::port_rule(&key)
}

#[inline(always)]
fn cidr_key(pod_id: u32, ip: &Addr) -> Key<CidrKey> {
    // The trie stores IPv4 as IPv4-mapped too: look up all 128 bits of the destination's
    // family, the stored prefix decides.
    Key::new(
        CidrKey::prefix_len(128),
        CidrKey {
            pod_id_be: pod_id.to_be(),
            family: if is_v4_mapped(ip) { CIDR_V4 } else { CIDR_V6 },
            ip: *ip,
        },
    )
}

/// The order of `istio-iptables`' ISTIO_OUTPUT chain: excluded ports (`-o`) first, then
/// excluded ranges (`-x`), then included ports (`-q`, captured whatever the range), then the
/// included ranges (`-i`, `*` = everything).
#[inline(always)]
pub(crate) fn outbound(pod: &PodConfig, dst: &Addr, port: u16) -> Outbound {
    let rule = port_rule(pod.pod_id, port, DIR_OUTBOUND);
    if rule == PORT_EXCLUDE {
        return Outbound::ExcludedPort;
    }
    let key = cidr_key(pod.pod_id, dst);
    if CIDR_EXCLUDE.get(&key).is_some() {
        return Outbound::ExcludedCidr;
    }
    if rule == PORT_INCLUDE || pod.flags & POD_OUTBOUND_ALL_CIDRS != 0 {
        return Outbound::Capture;
    }
    if CIDR_INCLUDE.get(&key).is_some() {
        return Outbound::Capture;
    }
    Outbound::NotIncluded
}

/// ISTIO_INBOUND: `-d` excluded ports are never captured; with `-b *` everything else is,
/// otherwise only the listed ports. The always-excluded ports (15090, 15021, 15020, the proxy's
/// own, and 22 under `*`) are written as exclusions by the agent.
#[inline(always)]
pub(crate) fn inbound_captures(pod: &PodConfig, port: u16) -> bool {
    let rule = port_rule(pod.pod_id, port, DIR_INBOUND);
    if rule == PORT_EXCLUDE {
        return false;
    }
    rule == PORT_INCLUDE || pod.flags & POD_INBOUND_ALL_PORTS != 0
}
