//! The rule set `istio-iptables` writes (REDIRECT mode), rendered as `iptables-restore` input,
//! and the script that removes exactly that.

use std::{fmt::Write as _, net::IpAddr};

use serde::Serialize;

use super::Settings;
use crate::registry::spec::{DNS_CAPTURE_PORT, PodSpec, Selection};

pub(super) const INBOUND: &str = "ISTIO_INBOUND";
pub(super) const IN_REDIRECT: &str = "ISTIO_IN_REDIRECT";
pub(super) const OUTPUT: &str = "ISTIO_OUTPUT";
pub(super) const REDIRECT: &str = "ISTIO_REDIRECT";
/// Every chain we create, in creation order.
pub(super) const CHAINS: [&str; 4] = [INBOUND, IN_REDIRECT, OUTPUT, REDIRECT];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    fn matches(self, ip: IpAddr) -> bool {
        matches!(
            (self, ip),
            (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_))
        )
    }
}

/// The nat-table rules of one address family, in order.
#[derive(Clone, Debug)]
pub struct RuleSet {
    family: Family,
    /// `-A CHAIN ...` lines.
    rules: Vec<String>,
    /// raw-table lines (DNS capture's conntrack zones).
    raw: Vec<String>,
}

impl RuleSet {
    /// The rules for `spec`, in the order istio-iptables appends them.
    pub fn new(spec: &PodSpec, settings: &Settings, family: Family) -> Self {
        let mut r = Vec::new();
        let mut add = |chain: &str, rule: String| r.push(format!("-A {chain} {rule}"));
        let dns = spec.dns.enabled;
        // No known nameserver: every port-53 destination, as istio-cni does when it cannot
        // read the pod's resolv.conf.
        let capture_all = spec.dns.capture_all || spec.dns.nameservers.is_empty();
        // The nameservers of this family (capture-all: none needed).
        let nameservers: Vec<String> = spec
            .dns
            .nameservers
            .iter()
            .filter(|ip| family.matches(**ip))
            .map(|ip| match family {
                Family::V4 => format!("{ip}/32"),
                Family::V6 => format!("{ip}/128"),
            })
            .collect();
        // With DNS capture, istio-iptables keeps TCP 53 out of the two loopback rules, so a
        // query to a resolver on localhost still reaches the DNS rule below.
        let not_dns = if dns {
            " -p tcp -m tcp ! --dport 53"
        } else {
            ""
        };
        let inbound = spec.inbound();
        let proxy_ports = [settings.outbound_port, settings.inbound_port];

        // Jumps from the built-in chains.
        if inbound {
            add("PREROUTING", format!("-p tcp -j {INBOUND}"));
        }
        add("OUTPUT", format!("-p tcp -j {OUTPUT}"));

        // ISTIO_INBOUND: never-captured ports return, then everything (`*`) or the listed ports.
        if inbound {
            let excluded = spec.effective_inbound_exclusions(&proxy_ports);
            for port in &excluded {
                add(INBOUND, format!("-p tcp -m tcp --dport {port} -j RETURN"));
            }
            match &spec.include_inbound_ports {
                Selection::All => add(INBOUND, format!("-p tcp -j {IN_REDIRECT}")),
                Selection::List(ports) => {
                    for port in ports.iter().filter(|p| !excluded.contains(p)) {
                        add(
                            INBOUND,
                            format!("-p tcp -m tcp --dport {port} -j {IN_REDIRECT}"),
                        );
                    }
                }
            }
        }
        add(
            IN_REDIRECT,
            format!("-p tcp -j REDIRECT --to-ports {}", settings.inbound_port),
        );
        add(
            REDIRECT,
            format!("-p tcp -j REDIRECT --to-ports {}", settings.outbound_port),
        );

        // ISTIO_OUTPUT, rule by rule as the article's table numbers them.
        for port in &spec.exclude_outbound_ports {
            add(OUTPUT, format!("-p tcp -m tcp --dport {port} -j RETURN"));
        }
        let passthrough = match family {
            Family::V4 => format!("{}/32", settings.passthrough_v4),
            Family::V6 => format!("{}/128", settings.passthrough_v6),
        };
        let lo = family.loopback();
        // 1: the proxy's inbound passthrough hop to its app.
        add(OUTPUT, format!("-s {passthrough} -o lo -j RETURN"));
        for (owner, id) in [("uid", spec.proxy_uid), ("gid", spec.proxy_gid)] {
            // 2/5: the proxy calling its own pod's address goes to its inbound handler.
            if inbound {
                add(
                    OUTPUT,
                    format!(
                        "! -d {lo} -o lo{not_dns} -m owner --{owner}-owner {id} -j {IN_REDIRECT}"
                    ),
                );
            }
            // 3/6: the app talking to itself over lo stays local.
            add(
                OUTPUT,
                format!("-o lo{not_dns} -m owner ! --{owner}-owner {id} -j RETURN"),
            );
            // 4/7: the proxy's own upstream connections.
            add(OUTPUT, format!("-m owner --{owner}-owner {id} -j RETURN"));
        }
        // DNS over TCP to the nameservers (or anywhere) → the DNS proxy.
        if dns {
            let to = format!("-j REDIRECT --to-ports {DNS_CAPTURE_PORT}");
            if capture_all {
                add(OUTPUT, format!("-p tcp -m tcp --dport 53 {to}"));
            } else {
                for ns in &nameservers {
                    add(OUTPUT, format!("-d {ns} -p tcp -m tcp --dport 53 {to}"));
                }
            }
        }
        // 8: loopback.
        add(OUTPUT, format!("-d {lo} -j RETURN"));
        if spec.outbound {
            for cidr in spec
                .exclude_outbound_cidrs
                .iter()
                .filter(|c| family.matches(c.addr))
            {
                add(OUTPUT, format!("-d {cidr} -j RETURN"));
            }
            for port in spec
                .include_outbound_ports
                .iter()
                .filter(|p| !spec.exclude_outbound_ports.contains(p))
            {
                add(
                    OUTPUT,
                    format!("-p tcp -m tcp --dport {port} -j {REDIRECT}"),
                );
            }
            // 9: everything else (or the included ranges) to the outbound handler.
            match &spec.include_outbound_cidrs {
                Selection::All => add(OUTPUT, format!("-j {REDIRECT}")),
                Selection::List(cidrs) => {
                    for cidr in cidrs.iter().filter(|c| family.matches(c.addr)) {
                        add(OUTPUT, format!("-d {cidr} -j {REDIRECT}"));
                    }
                }
            }
        }
        let mut raw = Vec::new();
        if dns {
            dns_udp_rules(spec, capture_all, &nameservers, &mut r, &mut raw);
        }
        Self {
            family,
            rules: r,
            raw,
        }
    }

    pub fn family(&self) -> Family {
        self.family
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len() + self.raw.len()
    }

    /// `iptables-restore --noflush` input: declares (and so empties) our chains, appends rules.
    pub fn restore_script(&self) -> String {
        let mut s = String::from("*nat\n");
        for chain in CHAINS {
            let _ = writeln!(s, ":{chain} - [0:0]");
        }
        for rule in &self.rules {
            let _ = writeln!(s, "{rule}");
        }
        s.push_str("COMMIT\n");
        self.push_raw(&mut s);
        s
    }

    fn push_raw(&self, s: &mut String) {
        if self.raw.is_empty() {
            return;
        }
        s.push_str("*raw\n");
        for rule in &self.raw {
            let _ = writeln!(s, "{rule}");
        }
        s.push_str("COMMIT\n");
    }

    /// What `iptables-save -t nat` shows for these rules (for `--dry-run`).
    pub fn save_format(&self) -> String {
        let mut s = format!(
            "# interceptor iptables: {} rules ({})\n*nat\n",
            self.rules.len(),
            match self.family {
                Family::V4 => "iptables",
                Family::V6 => "ip6tables",
            }
        );
        for chain in ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"] {
            let _ = writeln!(s, ":{chain} ACCEPT [0:0]");
        }
        for chain in CHAINS {
            let _ = writeln!(s, ":{chain} - [0:0]");
        }
        for rule in &self.rules {
            let _ = writeln!(s, "{rule}");
        }
        s.push_str("COMMIT\n");
        self.push_raw(&mut s);
        s
    }
}

/// istio-iptables' UDP DNS rules: in nat OUTPUT the proxy's own queries return, the app's to
/// the nameservers (or all) go to the DNS proxy; in raw, conntrack zones keep the two UDP
/// flows (app ↔ proxy, proxy ↔ resolver) apart — they share the resolver's address and port,
/// so without zones one could be taken for the other's reply and un-NATed wrongly.
fn dns_udp_rules(
    spec: &PodSpec,
    capture_all: bool,
    nameservers: &[String],
    nat: &mut Vec<String>,
    raw: &mut Vec<String>,
) {
    let ids = [("uid", spec.proxy_uid), ("gid", spec.proxy_gid)];
    for (owner, id) in ids {
        nat.push(format!(
            "-A OUTPUT -p udp -m udp --dport 53 -m owner --{owner}-owner {id} -j RETURN"
        ));
    }
    let to = format!("-j REDIRECT --to-ports {DNS_CAPTURE_PORT}");
    if capture_all {
        nat.push(format!("-A OUTPUT -p udp -m udp --dport 53 {to}"));
    } else {
        for ns in nameservers {
            nat.push(format!("-A OUTPUT -d {ns} -p udp -m udp --dport 53 {to}"));
        }
    }
    for (owner, id) in ids {
        // The proxy's queries to the resolver: zone 1; its replies to the app: zone 2.
        raw.push(format!(
            "-A OUTPUT -p udp -m udp --dport 53 -m owner --{owner}-owner {id} -j CT --zone 1"
        ));
        raw.push(format!(
            "-A OUTPUT -p udp -m udp --sport {DNS_CAPTURE_PORT} -m owner --{owner}-owner {id} -j CT --zone 2"
        ));
    }
    if capture_all {
        // The app's queries: zone 2; the resolver's replies: zone 1.
        raw.push("-A OUTPUT -p udp -m udp --dport 53 -j CT --zone 2".into());
        raw.push("-A PREROUTING -p udp -m udp --sport 53 -j CT --zone 1".into());
    } else {
        for ns in nameservers {
            raw.push(format!(
                "-A OUTPUT -d {ns} -p udp -m udp --dport 53 -j CT --zone 2"
            ));
            raw.push(format!(
                "-A PREROUTING -s {ns} -p udp -m udp --sport 53 -j CT --zone 1"
            ));
        }
    }
}

/// Whether a rule (as iptables-save prints it, without `-A CHAIN`) is one of istio-iptables'
/// DNS rules in a built-in chain: nat OUTPUT's UDP 53 returns and redirect, raw's zones.
fn is_dns_rule(table: &str, chain: &str, rule: &str) -> bool {
    let words: Vec<&str> = rule.split_whitespace().collect();
    let has = |seq: &[&str]| words.windows(seq.len()).any(|w| w == seq);
    let udp = has(&["-p", "udp"]);
    let to_proxy = format!("{DNS_CAPTURE_PORT}");
    match (table, chain) {
        ("nat", "OUTPUT") => {
            udp && has(&["--dport", "53"])
                && (has(&["-j", "REDIRECT", "--to-ports", &to_proxy])
                    || (has(&["-j", "RETURN"])
                        && (words.contains(&"--uid-owner") || words.contains(&"--gid-owner"))))
        }
        ("raw", "OUTPUT") => {
            udp && (has(&["--dport", "53"]) || has(&["--sport", &to_proxy]))
                && (has(&["-j", "CT", "--zone", "1"]) || has(&["-j", "CT", "--zone", "2"]))
        }
        ("raw", "PREROUTING") => {
            udp && has(&["--sport", "53"]) && has(&["-j", "CT", "--zone", "1"])
        }
        _ => false,
    }
}

/// The `iptables-restore --noflush` script that deletes istio-iptables' DNS rules from the raw
/// table `save` (`iptables-save -t raw`) shows, and how many; None when there are none.
pub(super) fn raw_removal_script(save: &str) -> Option<(String, usize)> {
    let mut script = String::from("*raw\n");
    let mut count = 0;
    for rule in save.lines().filter_map(|l| l.strip_prefix("-A ")) {
        let (chain, rest) = rule.split_once(' ').unwrap_or((rule, ""));
        if is_dns_rule("raw", chain, rest) {
            let _ = writeln!(script, "-D {rule}");
            count += 1;
        }
    }
    script.push_str("COMMIT\n");
    (count > 0).then_some((script, count))
}

/// Whether an `iptables-save -t nat` output has any of our chains.
pub(super) fn has_istio_chains(save: &str) -> bool {
    save.lines().any(|l| {
        l.strip_prefix(':')
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|chain| CHAINS.contains(&chain))
    })
}

/// The `iptables-restore --noflush` script that removes our jumps and chains from a namespace
/// whose nat table `save` shows, and how many rules it removes; None when nothing is ours.
pub(super) fn removal_script(save: &str) -> Option<(String, usize)> {
    let present: Vec<&str> = CHAINS
        .iter()
        .copied()
        .filter(|c| {
            save.lines().any(|l| {
                l.strip_prefix(':')
                    .is_some_and(|r| r.split_whitespace().next() == Some(*c))
            })
        })
        .collect();
    if present.is_empty() {
        return None;
    }
    let mut script = String::from("*nat\n");
    let mut count = 0;
    for line in save.lines() {
        let Some(rule) = line.strip_prefix("-A ") else {
            continue;
        };
        let mut words = rule.split_whitespace();
        let chain = words.next().unwrap_or_default();
        let target = rule
            .split_whitespace()
            .skip_while(|w| *w != "-j")
            .nth(1)
            .unwrap_or_default();
        if CHAINS.contains(&chain) {
            count += 1;
        } else if CHAINS.contains(&target)
            || is_dns_rule("nat", chain, rule.split_once(' ').map_or("", |(_, r)| r))
        {
            // A jump from a built-in (or anyone's) chain into ours: delete that exact rule.
            let _ = writeln!(script, "-D {rule}");
            count += 1;
        }
    }
    for chain in &present {
        let _ = writeln!(script, "-F {chain}");
    }
    for chain in &present {
        let _ = writeln!(script, "-X {chain}");
    }
    script.push_str("COMMIT\n");
    Some((script, count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::spec;

    fn rules(spec: &PodSpec) -> Vec<String> {
        RuleSet::new(spec, &Settings::default(), Family::V4).rules
    }

    #[test]
    fn default_spec_is_istios_rule_set() {
        let r = rules(&PodSpec::default());
        let expected = [
            "-A PREROUTING -p tcp -j ISTIO_INBOUND",
            "-A OUTPUT -p tcp -j ISTIO_OUTPUT",
            "-A ISTIO_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
            "-A ISTIO_INBOUND -p tcp -m tcp --dport 15001 -j RETURN",
            "-A ISTIO_INBOUND -p tcp -m tcp --dport 15006 -j RETURN",
            "-A ISTIO_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
            "-A ISTIO_INBOUND -p tcp -m tcp --dport 15021 -j RETURN",
            "-A ISTIO_INBOUND -p tcp -m tcp --dport 15090 -j RETURN",
            "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
            "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN",
            "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
            "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
            "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT",
            "-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
            "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
            "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
            "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
        ];
        assert_eq!(r, expected);
    }

    #[test]
    fn exclusions_and_inclusions_follow_istio_order() {
        let s = PodSpec {
            include_inbound_ports: spec::parse_port_selection("i", "9080,15090").expect("ports"),
            exclude_outbound_ports: vec![5432],
            include_outbound_ports: vec![443],
            include_outbound_cidrs: spec::parse_cidr_selection("c", "198.18.0.0/16,fd00::/8")
                .expect("cidrs"),
            exclude_outbound_cidrs: spec::parse_cidrs("x", "198.18.5.0/24").expect("cidrs"),
            ..PodSpec::default()
        };
        let r = rules(&s);
        let pos = |needle: &str| {
            r.iter()
                .position(|l| l == needle)
                .unwrap_or_else(|| panic!("missing {needle}: {r:#?}"))
        };
        // Listed inbound ports only, never the always-excluded ones even when listed.
        assert!(pos("-A ISTIO_INBOUND -p tcp -m tcp --dport 9080 -j ISTIO_IN_REDIRECT") > 0);
        assert!(
            !r.iter()
                .any(|l| l.contains("--dport 15090 -j ISTIO_IN_REDIRECT"))
        );
        assert!(
            !r.iter().any(|l| l.contains("--dport 22 ")),
            "22 only under *"
        );
        let excluded_port = pos("-A ISTIO_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN");
        let excluded_range = pos("-A ISTIO_OUTPUT -d 198.18.5.0/24 -j RETURN");
        let included_port = pos("-A ISTIO_OUTPUT -p tcp -m tcp --dport 443 -j ISTIO_REDIRECT");
        let included_range = pos("-A ISTIO_OUTPUT -d 198.18.0.0/16 -j ISTIO_REDIRECT");
        assert!(excluded_port < excluded_range);
        assert!(excluded_range < included_port);
        assert!(included_port < included_range);
        // The IPv6 range goes only to ip6tables; no catch-all redirect with a range list.
        assert!(!r.iter().any(|l| l.contains("fd00::")));
        assert!(!r.iter().any(|l| l == "-A ISTIO_OUTPUT -j ISTIO_REDIRECT"));
        let v6 = RuleSet::new(&s, &Settings::default(), Family::V6).rules;
        assert!(
            v6.iter()
                .any(|l| l == "-A ISTIO_OUTPUT -d fd00::/8 -j ISTIO_REDIRECT")
        );
        assert!(
            v6.iter()
                .any(|l| l == "-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN")
        );
    }

    #[test]
    fn inbound_off_writes_no_inbound_jump() {
        let s = PodSpec {
            include_inbound_ports: Selection::List(Vec::new()),
            ..PodSpec::default()
        };
        let r = rules(&s);
        assert!(!r.iter().any(|l| l.starts_with("-A PREROUTING")));
        assert!(!r.iter().any(|l| l.contains("-j ISTIO_IN_REDIRECT")));
    }

    #[test]
    fn removal_deletes_our_jumps_and_chains_only() {
        let save = "# Generated by iptables-save\n*nat\n:PREROUTING ACCEPT [0:0]\n\
                    :OUTPUT ACCEPT [0:0]\n:ISTIO_INBOUND - [0:0]\n:ISTIO_OUTPUT - [0:0]\n\
                    :KEEP - [0:0]\n-A PREROUTING -p tcp -j ISTIO_INBOUND\n\
                    -A PREROUTING -p udp -j KEEP\n-A OUTPUT -p tcp -j ISTIO_OUTPUT\n\
                    -A ISTIO_INBOUND -p tcp -j RETURN\n-A ISTIO_OUTPUT -j RETURN\nCOMMIT\n";
        let (script, count) = removal_script(save).expect("ours present");
        assert_eq!(count, 4);
        assert!(script.contains("-D PREROUTING -p tcp -j ISTIO_INBOUND\n"));
        assert!(script.contains("-D OUTPUT -p tcp -j ISTIO_OUTPUT\n"));
        assert!(script.contains("-X ISTIO_INBOUND\n") && script.contains("-X ISTIO_OUTPUT\n"));
        assert!(!script.contains("KEEP"));
        assert!(
            !script.contains("ISTIO_REDIRECT"),
            "absent chains are not touched"
        );
        assert!(removal_script("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n").is_none());
    }

    fn dns_spec(capture_all: bool) -> PodSpec {
        PodSpec {
            dns: crate::registry::spec::DnsCapture {
                enabled: true,
                capture_all,
                nameservers: vec![
                    "10.96.0.10".parse().expect("ip"),
                    "fd00::a".parse().expect("ip"),
                ],
            },
            ..PodSpec::default()
        }
    }

    #[test]
    fn dns_capture_is_istio_iptables_rule_set() {
        let set = RuleSet::new(&dns_spec(false), &Settings::default(), Family::V4);
        let output: Vec<&str> = set
            .rules
            .iter()
            .map(String::as_str)
            .filter(|r| r.starts_with("-A ISTIO_OUTPUT") || r.starts_with("-A OUTPUT"))
            .collect();
        assert_eq!(
            output,
            [
                "-A OUTPUT -p tcp -j ISTIO_OUTPUT",
                "-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN",
                "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 53 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
                "-A ISTIO_OUTPUT -o lo -p tcp -m tcp ! --dport 53 -m owner ! --uid-owner 1337 -j RETURN",
                "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 53 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT",
                "-A ISTIO_OUTPUT -o lo -p tcp -m tcp ! --dport 53 -m owner ! --gid-owner 1337 -j RETURN",
                "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
                "-A ISTIO_OUTPUT -d 10.96.0.10/32 -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053",
                "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
                "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
                "-A OUTPUT -p udp -m udp --dport 53 -m owner --uid-owner 1337 -j RETURN",
                "-A OUTPUT -p udp -m udp --dport 53 -m owner --gid-owner 1337 -j RETURN",
                "-A OUTPUT -d 10.96.0.10/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053",
            ]
        );
        assert_eq!(
            set.raw,
            [
                "-A OUTPUT -p udp -m udp --dport 53 -m owner --uid-owner 1337 -j CT --zone 1",
                "-A OUTPUT -p udp -m udp --sport 15053 -m owner --uid-owner 1337 -j CT --zone 2",
                "-A OUTPUT -p udp -m udp --dport 53 -m owner --gid-owner 1337 -j CT --zone 1",
                "-A OUTPUT -p udp -m udp --sport 15053 -m owner --gid-owner 1337 -j CT --zone 2",
                "-A OUTPUT -d 10.96.0.10/32 -p udp -m udp --dport 53 -j CT --zone 2",
                "-A PREROUTING -s 10.96.0.10/32 -p udp -m udp --sport 53 -j CT --zone 1",
            ]
        );
        assert!(set.restore_script().contains("*raw\n"));
        // ip6tables gets the IPv6 nameserver only.
        let v6 = RuleSet::new(&dns_spec(false), &Settings::default(), Family::V6);
        assert!(v6.rules.iter().any(|r| r
            == "-A OUTPUT -d fd00::a/128 -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053"));
        assert!(
            !v6.rules
                .iter()
                .chain(&v6.raw)
                .any(|r| r.contains("10.96.0.10"))
        );
        // Capture-all: no destination on the redirects and zones.
        let all = RuleSet::new(&dns_spec(true), &Settings::default(), Family::V4);
        assert!(
            all.rules
                .iter()
                .any(|r| r == "-A OUTPUT -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053")
        );
        assert!(
            all.rules
                .iter()
                .any(|r| r
                    == "-A ISTIO_OUTPUT -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053")
        );
        assert!(
            all.raw
                .iter()
                .any(|r| r == "-A PREROUTING -p udp -m udp --sport 53 -j CT --zone 1")
        );
        // Off: none of it.
        let off = RuleSet::new(&PodSpec::default(), &Settings::default(), Family::V4);
        assert!(off.raw.is_empty() && !off.restore_script().contains("53"));
    }

    #[test]
    fn dns_removal_takes_exactly_the_dns_rules() {
        let set = RuleSet::new(&dns_spec(false), &Settings::default(), Family::V4);
        // What iptables-save prints after apply, plus rules of others that look alike.
        let mut nat = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
        for c in CHAINS {
            nat.push_str(&format!(":{c} - [0:0]\n"));
        }
        nat.push_str("-A OUTPUT -p udp -m udp --dport 53 -j DNAT --to-destination 10.0.0.1\n");
        nat.push_str("-A OUTPUT -p udp -m udp --dport 5353 -m owner --uid-owner 1337 -j RETURN\n");
        for r in &set.rules {
            nat.push_str(r);
            nat.push('\n');
        }
        nat.push_str("COMMIT\n");
        let (script, count) = removal_script(&nat).expect("ours");
        assert_eq!(count, set.rules.len());
        assert!(script.contains(
            "-D OUTPUT -d 10.96.0.10/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053\n"
        ));
        assert!(
            script.contains(
                "-D OUTPUT -p udp -m udp --dport 53 -m owner --gid-owner 1337 -j RETURN\n"
            )
        );
        assert!(
            !script.contains("DNAT") && !script.contains("5353"),
            "{script}"
        );
        let mut raw = String::from("*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
        raw.push_str("-A OUTPUT -p udp -m udp --dport 123 -j CT --zone 1\n");
        raw.push_str("-A PREROUTING -p tcp -m tcp --sport 53 -j CT --zone 1\n");
        for r in &set.raw {
            raw.push_str(r);
            raw.push('\n');
        }
        raw.push_str("COMMIT\n");
        let (script, count) = raw_removal_script(&raw).expect("ours");
        assert_eq!(count, set.raw.len(), "{script}");
        assert!(
            !script.contains("123") && !script.contains("-p tcp"),
            "{script}"
        );
        assert!(raw_removal_script("*raw\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n").is_none());
    }
}
