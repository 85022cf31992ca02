//! The rule set `istio-iptables` writes (REDIRECT mode), rendered as `iptables-restore` input,
//! and the script that removes exactly that.

use std::{fmt::Write as _, net::IpAddr};

use serde::Serialize;

use super::Settings;
use crate::pods::spec::{PodSpec, Selection};

pub const INBOUND: &str = "ISTIO_INBOUND";
pub const IN_REDIRECT: &str = "ISTIO_IN_REDIRECT";
pub const OUTPUT: &str = "ISTIO_OUTPUT";
pub const REDIRECT: &str = "ISTIO_REDIRECT";
/// Every chain we create, in creation order.
pub const CHAINS: [&str; 4] = [INBOUND, IN_REDIRECT, OUTPUT, REDIRECT];

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
}

impl RuleSet {
    /// The rules for `spec`, in the order istio-iptables appends them.
    pub fn new(spec: &PodSpec, settings: &Settings, family: Family) -> Self {
        let mut r = Vec::new();
        let mut add = |chain: &str, rule: String| r.push(format!("-A {chain} {rule}"));
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
                    format!("! -d {lo} -o lo -m owner --{owner}-owner {id} -j {IN_REDIRECT}"),
                );
            }
            // 3/6: the app talking to itself over lo stays local.
            add(
                OUTPUT,
                format!("-o lo -m owner ! --{owner}-owner {id} -j RETURN"),
            );
            // 4/7: the proxy's own upstream connections.
            add(OUTPUT, format!("-m owner --{owner}-owner {id} -j RETURN"));
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
        Self { family, rules: r }
    }

    pub fn family(&self) -> Family {
        self.family
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
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
        s
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
        s
    }
}

/// Whether an `iptables-save -t nat` output has any of our chains.
pub fn has_istio_chains(save: &str) -> bool {
    save.lines().any(|l| {
        l.strip_prefix(':')
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|chain| CHAINS.contains(&chain))
    })
}

/// The `iptables-restore --noflush` script that removes our jumps and chains from a namespace
/// whose nat table `save` shows, and how many rules it removes; None when nothing is ours.
pub fn removal_script(save: &str) -> Option<(String, usize)> {
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
        } else if CHAINS.contains(&target) {
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
    use crate::pods::spec;

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
}
