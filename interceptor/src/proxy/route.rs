//! Routing, compiled from the config: the original destination port picks a listener, `Host`
//! picks a virtual host (exact names first, then the longest `*.suffix`, then the longest
//! `prefix*`, then `*` — Envoy's order), the path and headers pick a route, and the route names a
//! cluster or a weighted split.

use std::{collections::HashMap, sync::Arc, time::Duration};

use http::HeaderMap;

use super::{
    cluster::Cluster,
    config::{self, Config, HeaderMatch, Protocol, RouteConfig},
    retry::RetryPolicy,
};

/// One outbound port's routing.
#[derive(Debug)]
pub struct Listener {
    pub port: u16,
    pub protocol: Protocol,
    exact: HashMap<String, usize>,
    /// `*.suffix` domains as `.suffix`, longest first.
    suffixes: Vec<(String, usize)>,
    /// `prefix*` domains as `prefix`, longest first.
    prefixes: Vec<(String, usize)>,
    any: Option<usize>,
    pub virtual_hosts: Vec<VirtualHost>,
}

#[derive(Debug)]
pub struct VirtualHost {
    pub name: String,
    /// Every domain it answers, expanded (for `/config_dump` and debugging).
    pub domains: Vec<String>,
    pub routes: Vec<Route>,
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    path: PathMatch,
    headers: Vec<HeaderMatch>,
    pub action: Arc<RouteAction>,
}

#[derive(Debug)]
enum PathMatch {
    Any,
    Prefix(String),
    Exact(String),
    Regex(config::Regex),
}

/// What to do with a matched request.
#[derive(Debug)]
pub struct RouteAction {
    pub target: Target,
    pub timeout: Option<Duration>,
    pub retry: RetryPolicy,
    /// `Upgrade` protocols allowed (lower case).
    pub upgrades: Vec<String>,
}

#[derive(Debug)]
pub enum Target {
    Cluster(Arc<Cluster>),
    /// (cumulative weight, cluster): pick with a uniform draw in [0, total).
    Weighted {
        total: u64,
        clusters: Vec<(u64, Arc<Cluster>)>,
    },
}

impl Target {
    /// The cluster for this request; `draw` is uniform in [0, 1).
    pub fn pick(&self, draw: f64) -> &Arc<Cluster> {
        match self {
            Target::Cluster(c) => c,
            Target::Weighted { total, clusters } => {
                let point = ((*total as f64) * draw) as u64;
                clusters
                    .iter()
                    .find(|(upto, _)| point < *upto)
                    .or(clusters.last())
                    .map(|(_, c)| c)
                    .unwrap_or_else(|| unreachable_empty())
            }
        }
    }
}

// Validation guarantees a weighted target has clusters; this keeps `pick` total without a
// panic path in the data plane.
#[cold]
fn unreachable_empty() -> &'static Arc<Cluster> {
    static FALLBACK: std::sync::OnceLock<Arc<Cluster>> = std::sync::OnceLock::new();
    FALLBACK.get_or_init(|| Arc::new(Cluster::blackhole()))
}

/// Expands a Kubernetes service name into the names Istio puts in a virtual host's domains.
pub fn service_domains(
    service: &str,
    namespace: &str,
    cluster_domain: &str,
    port: u16,
) -> Vec<String> {
    let parts: Vec<&str> = service.split('.').collect();
    let (name, ns) = match parts.as_slice() {
        [name] => (*name, namespace),
        [name, ns, ..] => (*name, *ns),
        [] => return Vec::new(),
    };
    let fqdn = format!("{name}.{ns}.svc.{cluster_domain}");
    let mut names = Vec::new();
    if ns == namespace {
        names.push(name.to_owned());
    }
    names.push(format!("{name}.{ns}"));
    names.push(format!("{name}.{ns}.svc"));
    // Every step from `.svc` to the FQDN (`svc.cluster`, `svc.cluster.local`).
    let mut acc = format!("{name}.{ns}.svc");
    for label in cluster_domain.split('.').filter(|l| !l.is_empty()) {
        acc = format!("{acc}.{label}");
        names.push(acc.clone());
    }
    if !names.contains(&fqdn) {
        names.push(fqdn);
    }
    let mut out = Vec::with_capacity(names.len() * 2);
    for n in names {
        out.push(format!("{n}:{port}"));
        out.push(n);
    }
    out
}

impl Listener {
    pub fn compile(
        config: &Config,
        listener: &config::ListenerConfig,
        clusters: &HashMap<String, Arc<Cluster>>,
    ) -> Self {
        let mut compiled = Self {
            port: listener.port,
            protocol: listener.declared(),
            exact: HashMap::new(),
            suffixes: Vec::new(),
            prefixes: Vec::new(),
            any: None,
            virtual_hosts: Vec::new(),
        };
        for (i, vh) in listener.virtual_hosts.iter().enumerate() {
            let mut domains: Vec<String> =
                vh.domains.iter().map(|d| d.to_ascii_lowercase()).collect();
            for s in &vh.services {
                domains.extend(service_domains(
                    &s.to_ascii_lowercase(),
                    &config.namespace.0,
                    &config.cluster_domain.0,
                    listener.port,
                ));
            }
            for d in &domains {
                if d == "*" {
                    compiled.any.get_or_insert(i);
                } else if let Some(suffix) = d.strip_prefix('*') {
                    compiled.suffixes.push((suffix.to_owned(), i));
                } else if let Some(prefix) = d.strip_suffix('*') {
                    compiled.prefixes.push((prefix.to_owned(), i));
                } else {
                    // The first virtual host to claim a name keeps it.
                    compiled.exact.entry(d.clone()).or_insert(i);
                }
            }
            let routes = vh
                .routes
                .iter()
                .enumerate()
                .map(|(r, route)| Route::compile(r, route, clusters))
                .collect();
            compiled.virtual_hosts.push(VirtualHost {
                name: vh.name.clone(),
                domains,
                routes,
            });
        }
        compiled
            .suffixes
            .sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        compiled
            .prefixes
            .sort_by_key(|p| std::cmp::Reverse(p.0.len()));
        compiled
    }

    /// The virtual host for a `Host` value (any case, with or without `:port`).
    pub fn virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        // Hosts are nearly always lower case already: no copy per request then.
        let lowered;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = host.to_ascii_lowercase();
            lowered.as_str()
        } else {
            host
        };
        let bare = strip_port(host);
        let candidates: &[&str] = if bare.len() == host.len() {
            &[host]
        } else {
            &[host, bare]
        };
        let found = candidates
            .iter()
            .find_map(|h| self.exact.get(*h))
            .or_else(|| {
                candidates.iter().find_map(|h| {
                    self.suffixes
                        .iter()
                        .find(|(s, _)| h.len() > s.len() && h.ends_with(s.as_str()))
                        .map(|(_, i)| i)
                })
            })
            .or_else(|| {
                candidates.iter().find_map(|h| {
                    self.prefixes
                        .iter()
                        .find(|(p, _)| h.starts_with(p.as_str()))
                        .map(|(_, i)| i)
                })
            })
            .or(self.any.as_ref());
        found.and_then(|i| self.virtual_hosts.get(*i))
    }
}

/// `host:port` → `host`; `[v6]:port` → `[v6]`; a bare IPv6 literal stays whole.
fn strip_port(host: &str) -> &str {
    if let Some(end) = host.rfind(']') {
        return &host[..=end];
    }
    match host.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

impl VirtualHost {
    /// The first route whose path and header matches hold.
    pub fn route(&self, path: &str, headers: &HeaderMap) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(path, headers))
    }
}

impl Route {
    fn compile(
        index: usize,
        route: &RouteConfig,
        clusters: &HashMap<String, Arc<Cluster>>,
    ) -> Self {
        let m = &route.matcher;
        let path = if let Some(p) = &m.prefix {
            PathMatch::Prefix(p.clone())
        } else if let Some(p) = &m.path {
            PathMatch::Exact(p.clone())
        } else if let Some(r) = &m.regex {
            PathMatch::Regex(r.clone())
        } else {
            PathMatch::Any
        };
        let a = &route.route;
        let lookup = |name: &str| {
            clusters
                .get(name)
                .cloned()
                .unwrap_or_else(|| Arc::new(Cluster::blackhole()))
        };
        let target = match &a.cluster {
            Some(name) => Target::Cluster(lookup(name)),
            None => {
                let mut acc = 0u64;
                let clusters = a
                    .weighted_clusters
                    .iter()
                    .filter(|w| w.weight > 0)
                    .map(|w| {
                        acc += u64::from(w.weight);
                        (acc, lookup(&w.cluster))
                    })
                    .collect();
                Target::Weighted {
                    total: acc,
                    clusters,
                }
            }
        };
        Self {
            name: route
                .name
                .clone()
                .unwrap_or_else(|| format!("route-{index}")),
            path,
            headers: m.headers.clone(),
            action: Arc::new(RouteAction {
                target,
                timeout: a.timeout.nonzero(),
                retry: RetryPolicy::from_config(&a.retry_policy),
                upgrades: a.upgrades.iter().map(|u| u.to_ascii_lowercase()).collect(),
            }),
        }
    }

    pub fn matches(&self, path_and_query: &str, headers: &HeaderMap) -> bool {
        // Envoy matches the path without the query string.
        let path = path_and_query
            .split_once('?')
            .map_or(path_and_query, |(p, _)| p);
        let path_ok = match &self.path {
            PathMatch::Any => true,
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Exact(p) => path == p,
            PathMatch::Regex(r) => r.is_match(path),
        };
        path_ok && self.headers.iter().all(|h| header_matches(h, headers))
    }
}

fn header_matches(m: &HeaderMatch, headers: &HeaderMap) -> bool {
    let value = headers
        .get_all(m.name.as_str())
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>();
    let joined = value.join(",");
    let present = !value.is_empty();
    let result = if let Some(want) = m.present {
        present == want
    } else if let Some(e) = &m.exact {
        present && joined == *e
    } else if let Some(p) = &m.prefix {
        present && joined.starts_with(p.as_str())
    } else if let Some(r) = &m.regex {
        present && r.is_match(&joined)
    } else {
        present
    };
    result != m.invert
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;
    use crate::proxy::cluster::ClusterSet;

    const BOOKINFO: &str = r#"
namespace: default
clusters:
  - {name: reviews-v1, endpoints: ["127.0.0.1:1"]}
  - {name: reviews-v2, endpoints: ["127.0.0.1:2"]}
  - {name: reviews-v3, endpoints: ["127.0.0.1:3"]}
  - {name: wild, endpoints: ["127.0.0.1:4"]}
  - {name: ip, endpoints: ["127.0.0.1:5"]}
outbound:
  listeners:
    - port: 9080
      virtual_hosts:
        - name: reviews
          services: [reviews.default.svc.cluster.local]
          routes:
            - match: {prefix: /, headers: [{name: end-user, exact: jason}]}
              route: {cluster: reviews-v2}
            - match: {regex: "/reviews/[0-9]+"}
              route:
                weighted_clusters: [{cluster: reviews-v1, weight: 50}, {cluster: reviews-v3, weight: 50}]
            - match: {path: /exact}
              route: {cluster: reviews-v3}
            - route: {cluster: reviews-v1}
        - name: wildcard
          domains: ["*.example.com", "api.*"]
          routes: [{route: {cluster: wild}}]
        - name: by-ip
          domains: ["10.98.49.62", "10.98.49.62:9080"]
          routes: [{route: {cluster: ip}}]
"#;

    fn listener() -> Listener {
        let config = Config::parse("t", BOOKINFO).expect("valid");
        let clusters = ClusterSet::build(&config, None, &Default::default());
        Listener::compile(&config, &config.outbound.listeners[0], &clusters.by_name)
    }

    fn cluster_for(l: &Listener, host: &str, path: &str, headers: &HeaderMap) -> Option<String> {
        let vh = l.virtual_host(host)?;
        let route = vh.route(path, headers)?;
        Some(route.action.target.pick(0.0).name.clone())
    }

    #[test]
    fn the_articles_short_names_all_match() {
        let l = listener();
        for host in [
            "reviews",
            "reviews:9080",
            "reviews.default",
            "reviews.default:9080",
            "reviews.default.svc",
            "reviews.default.svc.cluster",
            "reviews.default.svc.cluster.local",
            "REVIEWS.default.svc.cluster.local:9080",
        ] {
            assert_eq!(
                l.virtual_host(host).map(|v| v.name.as_str()),
                Some("reviews"),
                "{host}"
            );
        }
        assert!(l.virtual_host("ratings").is_none());
        assert!(l.virtual_host("reviews.other").is_none());
    }

    #[test]
    fn short_name_only_in_the_same_namespace() {
        let d = service_domains("reviews.other", "default", "cluster.local", 9080);
        assert!(!d.contains(&"reviews".to_owned()));
        assert!(d.contains(&"reviews.other".to_owned()));
        assert!(d.contains(&"reviews.other.svc.cluster.local:9080".to_owned()));
    }

    #[test]
    fn wildcards_and_ips() {
        let l = listener();
        let h = HeaderMap::new();
        assert_eq!(
            cluster_for(&l, "a.example.com", "/", &h).as_deref(),
            Some("wild")
        );
        assert_eq!(
            cluster_for(&l, "a.example.com:80", "/", &h).as_deref(),
            Some("wild")
        );
        assert_eq!(cluster_for(&l, "example.com", "/", &h), None);
        assert_eq!(
            cluster_for(&l, "api.internal", "/", &h).as_deref(),
            Some("wild")
        );
        assert_eq!(
            cluster_for(&l, "10.98.49.62:9080", "/", &h).as_deref(),
            Some("ip")
        );
        assert_eq!(
            cluster_for(&l, "10.98.49.62", "/", &h).as_deref(),
            Some("ip")
        );
    }

    #[test]
    fn routes_match_in_order_by_path_and_headers() {
        let l = listener();
        let mut jason = HeaderMap::new();
        jason.insert("end-user", HeaderValue::from_static("jason"));
        let none = HeaderMap::new();
        assert_eq!(
            cluster_for(&l, "reviews", "/x", &jason).as_deref(),
            Some("reviews-v2")
        );
        assert_eq!(
            cluster_for(&l, "reviews", "/exact", &none).as_deref(),
            Some("reviews-v3")
        );
        assert_eq!(
            cluster_for(&l, "reviews", "/exact/more", &none).as_deref(),
            Some("reviews-v1")
        );
        assert_eq!(
            cluster_for(&l, "reviews", "/exact?q=1", &none).as_deref(),
            Some("reviews-v3")
        );
        // The regex is anchored: the whole path must match.
        let vh = l.virtual_host("reviews").expect("vh");
        let weighted = vh.route("/reviews/12", &none).expect("route");
        assert!(matches!(weighted.action.target, Target::Weighted { .. }));
        assert_eq!(vh.route("/reviews/12x", &none).expect("r").name, "route-3");
    }

    #[test]
    fn weighted_pick_follows_the_cumulative_weights() {
        let l = listener();
        let vh = l.virtual_host("reviews").expect("vh");
        let t = &vh
            .route("/reviews/1", &HeaderMap::new())
            .expect("r")
            .action
            .target;
        assert_eq!(t.pick(0.0).name, "reviews-v1");
        assert_eq!(t.pick(0.49).name, "reviews-v1");
        assert_eq!(t.pick(0.5).name, "reviews-v3");
        assert_eq!(t.pick(0.999).name, "reviews-v3");
    }

    #[test]
    fn ports_are_stripped_correctly() {
        assert_eq!(strip_port("a:80"), "a");
        assert_eq!(strip_port("a"), "a");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("::1"), "::1");
    }
}
