//! The names the DNS proxy answers itself, built from the `dns` section of the proxy config:
//! each service under every name Istio generates for it, each host as written. Lookups are
//! case-insensitive and ignore the trailing dot.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::proxy::{config::Config, route::service_domains};

/// The addresses of one name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Addresses {
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
}

/// Name → addresses, plus the search domains a pod's resolver appends to short names.
#[derive(Debug, Default)]
pub struct Table {
    names: HashMap<String, Addresses>,
    /// `<ns>.svc.<domain>`, `svc.<domain>`, `<domain>`: what glibc appends to a short name
    /// (Kubernetes' resolv.conf `search` line), longest first.
    search: Vec<String>,
}

impl Table {
    pub fn build(config: &Config) -> Self {
        let ns = config.namespace.0.to_ascii_lowercase();
        let domain = config
            .cluster_domain
            .0
            .trim_matches('.')
            .to_ascii_lowercase();
        let mut names: HashMap<String, Addresses> = HashMap::new();
        let mut add = |name: &str, addrs: &[IpAddr]| {
            let entry = names
                .entry(name.trim_end_matches('.').to_ascii_lowercase())
                .or_default();
            for ip in addrs {
                match ip {
                    IpAddr::V4(v4) if !entry.v4.contains(v4) => entry.v4.push(*v4),
                    IpAddr::V6(v6) if !entry.v6.contains(v6) => entry.v6.push(*v6),
                    _ => {}
                }
            }
        };
        for svc in &config.dns.services {
            let service = svc.name.trim_end_matches('.').to_ascii_lowercase();
            // `reviews.default.svc.cluster.local` → `reviews.default`: service_domains takes
            // the first two labels as name and namespace.
            for name in service_domains(&service, &ns, &domain, 0)
                .iter()
                .filter(|n| !n.contains(':'))
            {
                add(name, &svc.addresses);
            }
        }
        for host in &config.dns.hosts {
            add(&host.name, &host.addresses);
        }
        let search = vec![
            format!("{ns}.svc.{domain}"),
            format!("svc.{domain}"),
            domain.clone(),
        ];
        Self { names, search }
    }

    /// The addresses of `name` (lower case, no trailing dot). A name the app's resolver built
    /// by appending a search domain to a known name (`reviews.default` + `default.svc.cluster.local`)
    /// is answered too, as Istio's DNS proxy does, so the first try of a search list hits.
    pub fn lookup(&self, name: &str) -> Option<&Addresses> {
        if let Some(a) = self.names.get(name) {
            return Some(a);
        }
        self.search.iter().find_map(|suffix| {
            let base = name.strip_suffix(suffix.as_str())?.strip_suffix('.')?;
            self.names.get(base)
        })
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(yaml: &str) -> Table {
        Table::build(&Config::parse("t", yaml).expect("valid"))
    }

    #[test]
    fn a_service_answers_every_name_istio_generates() {
        let t = table(
            "namespace: default\ndns:\n  services:\n  - name: reviews.default\n    addresses: [198.18.0.7, 'fd00:198:18::7']\n",
        );
        for name in [
            "reviews",
            "reviews.default",
            "reviews.default.svc",
            "reviews.default.svc.cluster",
            "reviews.default.svc.cluster.local",
        ] {
            let a = t.lookup(name).unwrap_or_else(|| panic!("{name}"));
            assert_eq!(a.v4, vec![Ipv4Addr::new(198, 18, 0, 7)]);
            assert_eq!(a.v6.len(), 1);
        }
        assert!(t.lookup("reviews.other").is_none());
        assert!(t.lookup("ratings").is_none());
    }

    #[test]
    fn short_name_only_in_the_same_namespace() {
        let t = table(
            "namespace: shop\ndns:\n  services:\n  - name: reviews.default.svc.cluster.local\n    addresses: [198.18.0.7]\n",
        );
        assert!(t.lookup("reviews").is_none());
        assert!(t.lookup("reviews.default").is_some());
        assert!(t.lookup("reviews.default.svc.cluster.local").is_some());
    }

    #[test]
    fn search_domain_expansions_of_known_names_are_answered() {
        let t = table(
            "dns:\n  services:\n  - name: reviews.default\n    addresses: [198.18.0.7]\n  hosts:\n  - name: Api.Example.com.\n    addresses: [198.18.0.9]\n",
        );
        // glibc with `search default.svc.cluster.local svc.cluster.local cluster.local`, ndots:5.
        assert!(t.lookup("reviews.default.svc.cluster.local").is_some());
        assert!(
            t.lookup("reviews.default.default.svc.cluster.local")
                .is_some()
        );
        assert!(t.lookup("reviews.default.svc.svc.cluster.local").is_some());
        assert!(t.lookup("api.example.com").is_some());
        assert!(
            t.lookup("api.example.com.default.svc.cluster.local")
                .is_some()
        );
        assert!(t.lookup("example.com").is_none());
        assert!(t.lookup("xapi.example.com").is_none());
    }
}
