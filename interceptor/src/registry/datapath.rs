//! A pod's spec as the datapath's rows and back: the per-pod config flags, the port rules, the
//! ranges and addresses ([`bpf::maps::PodRows`]), the read-back that `pod list` shows (what the
//! datapath really does), and each pod's share of the node-wide maps.

use std::net::IpAddr;

use interceptor_common::{
    addr,
    names::size,
    pod::{
        DIR_INBOUND, DIR_OUTBOUND, DNS_SERVERS, POD_DNS_CAPTURE, POD_DNS_CAPTURE_ALL,
        POD_FAIL_OPEN, POD_INBOUND, POD_INBOUND_ALL_PORTS, POD_NO_SOCKMAP, POD_OUTBOUND,
        POD_OUTBOUND_ALL_CIDRS, PORT_EXCLUDE, PORT_INCLUDE, PodConfig,
    },
};

use super::{
    Error,
    spec::{Cidr, DnsCapture, PodSpec, Selection},
};
use crate::bpf::maps::{PodRows, PortRule, Range};

/// The pod's `POD_CONFIG` value: the switches and its first address of each family.
pub(super) fn pod_config(id: u32, spec: &PodSpec, addresses: &[IpAddr]) -> PodConfig {
    let mut flags = 0;
    for (on, flag) in [
        (spec.outbound, POD_OUTBOUND),
        (spec.inbound(), POD_INBOUND),
        (
            spec.include_inbound_ports == Selection::All,
            POD_INBOUND_ALL_PORTS,
        ),
        (
            spec.include_outbound_cidrs == Selection::All,
            POD_OUTBOUND_ALL_CIDRS,
        ),
        (!spec.sockmap, POD_NO_SOCKMAP),
        (spec.fail_open, POD_FAIL_OPEN),
        (spec.dns.enabled, POD_DNS_CAPTURE),
        // No known nameserver: every port-53 destination, as the iptables rules do.
        (
            spec.dns.enabled && (spec.dns.capture_all || spec.dns.nameservers.is_empty()),
            POD_DNS_CAPTURE_ALL,
        ),
    ] {
        if on {
            flags |= flag;
        }
    }
    let ip4 = addresses.iter().find_map(|a| match a {
        IpAddr::V4(v4) => Some(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(_) => None,
    });
    let ip6 = addresses
        .iter()
        .find(|a| a.is_ipv6())
        .map(|a| addr::from_ip(*a));
    PodConfig {
        pod_id: id,
        flags,
        proxy_uid: spec.proxy_uid,
        proxy_gid: spec.proxy_gid,
        ip4: ip4.unwrap_or(0),
        ip6: ip6.unwrap_or([0; 4]),
        dns_servers: dns_servers(&spec.dns),
    }
}

/// The first `DNS_SERVERS` nameservers (glibc never asks more: `MAXNS`), 16-byte form.
fn dns_servers(dns: &DnsCapture) -> [addr::Addr; DNS_SERVERS] {
    let mut out = [[0; 4]; DNS_SERVERS];
    if dns.enabled && !dns.capture_all {
        for (slot, ip) in out.iter_mut().zip(&dns.nameservers) {
            *slot = addr::from_ip(*ip);
        }
    }
    out
}

/// The pod's rows: inbound exclusions (the user's, the always-excluded ports, the proxy's own),
/// inbound inclusions, outbound port rules (an exclusion wins), ranges and addresses.
pub(super) fn pod_rows(spec: &PodSpec, addresses: &[IpAddr], proxy_ports: &[u16]) -> PodRows {
    let rule = |port, direction, rule| PortRule {
        port,
        direction,
        rule,
    };
    let inbound_excluded = spec.effective_inbound_exclusions(proxy_ports);
    let mut ports: Vec<PortRule> = inbound_excluded
        .iter()
        .map(|&p| rule(p, DIR_INBOUND, PORT_EXCLUDE))
        .collect();
    if let Selection::List(list) = &spec.include_inbound_ports {
        ports.extend(
            list.iter()
                .filter(|p| !inbound_excluded.contains(p))
                .map(|&p| rule(p, DIR_INBOUND, PORT_INCLUDE)),
        );
    }
    ports.extend(
        spec.exclude_outbound_ports
            .iter()
            .map(|&p| rule(p, DIR_OUTBOUND, PORT_EXCLUDE)),
    );
    ports.extend(
        spec.include_outbound_ports
            .iter()
            .filter(|p| !spec.exclude_outbound_ports.contains(p))
            .map(|&p| rule(p, DIR_OUTBOUND, PORT_INCLUDE)),
    );
    let range = |c: &Cidr| -> Range { (c.addr, c.prefix) };
    PodRows {
        ports,
        excluded: spec.exclude_outbound_cidrs.iter().map(range).collect(),
        included: match &spec.include_outbound_cidrs {
            Selection::All => Vec::new(),
            Selection::List(list) => list.iter().map(range).collect(),
        },
        addresses: addresses.to_vec(),
    }
}

/// The spec as the maps hold it (what the datapath really does).
pub(super) fn read_spec(config: Option<&PodConfig>, rows: &PodRows) -> PodSpec {
    let flags = config.map_or(0, |c| c.flags);
    let mut spec = PodSpec {
        include_inbound_ports: if flags & POD_INBOUND_ALL_PORTS != 0 {
            Selection::All
        } else {
            Selection::List(Vec::new())
        },
        include_outbound_cidrs: if flags & POD_OUTBOUND_ALL_CIDRS != 0 {
            Selection::All
        } else {
            Selection::List(rows.included.iter().map(cidr).collect())
        },
        exclude_outbound_cidrs: rows.excluded.iter().map(cidr).collect(),
        outbound: flags & POD_OUTBOUND != 0,
        sockmap: flags & POD_NO_SOCKMAP == 0,
        fail_open: flags & POD_FAIL_OPEN != 0,
        proxy_uid: config.map_or(0, |c| c.proxy_uid),
        proxy_gid: config.map_or(0, |c| c.proxy_gid),
        dns: DnsCapture {
            enabled: flags & POD_DNS_CAPTURE != 0,
            capture_all: flags & POD_DNS_CAPTURE_ALL != 0,
            nameservers: config.map_or_else(Vec::new, |c| {
                c.dns_servers
                    .iter()
                    .filter(|a| **a != [0; 4])
                    .map(|a| addr::to_ip(*a))
                    .collect()
            }),
        },
        ..PodSpec::default()
    };
    for r in &rows.ports {
        let list = match (r.direction, r.rule) {
            (DIR_INBOUND, PORT_EXCLUDE) => &mut spec.exclude_inbound_ports,
            (DIR_INBOUND, PORT_INCLUDE) => match &mut spec.include_inbound_ports {
                Selection::List(l) => l,
                Selection::All => continue,
            },
            (DIR_OUTBOUND, PORT_EXCLUDE) => &mut spec.exclude_outbound_ports,
            (DIR_OUTBOUND, PORT_INCLUDE) => &mut spec.include_outbound_ports,
            _ => continue,
        };
        list.push(r.port);
    }
    for list in [
        &mut spec.exclude_inbound_ports,
        &mut spec.exclude_outbound_ports,
        &mut spec.include_outbound_ports,
    ] {
        list.sort_unstable();
    }
    if let Selection::List(l) = &mut spec.include_inbound_ports {
        l.sort_unstable();
    }
    spec
}

fn cidr(&(addr, prefix): &Range) -> Cidr {
    Cidr { addr, prefix }
}

/// A pod's share of the node-wide maps (see `names::size::PER_POD_*`).
pub(super) fn check_quota(spec: &PodSpec) -> Result<(), Error> {
    let cidrs = |map, what, count: usize| {
        if count > size::PER_POD_CIDRS as usize {
            return Err(Error::Quota {
                map,
                what,
                count,
                limit: size::PER_POD_CIDRS,
            });
        }
        Ok(())
    };
    cidrs(
        "CIDR_EXCLUDE",
        "excluded outbound ranges",
        spec.exclude_outbound_cidrs.len(),
    )?;
    if let Selection::List(list) = &spec.include_outbound_cidrs {
        cidrs("CIDR_INCLUDE", "included outbound ranges", list.len())?;
    }
    let mut ports = spec.exclude_inbound_ports.len()
        + spec.include_outbound_ports.len()
        + spec.exclude_outbound_ports.len();
    if let Selection::List(list) = &spec.include_inbound_ports {
        ports += list.len();
    }
    // Room for the ports every pod excludes (proxy ports, 15090, 15021, 15020, 22).
    let limit = size::PER_POD_PORTS - 8;
    if ports > limit as usize {
        return Err(Error::Quota {
            map: "POD_PORTS",
            what: "port rules",
            count: ports,
            limit,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_flags_follow_spec() {
        let addrs: Vec<IpAddr> = vec![
            "198.18.0.7".parse().unwrap(),
            "fd00:198:18::7".parse().unwrap(),
        ];
        let c = pod_config(3, &PodSpec::default(), &addrs);
        assert_eq!(c.pod_id, 3);
        assert_eq!(
            c.flags,
            POD_OUTBOUND | POD_INBOUND | POD_INBOUND_ALL_PORTS | POD_OUTBOUND_ALL_CIDRS
        );
        assert_eq!(c.ip4, u32::from_ne_bytes([198, 18, 0, 7]));
        assert_eq!(addr::to_ip(c.ip6), addrs[1]);
        let spec = PodSpec {
            include_inbound_ports: Selection::List(vec![]),
            include_outbound_cidrs: Selection::List(vec!["10.0.0.0/8".parse().unwrap()]),
            ..PodSpec::default()
        };
        assert_eq!(pod_config(1, &spec, &[]).flags, POD_OUTBOUND);
    }

    #[test]
    fn dns_capture_flags_and_nameservers() {
        let mut spec = PodSpec::default();
        spec.dns.enabled = true;
        // No nameserver known: every port-53 destination, as the iptables rules.
        let c = pod_config(1, &spec, &[]);
        assert_ne!(c.flags & POD_DNS_CAPTURE_ALL, 0);
        spec.dns.nameservers = ["10.0.0.1", "10.0.0.2", "fd00::3", "10.0.0.4"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let c = pod_config(1, &spec, &[]);
        assert_eq!(c.flags & POD_DNS_CAPTURE_ALL, 0);
        assert_ne!(c.flags & POD_DNS_CAPTURE, 0);
        // glibc asks three at most: the fourth is not stored.
        let stored: Vec<IpAddr> = c.dns_servers.iter().map(|a| addr::to_ip(*a)).collect();
        assert_eq!(stored, spec.dns.nameservers[..3]);
    }

    #[test]
    fn spec_survives_rows_and_back() {
        let spec = PodSpec {
            include_inbound_ports: Selection::List(vec![8080, 9090]),
            exclude_inbound_ports: vec![8081],
            include_outbound_ports: vec![443],
            exclude_outbound_ports: vec![5432],
            include_outbound_cidrs: Selection::List(vec![
                "10.0.0.0/8".parse().unwrap(),
                "fd00::/8".parse().unwrap(),
            ]),
            exclude_outbound_cidrs: vec!["::ffff:10.0.0.0/104".parse().unwrap()],
            sockmap: false,
            fail_open: true,
            dns: DnsCapture {
                enabled: true,
                capture_all: false,
                nameservers: vec!["198.18.0.53".parse().unwrap(), "fd00::53".parse().unwrap()],
            },
            ..PodSpec::default()
        };
        let proxy = [15001, 15006];
        let rows = pod_rows(&spec, &[], &proxy);
        let back = read_spec(Some(&pod_config(1, &spec, &[])), &rows);
        // Read back, the inbound exclusions include the ones every pod gets.
        assert_eq!(
            back.exclude_inbound_ports,
            spec.effective_inbound_exclusions(&proxy)
        );
        let back = PodSpec {
            exclude_inbound_ports: spec.exclude_inbound_ports.clone(),
            ..back
        };
        assert_eq!(back, spec);
    }

    mod hostile {
        use proptest::prelude::*;

        use super::*;

        fn ports() -> impl Strategy<Value = Vec<u16>> {
            prop::collection::btree_set(1u16.., 0..6).prop_map(|s| s.into_iter().collect())
        }

        fn cidrs() -> impl Strategy<Value = Vec<Cidr>> {
            let v4 = (any::<u32>(), 0u8..=32)
                .prop_map(|(a, p)| format!("{}/{p}", std::net::Ipv4Addr::from(a)));
            let v6 = (any::<u128>(), 0u8..=128)
                .prop_map(|(a, p)| format!("{}/{p}", std::net::Ipv6Addr::from(a)));
            prop::collection::vec(prop_oneof![v4, v6], 0..5).prop_map(|v| {
                crate::registry::spec::parse_cidrs("ranges", &v.join(","))
                    .expect("generated ranges parse")
            })
        }

        fn specs() -> impl Strategy<Value = PodSpec> {
            (
                prop_oneof![Just(None), ports().prop_map(Some)],
                ports(),
                ports(),
                ports(),
                prop_oneof![Just(None), cidrs().prop_map(Some)],
                cidrs(),
                any::<(bool, bool, bool)>(),
            )
                .prop_map(
                    |(ii, ei, io, eo, ic, ec, (outbound, sockmap, fail_open))| PodSpec {
                        include_inbound_ports: ii.map_or(Selection::All, Selection::List),
                        exclude_inbound_ports: ei,
                        include_outbound_ports: io,
                        exclude_outbound_ports: eo,
                        include_outbound_cidrs: ic.map_or(Selection::All, Selection::List),
                        exclude_outbound_cidrs: ec,
                        outbound,
                        sockmap,
                        fail_open,
                        ..PodSpec::default()
                    },
                )
        }

        proptest! {
            /// What `pod list` reads back from the rows is what was asked, for any spec the
            /// parsers accept (the bug this found: ranges with host bits collapsed in the trie).
            #[test]
            fn any_spec_survives_rows_and_back(spec in specs()) {
                let proxy = [15001, 15006];
                let rows = pod_rows(&spec, &[], &proxy);
                let back = read_spec(Some(&pod_config(1, &spec, &[])), &rows);
                let mut want = spec.clone();
                want.exclude_inbound_ports = spec.effective_inbound_exclusions(&proxy);
                // An included port that is also excluded (the proxy's own ports always are)
                // is never captured: the rows, and so `pod list`, leave it out.
                if let Selection::List(l) = &mut want.include_inbound_ports {
                    l.retain(|p| !want.exclude_inbound_ports.contains(p));
                }
                // A port both included and excluded outbound is excluded (istio-iptables'
                // RETURN for excluded ports comes first): one rule per port in the rows.
                want.include_outbound_ports.retain(|p| !spec.exclude_outbound_ports.contains(p));
                if !spec.outbound {
                    // Outbound off: no outbound rows are written, so none read back.
                    want.include_outbound_ports = back.include_outbound_ports.clone();
                    want.exclude_outbound_ports = back.exclude_outbound_ports.clone();
                    want.include_outbound_cidrs = back.include_outbound_cidrs.clone();
                    want.exclude_outbound_cidrs = back.exclude_outbound_cidrs.clone();
                }
                if !spec.inbound() {
                    want.exclude_inbound_ports = back.exclude_inbound_ports.clone();
                }
                let mut back = back;
                sort(&mut back);
                sort(&mut want);
                prop_assert_eq!(back, want);
            }
        }

        fn sort(spec: &mut PodSpec) {
            let key = |c: &Cidr| (c.addr, c.prefix);
            spec.exclude_outbound_cidrs.sort_by_key(key);
            if let Selection::List(l) = &mut spec.include_outbound_cidrs {
                l.sort_by_key(key);
            }
        }
    }
}
