//! A pod's capture settings, written with Istio's syntax (the values of the
//! `traffic.sidecar.istio.io/*` annotations and the `istio-iptables` flags).

use std::{fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Serialize};

/// Ports that are never captured inbound: Prometheus (15090), health (15021), the agent's
/// status port (15020), and the proxy's own capture ports.
pub const ALWAYS_EXCLUDED_INBOUND: &[u16] = &[15090, 15021, 15020];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("{field}: {value:?} is not a port (1-65535); write e.g. \"8080,9090\"")]
    Port { field: &'static str, value: String },
    #[error("{field}: {value:?} is not a CIDR; write e.g. \"10.0.0.0/8,fd00::/8\" or \"*\"")]
    Cidr { field: &'static str, value: String },
    #[error("{field}: \"*\" is only allowed as the whole value, not inside a list")]
    Star { field: &'static str },
    #[error("{field} takes a list of ports, not \"*\"")]
    StarNotAllowed { field: &'static str },
    #[error(
        "{field} 0 refused: exempting root would let every root process of the pod bypass the \
         sidecar; a proxy running as root is exempted by its group (e.g. --proxy-gid 1337, as \
         Istio's TPROXY mode runs it)"
    )]
    RootIdentity { field: &'static str },
    #[error("{field}: {value:?}: expected {expected}")]
    Choice {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
}

/// Istio's per-pod capture switches. The CLI (`pod enable`, `iptables apply`) and the pod
/// annotations (`traffic.sidecar.istio.io/*`, `interceptor.dev/*`) both set a [`PodSpec`]
/// through [`PodSpec::set`], so a value means the same wherever it is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Switch {
    /// `*` or ports; an empty list turns inbound capture off.
    IncludeInboundPorts,
    ExcludeInboundPorts,
    IncludeOutboundPorts,
    ExcludeOutboundPorts,
    /// `*` or CIDRs.
    IncludeOutboundCidrs,
    ExcludeOutboundCidrs,
    /// `on`/`off` (`true`/`false`).
    Sockmap,
    /// `closed`/`open`.
    FailurePolicy,
}

impl PodSpec {
    /// Sets one switch from its text; `field` is how the caller names it (flag or annotation)
    /// in errors.
    pub fn set(
        &mut self,
        switch: Switch,
        field: &'static str,
        value: &str,
    ) -> Result<(), SpecError> {
        let choice = |expected: &'static str, options: &[(&str, bool)]| {
            let v = value.trim().to_ascii_lowercase();
            options
                .iter()
                .find(|(name, _)| *name == v)
                .map(|&(_, on)| on)
                .ok_or_else(|| SpecError::Choice {
                    field,
                    value: value.to_owned(),
                    expected,
                })
        };
        match switch {
            Switch::IncludeInboundPorts => {
                self.include_inbound_ports = parse_port_selection(field, value)?;
            }
            Switch::ExcludeInboundPorts => self.exclude_inbound_ports = parse_ports(field, value)?,
            Switch::IncludeOutboundPorts => {
                self.include_outbound_ports = parse_ports(field, value)?;
            }
            Switch::ExcludeOutboundPorts => {
                self.exclude_outbound_ports = parse_ports(field, value)?;
            }
            Switch::IncludeOutboundCidrs => {
                self.include_outbound_cidrs = parse_cidr_selection(field, value)?;
            }
            Switch::ExcludeOutboundCidrs => {
                self.exclude_outbound_cidrs = parse_cidrs(field, value)?;
            }
            Switch::Sockmap => {
                self.sockmap = choice(
                    "on or off (true or false)",
                    &[
                        ("on", true),
                        ("true", true),
                        ("off", false),
                        ("false", false),
                    ],
                )?;
            }
            Switch::FailurePolicy => {
                self.fail_open = choice(
                    "closed (refuse what cannot go through the proxy) or open",
                    &[("open", true), ("closed", false)],
                )?;
            }
        }
        Ok(())
    }
}

/// The proxy identity to exempt, as istio-iptables' `--uid-owner` / `--gid-owner` rules do:
/// never UID 0 or GID 0.
pub fn check_proxy_identity(uid: u32, gid: u32) -> Result<(), SpecError> {
    if uid == 0 {
        return Err(SpecError::RootIdentity {
            field: "--proxy-uid",
        });
    }
    if gid == 0 {
        return Err(SpecError::RootIdentity {
            field: "--proxy-gid",
        });
    }
    Ok(())
}

/// `*` or an explicit list (possibly empty).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection<T> {
    All,
    List(Vec<T>),
}

impl<T> Selection<T> {
    pub fn is_empty_list(&self) -> bool {
        matches!(self, Selection::List(v) if v.is_empty())
    }
}

/// An IP range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Bits matched in the 128-bit (IPv4-mapped) form.
    pub fn mapped_bits(&self) -> u32 {
        match self.addr {
            IpAddr::V4(_) => 96 + u32::from(self.prefix),
            IpAddr::V6(_) => u32::from(self.prefix),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| ())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().map_err(|_| ())?,
            None => max,
        };
        if prefix > max {
            return Err(());
        }
        // The network, as iptables reads `10.1.2.3/8`: the LPM trie keys ranges by their
        // prefix bits only, so `10.1.2.3/8` and `10.0.0.0/8` are one entry there and must be
        // one here (else the stale-row diff removes what it just wrote).
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// How one pod is intercepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSpec {
    /// `includeInboundPorts` (default `*`; an empty list turns inbound capture off).
    pub include_inbound_ports: Selection<u16>,
    /// `excludeInboundPorts`.
    pub exclude_inbound_ports: Vec<u16>,
    /// `includeOutboundPorts`: captured whatever the destination range.
    pub include_outbound_ports: Vec<u16>,
    /// `excludeOutboundPorts`.
    pub exclude_outbound_ports: Vec<u16>,
    /// `includeOutboundIPRanges` (default `*`; an empty list captures only included ports).
    pub include_outbound_cidrs: Selection<Cidr>,
    /// `excludeOutboundIPRanges`.
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// Whether outbound capture is on at all.
    pub outbound: bool,
    /// Move the app↔proxy bytes with sk_msg (default) or keep them on loopback TCP.
    pub sockmap: bool,
    /// A connect the datapath cannot send through the proxy goes direct (true) or is refused
    /// (false, the default: Istio never lets such a connection bypass the sidecar).
    pub fail_open: bool,
    /// The proxy's identity: its connections are never captured.
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    /// DNS capture to the proxy's 15053 (Istio's `ISTIO_META_DNS_CAPTURE`); off by default.
    #[serde(default)]
    pub dns: DnsCapture,
}

/// DNS capture, with Istio's `DNS_CAPTURE` / `CAPTURE_ALL_DNS` semantics: UDP and TCP port 53
/// to the pod's resolv.conf nameservers (or to any address with `capture_all`) go to the
/// proxy's DNS port; the proxy's own queries (UID/GID) never.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsCapture {
    pub enabled: bool,
    /// Every port-53 destination, not only the nameservers.
    pub capture_all: bool,
    /// The pod's resolv.conf nameservers: the destinations captured unless `capture_all`.
    pub nameservers: Vec<IpAddr>,
}

impl DnsCapture {
    /// For `pod list` and `status`: off, on (the nameservers) or all.
    pub fn label(&self) -> &'static str {
        match (
            self.enabled,
            self.capture_all || self.nameservers.is_empty(),
        ) {
            (false, _) => "off",
            (true, false) => "on",
            (true, true) => "all",
        }
    }

    /// Without explicit nameservers (and without capture-all), the ones of the pod's
    /// resolv.conf at `path`, as istio-iptables reads them in the pod.
    pub fn fill_nameservers(&mut self, path: &std::path::Path) -> Result<(), String> {
        if !self.enabled || self.capture_all || !self.nameservers.is_empty() {
            return Ok(());
        }
        let text = std::fs::read_to_string(path).map_err(|err| {
            format!(
                "--dns-capture: reading {}: {err}; name the resolvers with --dns-servers, or \
                 use --dns-capture-all",
                path.display()
            )
        })?;
        self.nameservers = crate::proxy::dns::forward::parse_resolv_conf(&text)
            .iter()
            .map(|a| a.ip())
            .collect();
        if self.nameservers.is_empty() {
            return Err(format!(
                "--dns-capture: no nameserver in {}; name the resolvers with --dns-servers, or \
                 use --dns-capture-all",
                path.display()
            ));
        }
        Ok(())
    }
}

/// The resolv.conf a pod's processes see: its root's (`--pid`), or `ip netns`' per-namespace
/// file (`/etc/netns/NAME/resolv.conf`, bind-mounted by `ip netns exec`), else the host's.
pub fn pod_resolv_conf(netns: Option<&str>, pid: Option<u32>) -> std::path::PathBuf {
    if let Some(pid) = pid {
        return format!("/proc/{pid}/root/etc/resolv.conf").into();
    }
    if let Some(name) = netns {
        let per_ns = std::path::PathBuf::from(format!("/etc/netns/{name}/resolv.conf"));
        if per_ns.exists() {
            return per_ns;
        }
    }
    "/etc/resolv.conf".into()
}

/// The proxy's DNS port (Istio's agent: 15053).
pub const DNS_CAPTURE_PORT: u16 = 15053;

impl Default for PodSpec {
    fn default() -> Self {
        Self {
            include_inbound_ports: Selection::All,
            exclude_inbound_ports: Vec::new(),
            include_outbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            include_outbound_cidrs: Selection::All,
            exclude_outbound_cidrs: Vec::new(),
            outbound: true,
            sockmap: true,
            fail_open: false,
            proxy_uid: 1337,
            proxy_gid: 1337,
            dns: DnsCapture::default(),
        }
    }
}

impl PodSpec {
    pub fn inbound(&self) -> bool {
        !self.include_inbound_ports.is_empty_list()
    }

    /// Every inbound port never captured for this pod: the user's exclusions, the
    /// always-excluded ports, the proxy's own ports, and ssh (22) when everything else is
    /// captured — as `istio-iptables` does with `-b *`.
    pub fn effective_inbound_exclusions(&self, proxy_ports: &[u16]) -> Vec<u16> {
        let mut ports: Vec<u16> = self.exclude_inbound_ports.clone();
        ports.extend_from_slice(ALWAYS_EXCLUDED_INBOUND);
        ports.extend_from_slice(proxy_ports);
        if self.include_inbound_ports == Selection::All {
            ports.push(22);
        }
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}

fn items(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// A comma-separated list of ports (`excludeOutboundPorts: "8080, 9090"`).
pub fn parse_ports(field: &'static str, value: &str) -> Result<Vec<u16>, SpecError> {
    let mut out = Vec::new();
    for item in items(value) {
        if item == "*" {
            return Err(SpecError::StarNotAllowed { field });
        }
        match item.parse::<u16>() {
            Ok(p) if p != 0 => out.push(p),
            _ => {
                return Err(SpecError::Port {
                    field,
                    value: item.to_owned(),
                });
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// `*` or a list of ports (`includeInboundPorts`).
pub fn parse_port_selection(field: &'static str, value: &str) -> Result<Selection<u16>, SpecError> {
    if value.trim() == "*" {
        return Ok(Selection::All);
    }
    if items(value).any(|i| i == "*") {
        return Err(SpecError::Star { field });
    }
    parse_ports(field, value).map(Selection::List)
}

/// A comma-separated list of CIDRs (`excludeOutboundIPRanges`); a bare address is a /32 or
/// /128.
pub fn parse_cidrs(field: &'static str, value: &str) -> Result<Vec<Cidr>, SpecError> {
    let mut out = Vec::new();
    for item in items(value) {
        if item == "*" {
            return Err(SpecError::Star { field });
        }
        let cidr = item.parse::<Cidr>().map_err(|()| SpecError::Cidr {
            field,
            value: item.to_owned(),
        })?;
        if !out.contains(&cidr) {
            out.push(cidr);
        }
    }
    Ok(out)
}

/// `*` or a list of CIDRs (`includeOutboundIPRanges`).
pub fn parse_cidr_selection(
    field: &'static str,
    value: &str,
) -> Result<Selection<Cidr>, SpecError> {
    if value.trim() == "*" {
        return Ok(Selection::All);
    }
    parse_cidrs(field, value).map(Selection::List)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse_with_spaces_and_duplicates() {
        assert_eq!(
            parse_ports("f", " 8080, 9090,8080 ,").unwrap(),
            vec![8080, 9090]
        );
        assert_eq!(parse_ports("f", "").unwrap(), Vec::<u16>::new());
    }

    #[test]
    fn bad_ports_name_field_and_value() {
        let err = parse_ports("excludeOutboundPorts", "80,http").unwrap_err();
        assert_eq!(
            err,
            SpecError::Port {
                field: "excludeOutboundPorts",
                value: "http".into()
            }
        );
        assert!(err.to_string().contains("excludeOutboundPorts"));
        assert!(parse_ports("f", "0").is_err());
        assert!(parse_ports("f", "65536").is_err());
        assert!(parse_ports("f", "-1").is_err());
        assert!(parse_ports("f", "*").is_err());
    }

    #[test]
    fn selections() {
        assert_eq!(parse_port_selection("f", "*").unwrap(), Selection::All);
        assert_eq!(parse_port_selection("f", " * ").unwrap(), Selection::All);
        assert_eq!(
            parse_port_selection("f", "").unwrap(),
            Selection::List(vec![])
        );
        assert!(parse_port_selection("f", "80,*").is_err());
        assert_eq!(parse_cidr_selection("f", "*").unwrap(), Selection::All);
    }

    #[test]
    fn cidrs() {
        let v = parse_cidrs("f", "10.0.0.0/8, 198.18.0.7 ,fd00::/8").unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[1].prefix, 32);
        assert_eq!(v[0].mapped_bits(), 104);
        assert_eq!(v[2].mapped_bits(), 8);
        assert!(parse_cidrs("f", "10.0.0.0/33").is_err());
        assert!(parse_cidrs("f", "10.0.0/8").is_err());
        assert!(parse_cidrs("f", "fd00::/129").is_err());
        assert!(parse_cidrs("f", "*").is_err());
    }

    #[test]
    fn cidr_contains() {
        let c: Cidr = "198.18.0.0/15".parse().unwrap();
        assert!(c.contains("198.19.255.1".parse().unwrap()));
        assert!(!c.contains("198.20.0.1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        assert!(!all.contains("::1".parse().unwrap()));
    }

    #[test]
    fn inbound_exclusions_follow_istio() {
        let spec = PodSpec {
            exclude_inbound_ports: vec![9000],
            ..PodSpec::default()
        };
        let ex = spec.effective_inbound_exclusions(&[15001, 15006]);
        for p in [22, 9000, 15001, 15006, 15020, 15021, 15090] {
            assert!(ex.contains(&p), "{p} should be excluded");
        }
        // An explicit list that names 22 captures it ("unless asked").
        let spec = PodSpec {
            include_inbound_ports: Selection::List(vec![22, 8080]),
            ..PodSpec::default()
        };
        assert!(
            !spec
                .effective_inbound_exclusions(&[15001, 15006])
                .contains(&22)
        );
        assert!(
            !PodSpec {
                include_inbound_ports: Selection::List(vec![]),
                ..PodSpec::default()
            }
            .inbound()
        );
    }

    /// Hostile input: whatever text an annotation or flag carries, the parsers answer with a
    /// value or an error naming the field, never a panic; what they accept is normalized.
    mod hostile {
        use proptest::prelude::*;

        use super::*;

        /// Text shaped like the lists users write, with the mistakes they make.
        fn list_text() -> impl Strategy<Value = String> {
            let item = prop_oneof![
                any::<u16>().prop_map(|p| p.to_string()),
                any::<u32>().prop_map(|p| p.to_string()),
                (any::<[u8; 4]>(), 0u8..40)
                    .prop_map(|(a, p)| format!("{}.{}.{}.{}/{p}", a[0], a[1], a[2], a[3])),
                (any::<u128>(), 0u8..140)
                    .prop_map(|(a, p)| format!("{}/{p}", std::net::Ipv6Addr::from(a))),
                Just("*".to_owned()),
                Just(String::new()),
                "[ -~]{0,12}",
                "\\PC{0,6}",
            ];
            prop::collection::vec(item, 0..8)
                .prop_flat_map(|items| {
                    let n = items.len();
                    (
                        Just(items),
                        prop::collection::vec(
                            prop_oneof![Just(","), Just(", "), Just(" ,"), Just(",,")],
                            n,
                        ),
                    )
                })
                .prop_map(|(items, seps)| {
                    items
                        .iter()
                        .zip(seps)
                        .map(|(i, s)| format!("{i}{s}"))
                        .collect()
                })
        }

        const SWITCHES: [Switch; 8] = [
            Switch::IncludeInboundPorts,
            Switch::ExcludeInboundPorts,
            Switch::IncludeOutboundPorts,
            Switch::ExcludeOutboundPorts,
            Switch::IncludeOutboundCidrs,
            Switch::ExcludeOutboundCidrs,
            Switch::Sockmap,
            Switch::FailurePolicy,
        ];

        proptest! {
            #[test]
            fn every_switch_answers_any_text(which in 0..SWITCHES.len(), value in prop_oneof![list_text(), any::<String>()]) {
                let mut spec = PodSpec::default();
                let before = spec.clone();
                match spec.set(SWITCHES[which], "field", &value) {
                    Ok(()) => {
                        for p in spec.exclude_inbound_ports.iter().chain(&spec.include_outbound_ports).chain(&spec.exclude_outbound_ports) {
                            prop_assert_ne!(*p, 0);
                        }
                    }
                    Err(e) => {
                        // A refused value leaves the spec as it was and says which field.
                        prop_assert_eq!(&spec, &before);
                        prop_assert!(e.to_string().contains("field"), "{e}");
                    }
                }
            }

            #[test]
            fn accepted_ranges_are_networks_that_survive_printing(value in list_text()) {
                if let Ok(cidrs) = parse_cidrs("field", &value) {
                    for c in &cidrs {
                        let again: Cidr = c.to_string().parse().expect("a printed range parses");
                        prop_assert_eq!(again, *c);
                        // No host bits: the range contains its own address and is its network.
                        prop_assert!(c.contains(c.addr));
                        let masked: Cidr = format!("{}/{}", c.addr, c.prefix).parse().unwrap();
                        prop_assert_eq!(masked.addr, c.addr);
                    }
                    let mut unique = cidrs.clone();
                    unique.dedup();
                    prop_assert_eq!(unique.len(), cidrs.len());
                }
            }

            #[test]
            fn a_range_with_host_bits_is_its_network(a in any::<u32>(), p in 0u8..=32, b in any::<u128>(), q in 0u8..=128) {
                let v4: Cidr = format!("{}/{p}", std::net::Ipv4Addr::from(a)).parse().unwrap();
                prop_assert!(v4.contains(std::net::Ipv4Addr::from(a).into()));
                let v6: Cidr = format!("{}/{q}", std::net::Ipv6Addr::from(b)).parse().unwrap();
                prop_assert!(v6.contains(std::net::Ipv6Addr::from(b).into()));
            }
        }
    }
}
