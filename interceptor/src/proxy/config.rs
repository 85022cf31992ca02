//! The proxy's routing configuration: one YAML file (`--config`), the shape of Envoy's listener →
//! virtual host → route → cluster model, reduced to what a sidecar needs. Every field has a
//! default, so an empty file (or no file) is valid: every destination goes to the passthrough
//! (original destination) cluster.
//!
//! Errors point at the place to fix: syntax and type errors carry the YAML line and column
//! (serde_yaml_ng), cross-references (a route naming a cluster that does not exist) the field path.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::SocketAddr,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A syntax or type error; the message carries the field path and line/column.
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: String,
        field: String,
        message: String,
    },
}

/// The whole file. Serialized back (with every default filled in) by `/config_dump`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Namespace of the pod this sidecar serves: a service in the same namespace is also
    /// reachable by its short name (`reviews`), as Istio's generated domains allow.
    pub namespace: Namespace,
    /// Cluster DNS suffix (`svc.cluster.local` names).
    pub cluster_domain: ClusterDomain,
    pub limits: Limits,
    pub outbound: Outbound,
    pub inbound: Inbound,
    pub clusters: Vec<ClusterConfig>,
    /// The DNS proxy (15053): names answered locally, cache and upstream limits.
    pub dns: DnsConfig,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Namespace(pub String);

impl Default for Namespace {
    fn default() -> Self {
        Self("default".into())
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct ClusterDomain(pub String);

impl Default for ClusterDomain {
    fn default() -> Self {
        Self("cluster.local".into())
    }
}

/// Limits that protect the proxy from its clients.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Request head size (request line + headers); larger → 431.
    pub max_request_headers_kb: u32,
    /// Most headers in one request; more → 431.
    pub max_request_headers: u32,
    /// Request body size; larger → 413. 0 = no limit (bodies stream).
    pub max_request_body_bytes: u64,
    /// Bodies up to this size are buffered so the request can be retried; larger ones stream
    /// and are not retried.
    pub retry_buffer_bytes: u64,
    /// A client must send a complete request head within this time (slowloris) → connection
    /// closed.
    pub header_read_timeout: Dur,
    /// How long the proxy waits for a client's first bytes to tell HTTP from other protocols;
    /// then the connection is proxied as TCP (server-first protocols such as MySQL land here).
    /// 0 = wait for the client however long it takes (current Istio's default; declare
    /// server-first ports `protocol: tcp` then). Too short a wait turns a slow HTTP client into
    /// TCP on a loaded node, silently bypassing its routes.
    pub protocol_detection_timeout: Dur,
    /// A downstream HTTP/2 connection with no open stream for this long is closed with a
    /// GOAWAY (Envoy's HTTP `idle_timeout`, 1 h in Istio); this also ends a client that sends
    /// the preface and then nothing. 0 = never.
    pub idle_timeout: Dur,
    /// A TCP-proxied connection with no bytes either way for this long is closed (Istio's
    /// default: 1 h); listeners and inbound ports can set their own. 0 = never.
    pub tcp_idle_timeout: Dur,
    /// HTTP/2 clients: a PING every this often, and the connection is closed when one is not
    /// answered within `h2_keepalive_timeout`. 0 = no pings.
    pub h2_keepalive_interval: Dur,
    pub h2_keepalive_timeout: Dur,
    /// HTTP/2 upstreams: the same, while a stream waits on the connection. 0 (the default, as
    /// Envoy's) = no pings: a server enforces a minimum interval — grpc-go's is 5 minutes, and
    /// pings more often on a quiet long-lived stream get `GOAWAY(ENHANCE_YOUR_CALM,
    /// "too_many_pings")`, failing the streams. Upstream h2 sockets have TCP keep-alive instead
    /// (probes after `h2_keepalive_interval` idle), which finds a vanished peer without the
    /// server's h2 stack seeing anything. Set this at or above the upstream's minimum.
    pub h2_upstream_keepalive_interval: Dur,
    /// Streams one downstream HTTP/2 client may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub h2_max_concurrent_streams: u32,
    /// Streams a client may open and reset before the proxy accepts them, and streams the
    /// proxy may reset for a client's protocol errors, before the connection is closed with
    /// ENHANCE_YOUR_CALM (the HTTP/2 "rapid reset" attack class).
    pub h2_max_pending_accept_reset_streams: u32,
    pub h2_max_local_error_reset_streams: u32,
    /// Upstream HTTP/2: at most this many requests on one connection at once (and never more
    /// than the peer's SETTINGS_MAX_CONCURRENT_STREAMS); a new connection is opened beyond.
    pub h2_max_requests_per_connection: u32,
    /// Connections open at once on each capture listener; more are closed at accept (counted
    /// and logged). 0 = no cap.
    pub max_connections_per_listener: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_headers_kb: 60,
            max_request_headers: 100,
            max_request_body_bytes: 0,
            retry_buffer_bytes: 64 * 1024,
            header_read_timeout: Dur::secs(10),
            protocol_detection_timeout: Dur::secs(5),
            idle_timeout: Dur::secs(3600),
            tcp_idle_timeout: Dur::secs(3600),
            h2_keepalive_interval: Dur::secs(60),
            h2_keepalive_timeout: Dur::secs(20),
            h2_upstream_keepalive_interval: Dur::secs(0),
            h2_max_concurrent_streams: 1024,
            h2_max_pending_accept_reset_streams: 20,
            h2_max_local_error_reset_streams: 100,
            h2_max_requests_per_connection: 100,
            max_connections_per_listener: 65536,
        }
    }
}

/// Outbound (15001): routes by the original destination port, then by `Host`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Outbound {
    /// The cluster for destinations no listener or virtual host claims: the original
    /// destination itself (Istio's `PassthroughCluster`, outbound traffic policy ALLOW_ANY).
    pub passthrough: Passthrough,
    pub listeners: Vec<ListenerConfig>,
}

/// Settings of an original-destination cluster.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Passthrough {
    /// Defaults to `--connect-timeout`.
    pub connect_timeout: Option<Dur>,
    /// Idle pooled upstream connections close after this.
    pub idle_timeout: Option<Dur>,
    /// Request timeout for passthrough requests; 0 = none (Istio's default).
    pub timeout: Option<Dur>,
}

/// Inbound (15006): every request goes to the original destination (the app) from 127.0.0.6.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Inbound {
    #[serde(flatten)]
    pub cluster: Passthrough,
    /// The protocol of every port not listed in `ports`: `auto` (detect; an h2c request goes
    /// to the app as h2c, an HTTP/1.1 one as HTTP/1.1) or one of Istio's protocol names.
    pub protocol: Protocol,
    /// The pod's ports that declare a protocol, as a Service port does (`name` prefix or
    /// `app_protocol`).
    pub ports: Vec<PortConfig>,
}

impl Inbound {
    /// The declared protocol of an inbound port.
    pub fn protocol_of(&self, port: u16) -> Protocol {
        self.ports
            .iter()
            .find(|p| p.port == port)
            .map_or(self.protocol, PortConfig::declared)
    }

    /// The TCP idle timeout of an inbound port, if it sets one.
    pub fn idle_timeout_of(&self, port: u16) -> Option<Dur> {
        self.ports
            .iter()
            .find(|p| p.port == port)
            .and_then(|p| p.tcp_idle_timeout)
    }
}

/// What a port speaks, named as Istio names it (a Service port's `name` prefix or its
/// `appProtocol`): this decides detection and the upstream protocol.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Sniff the first bytes: HTTP/1.x and h2c prior knowledge are routed (upstream in the
    /// protocol the client spoke, Envoy's USE_DOWNSTREAM_PROTOCOL), the rest is TCP.
    #[default]
    Auto,
    /// HTTP/1.1 upstream (an h2c client's requests are sent as HTTP/1.1).
    Http,
    /// h2c prior knowledge upstream, whatever the client spoke.
    Http2,
    #[serde(rename = "h2c")]
    H2c,
    Grpc,
    #[serde(rename = "grpc-web")]
    GrpcWeb,
    Tcp,
}

/// Upstream protocol of a cluster.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// The protocol the downstream request came in (Envoy's USE_DOWNSTREAM_PROTOCOL), unless
    /// the port declares one.
    #[default]
    Auto,
    Http1,
    /// h2c prior knowledge.
    Http2,
}

impl Protocol {
    /// Istio's protocol selection by a Service port name (`grpc-api`, `http2`, `tcp-db`) or
    /// an `appProtocol` value; anything else is detected.
    pub fn from_istio_name(name: &str) -> Self {
        let name = name.to_ascii_lowercase();
        // `grpc-web` before the `grpc` prefix it contains.
        if name == "grpc-web" || name.starts_with("grpc-web-") {
            return Self::GrpcWeb;
        }
        let prefix = name.split('-').next().unwrap_or_default();
        match prefix {
            "grpc" => Self::Grpc,
            "http2" => Self::Http2,
            "h2c" => Self::H2c,
            "http" => Self::Http,
            // Istio's TCP-like names: proxied as bytes.
            "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" => Self::Tcp,
            _ => Self::Auto,
        }
    }

    /// Whether requests on this port are HTTP (parsed, routed) whatever detection says.
    pub fn is_http(self) -> bool {
        matches!(
            self,
            Self::Http | Self::Http2 | Self::H2c | Self::Grpc | Self::GrpcWeb
        )
    }

    /// The upstream protocol this port declares, if any.
    pub fn upstream(self) -> UpstreamProtocol {
        match self {
            Self::Http => UpstreamProtocol::Http1,
            Self::Http2 | Self::H2c | Self::Grpc | Self::GrpcWeb => UpstreamProtocol::Http2,
            Self::Auto | Self::Tcp => UpstreamProtocol::Auto,
        }
    }
}

/// A port's declared protocol: `protocol` if set, else Istio's `app_protocol`, else the
/// port `name`'s prefix, else detection.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    pub port: u16,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub app_protocol: Option<String>,
    #[serde(default)]
    pub protocol: Protocol,
    /// A TCP connection with no bytes either way for this long is closed (default
    /// `limits.tcp_idle_timeout`).
    #[serde(default)]
    pub tcp_idle_timeout: Option<Dur>,
}

impl PortConfig {
    pub fn declared(&self) -> Protocol {
        declared(
            self.protocol,
            self.name.as_deref(),
            self.app_protocol.as_deref(),
        )
    }
}

fn declared(protocol: Protocol, name: Option<&str>, app_protocol: Option<&str>) -> Protocol {
    if protocol != Protocol::Auto {
        return protocol;
    }
    if let Some(p) = app_protocol.map(Protocol::from_istio_name)
        && p != Protocol::Auto
    {
        return p;
    }
    name.map_or(Protocol::Auto, Protocol::from_istio_name)
}

/// Outbound traffic to one destination port (Istio's `0.0.0.0_9080` listener + route `9080`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub port: u16,
    /// `auto` (detect) or one of Istio's protocol names (`http`, `http2`, `h2c`, `grpc`,
    /// `grpc-web`, `tcp`).
    #[serde(default)]
    pub protocol: Protocol,
    /// The Service port name (Istio: its prefix declares the protocol, e.g. `grpc-api`).
    #[serde(default)]
    pub name: Option<String>,
    /// The Service port's `appProtocol` (wins over the name).
    #[serde(default)]
    pub app_protocol: Option<String>,
    /// TCP connections to this port idle this long are closed (default
    /// `limits.tcp_idle_timeout`).
    #[serde(default)]
    pub tcp_idle_timeout: Option<Dur>,
    #[serde(default)]
    pub virtual_hosts: Vec<VirtualHostConfig>,
}

impl ListenerConfig {
    pub fn declared(&self) -> Protocol {
        declared(
            self.protocol,
            self.name.as_deref(),
            self.app_protocol.as_deref(),
        )
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VirtualHostConfig {
    pub name: String,
    /// `Host` values this virtual host answers: exact (`reviews:9080`), `*.suffix`, `prefix*`,
    /// an IP or IP:port, or `*`. Matching ignores case; a `Host` with a port also matches a
    /// domain without one.
    #[serde(default)]
    pub domains: Vec<String>,
    /// Kubernetes services (`reviews.default.svc.cluster.local` or `reviews.default`): adds every
    /// name Istio generates for it — `reviews` (same namespace only), `reviews.default`,
    /// `reviews.default.svc`, `reviews.default.svc.cluster`, the FQDN — each with and without
    /// `:port`.
    #[serde(default)]
    pub services: Vec<String>,
    pub routes: Vec<RouteConfig>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(rename = "match", default)]
    pub matcher: RouteMatch,
    pub route: RouteAction,
}

/// Path match (at most one of `prefix`, `path`, `regex`; none = every path) and header matches
/// (all must hold).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RouteMatch {
    pub prefix: Option<String>,
    pub path: Option<String>,
    /// Whole-path match (anchored, like Envoy's `safe_regex`).
    pub regex: Option<Regex>,
    pub headers: Vec<HeaderMatch>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub regex: Option<Regex>,
    /// `true`: the header must be there; `false`: it must not.
    #[serde(default)]
    pub present: Option<bool>,
    #[serde(default)]
    pub invert: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteAction {
    #[serde(default)]
    pub cluster: Option<String>,
    /// Canary splits: one cluster is picked per request, with probability weight / total.
    #[serde(default)]
    pub weighted_clusters: Vec<WeightedCluster>,
    /// Whole-request timeout, retries included; 0 = none. → 504.
    #[serde(default)]
    pub timeout: Dur,
    #[serde(default)]
    pub retry_policy: RetryPolicyConfig,
    /// HTTP/1.1 `Upgrade` protocols this route lets through (Envoy's `upgrade_configs`; Istio
    /// allows `websocket` everywhere). Others get 403.
    #[serde(default = "default_upgrades")]
    pub upgrades: Vec<String>,
}

fn default_upgrades() -> Vec<String> {
    vec!["websocket".into()]
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WeightedCluster {
    pub cluster: String,
    pub weight: u32,
}

/// Envoy's retry policy. The default is the one Istio puts on every HTTP route (shown in the
/// article): 2 retries on connect-failure, refused-stream, unavailable, cancelled,
/// resource-exhausted and 503, never on the host that just failed.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicyConfig {
    /// Comma-separated: connect-failure, refused-stream, reset, 5xx, gateway-error,
    /// retriable-4xx, retriable-status-codes, and the gRPC ones (cancelled, deadline-exceeded,
    /// internal, resource-exhausted, unavailable).
    pub retry_on: String,
    pub num_retries: u32,
    pub retriable_status_codes: Vec<u16>,
    /// `envoy.retry_host_predicates.previous_hosts`: a retry avoids endpoints already tried.
    pub previous_hosts: bool,
    /// How many times endpoint selection is redone to satisfy `previous_hosts`.
    pub host_selection_retry_max_attempts: u32,
    /// Timeout of each attempt; 0 = only the route timeout.
    pub per_try_timeout: Dur,
    /// Jittered exponential backoff between attempts (Envoy: 25 ms base, 10× max).
    pub base_interval: Dur,
    pub max_interval: Dur,
}

impl Default for RetryPolicyConfig {
    fn default() -> Self {
        Self {
            retry_on: "connect-failure,refused-stream,unavailable,cancelled,resource-exhausted,\
                       retriable-status-codes"
                .into(),
            num_retries: 2,
            retriable_status_codes: vec![503],
            previous_hosts: true,
            host_selection_retry_max_attempts: 5,
            per_try_timeout: Dur::ZERO,
            base_interval: Dur::millis(25),
            max_interval: Dur::millis(250),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub name: String,
    /// Static endpoints (IP:port).
    pub endpoints: Vec<SocketAddr>,
    #[serde(default)]
    pub lb_policy: LbPolicy,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    /// Idle pooled upstream connections close after this.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Dur,
    #[serde(default)]
    pub outlier_detection: OutlierConfig,
    /// `http1`, `http2` (h2c prior knowledge) or `auto` (the port's declared protocol, else the
    /// downstream's).
    #[serde(default)]
    pub protocol: UpstreamProtocol,
}

fn default_connect_timeout() -> Dur {
    Dur::secs(10)
}

/// Pooled upstream connections close after this long idle, unless a cluster says otherwise.
pub const DEFAULT_IDLE_TIMEOUT: Dur = Dur::secs(90);

fn default_idle_timeout() -> Dur {
    DEFAULT_IDLE_TIMEOUT
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    /// Power of two choices on in-flight requests (Envoy's LEAST_REQUEST).
    LeastRequest,
}

/// Ejects an endpoint after `consecutive_errors` failures in a row (5xx or no connection) for
/// `base_ejection_time` × times ejected, keeping at most `max_ejection_percent` of the
/// endpoints out (at least one may always go).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    pub consecutive_errors: u32,
    pub base_ejection_time: Dur,
    pub max_ejection_time: Dur,
    pub max_ejection_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_errors: 5,
            base_ejection_time: Dur::secs(30),
            max_ejection_time: Dur::secs(300),
            max_ejection_percent: 10,
        }
    }
}

/// What the DNS proxy answers itself (Istio's name table: services and ServiceEntry hosts) and
/// how it forwards the rest.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Kubernetes services (`reviews.default` or the FQDN): answered under every name Istio
    /// generates — `reviews` (same namespace only), `reviews.default`, `reviews.default.svc`,
    /// …, the FQDN.
    pub services: Vec<DnsHost>,
    /// Other host names (ServiceEntry hosts such as `api.example.com`), answered as written.
    pub hosts: Vec<DnsHost>,
    /// TTL of the locally answered records.
    pub ttl: Dur,
    /// Most forwarded answers kept; 0 = no cache.
    pub cache_entries: u32,
    /// A cached answer is kept for its smallest TTL, at most this long.
    pub max_cache_ttl: Dur,
    /// Time to get an upstream answer (all nameservers together); then SERVFAIL.
    pub upstream_timeout: Dur,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            services: Vec::new(),
            hosts: Vec::new(),
            ttl: Dur::secs(30),
            cache_entries: 4096,
            max_cache_ttl: Dur::secs(300),
            upstream_timeout: Dur::secs(4),
        }
    }
}

/// A name and the addresses it resolves to (A for IPv4, AAAA for IPv6).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DnsHost {
    pub name: String,
    pub addresses: Vec<std::net::IpAddr>,
}

// === impl Config ===

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// Parses and validates YAML text; `origin` names it in errors.
    pub fn parse(origin: &str, text: &str) -> Result<Self, ConfigError> {
        // An empty document is the all-defaults config.
        let config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_yaml_ng::from_str(text).map_err(|err| ConfigError::Parse {
                path: origin.to_owned(),
                message: err.to_string(),
            })?
        };
        config.validate(origin)?;
        Ok(config)
    }

    /// Checks what types cannot: references, uniqueness, exclusive fields.
    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |field: String, message: String| ConfigError::Invalid {
            path: origin.to_owned(),
            field,
            message,
        };
        let mut names = HashSet::new();
        for (i, c) in self.clusters.iter().enumerate() {
            let field = format!("clusters[{i}]");
            if c.name.is_empty() {
                return Err(invalid(format!("{field}.name"), "must not be empty".into()));
            }
            if !names.insert(c.name.as_str()) {
                return Err(invalid(
                    format!("{field}.name"),
                    format!("cluster {:?} is defined twice", c.name),
                ));
            }
            if c.endpoints.is_empty() {
                return Err(invalid(
                    format!("{field}.endpoints"),
                    format!("cluster {:?} needs at least one endpoint (IP:port)", c.name),
                ));
            }
            if c.connect_timeout.0.is_zero() {
                return Err(invalid(
                    format!("{field}.connect_timeout"),
                    "must be more than 0".into(),
                ));
            }
            if c.outlier_detection.max_ejection_percent > 100 {
                return Err(invalid(
                    format!("{field}.outlier_detection.max_ejection_percent"),
                    "is a percentage (0-100)".into(),
                ));
            }
        }
        self.dns.validate().map_err(|(f, m)| invalid(f, m))?;
        let mut ports = HashSet::new();
        for (l, listener) in self.outbound.listeners.iter().enumerate() {
            let lf = format!("outbound.listeners[{l}]");
            if !ports.insert(listener.port) {
                return Err(invalid(
                    format!("{lf}.port"),
                    format!("port {} has two listeners; merge them", listener.port),
                ));
            }
            let mut domains = HashSet::new();
            for (v, vhost) in listener.virtual_hosts.iter().enumerate() {
                let vf = format!("{lf}.virtual_hosts[{v}]");
                if vhost.domains.is_empty() && vhost.services.is_empty() {
                    return Err(invalid(
                        format!("{vf}.domains"),
                        "a virtual host needs `domains` or `services`".into(),
                    ));
                }
                for (d, domain) in vhost.domains.iter().enumerate() {
                    let df = format!("{vf}.domains[{d}]");
                    check_domain(domain).map_err(|m| invalid(df.clone(), m))?;
                    if !domains.insert(domain.to_ascii_lowercase()) {
                        return Err(invalid(
                            df,
                            format!("domain {domain:?} is in two virtual hosts of this port"),
                        ));
                    }
                }
                for (s, service) in vhost.services.iter().enumerate() {
                    if service.is_empty() || service.contains(['*', ':', '/']) {
                        return Err(invalid(
                            format!("{vf}.services[{s}]"),
                            format!(
                                "{service:?} is not a service name (e.g. reviews.default or \
                                 reviews.default.svc.cluster.local)"
                            ),
                        ));
                    }
                }
                if vhost.routes.is_empty() {
                    return Err(invalid(
                        format!("{vf}.routes"),
                        "a virtual host needs at least one route".into(),
                    ));
                }
                for (r, route) in vhost.routes.iter().enumerate() {
                    self.validate_route(&format!("{vf}.routes[{r}]"), route)
                        .map_err(|(f, m)| invalid(f, m))?;
                }
            }
        }
        Ok(())
    }

    fn validate_route(&self, rf: &str, route: &RouteConfig) -> Result<(), (String, String)> {
        let m = &route.matcher;
        let paths = [m.prefix.is_some(), m.path.is_some(), m.regex.is_some()];
        if paths.iter().filter(|p| **p).count() > 1 {
            return Err((
                format!("{rf}.match"),
                "use one of prefix, path, regex".into(),
            ));
        }
        for p in [&m.prefix, &m.path].into_iter().flatten() {
            if !p.starts_with('/') {
                return Err((format!("{rf}.match"), format!("{p:?} must start with '/'")));
            }
        }
        for (h, header) in m.headers.iter().enumerate() {
            let hf = format!("{rf}.match.headers[{h}]");
            if http::HeaderName::from_bytes(header.name.as_bytes()).is_err() {
                return Err((
                    format!("{hf}.name"),
                    format!("{:?} is not a header name", header.name),
                ));
            }
            let kinds = [
                header.exact.is_some(),
                header.prefix.is_some(),
                header.regex.is_some(),
                header.present.is_some(),
            ];
            if kinds.iter().filter(|k| **k).count() != 1 {
                return Err((
                    hf,
                    "use exactly one of exact, prefix, regex, present".into(),
                ));
            }
        }
        let a = &route.route;
        match (&a.cluster, a.weighted_clusters.is_empty()) {
            (Some(_), false) | (None, true) => {
                return Err((
                    format!("{rf}.route"),
                    "use exactly one of cluster, weighted_clusters".into(),
                ));
            }
            _ => {}
        }
        let known = |name: &str| self.clusters.iter().any(|c| c.name == name);
        if let Some(c) = &a.cluster
            && !known(c)
        {
            return Err((
                format!("{rf}.route.cluster"),
                format!("no cluster named {c:?} (define it under `clusters`)"),
            ));
        }
        for (w, wc) in a.weighted_clusters.iter().enumerate() {
            if !known(&wc.cluster) {
                return Err((
                    format!("{rf}.route.weighted_clusters[{w}].cluster"),
                    format!(
                        "no cluster named {:?} (define it under `clusters`)",
                        wc.cluster
                    ),
                ));
            }
        }
        if !a.weighted_clusters.is_empty()
            && a.weighted_clusters
                .iter()
                .map(|w| u64::from(w.weight))
                .sum::<u64>()
                == 0
        {
            return Err((
                format!("{rf}.route.weighted_clusters"),
                "weights add up to 0".into(),
            ));
        }
        crate::proxy::retry::RetryOn::parse(&a.retry_policy.retry_on)
            .map_err(|m| (format!("{rf}.route.retry_policy.retry_on"), m))?;
        for code in &a.retry_policy.retriable_status_codes {
            if !(100..=599).contains(code) {
                return Err((
                    format!("{rf}.route.retry_policy.retriable_status_codes"),
                    format!("{code} is not an HTTP status"),
                ));
            }
        }
        Ok(())
    }

    /// Fills in what defaults to the command line or to fixed values, so the config shows (and
    /// `/config_dump` serves) what actually runs.
    pub fn resolve(&mut self, connect_timeout: Duration) {
        for p in [&mut self.outbound.passthrough, &mut self.inbound.cluster] {
            p.connect_timeout.get_or_insert(Dur(connect_timeout));
            p.idle_timeout.get_or_insert(DEFAULT_IDLE_TIMEOUT);
            p.timeout.get_or_insert(Dur::ZERO);
        }
    }

    /// Every cluster by name.
    pub fn cluster_map(&self) -> BTreeMap<&str, &ClusterConfig> {
        self.clusters.iter().map(|c| (c.name.as_str(), c)).collect()
    }
}

impl DnsConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        for (list, hosts) in [("services", &self.services), ("hosts", &self.hosts)] {
            for (i, host) in hosts.iter().enumerate() {
                let field = format!("dns.{list}[{i}]");
                let name = host.name.trim_end_matches('.');
                let labels_ok = !name.is_empty()
                    && name.split('.').all(|l| {
                        !l.is_empty()
                            && l.len() <= 63
                            && l.bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    });
                if !labels_ok || name.len() > 253 {
                    return Err((
                        format!("{field}.name"),
                        format!("{:?} is not a DNS name (e.g. reviews.default)", host.name),
                    ));
                }
                if host.addresses.is_empty() {
                    return Err((
                        format!("{field}.addresses"),
                        format!("{:?} needs at least one address", host.name),
                    ));
                }
            }
        }
        if self.ttl.0.is_zero() {
            return Err(("dns.ttl".into(), "must be more than 0".into()));
        }
        if self.upstream_timeout.0.is_zero() {
            return Err(("dns.upstream_timeout".into(), "must be more than 0".into()));
        }
        Ok(())
    }
}

fn check_domain(domain: &str) -> Result<(), String> {
    if domain.is_empty() {
        return Err("empty domain".into());
    }
    let stars = domain.matches('*').count();
    let ok = domain == "*"
        || stars == 0
        || (stars == 1 && (domain.starts_with('*') || domain.ends_with('*')));
    if !ok {
        return Err(format!(
            "{domain:?}: a wildcard must be the whole domain, a leading `*.suffix` or a \
             trailing `prefix*`"
        ));
    }
    if domain.contains(|c: char| c.is_whitespace() || c == '/') {
        return Err(format!("{domain:?} is not a host name"));
    }
    Ok(())
}

/// A duration written as `250ms`, `1.5s`, `2m`, `1h` or a number of seconds. 0 means "none"
/// where a field says so.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    pub const ZERO: Dur = Dur(Duration::ZERO);
    /// The longest duration accepted: a year is already "forever" for any timeout, and bigger
    /// values would overflow deadlines computed as `Instant::now() + d`.
    pub const MAX: Dur = Dur(Duration::from_secs(365 * 24 * 3600));

    pub const fn secs(s: u64) -> Self {
        Self(Duration::from_secs(s))
    }

    pub const fn millis(ms: u64) -> Self {
        Self(Duration::from_millis(ms))
    }

    /// `None` for 0.
    pub fn nonzero(self) -> Option<Duration> {
        (!self.0.is_zero()).then_some(self.0)
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let value: f64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a duration (e.g. 250ms, 1.5s, 2m)"))?;
        let scale = match unit.trim() {
            "ms" => 1e-3,
            "s" | "" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "us" | "µs" => 1e-6,
            other => {
                return Err(format!("{s:?}: unknown unit {other:?} (use ms, s, m or h)"));
            }
        };
        Self::from_secs_f64(value * scale)
            .ok_or_else(|| format!("{s:?} is out of range (at most 8760h, one year)"))
    }

    /// `secs` as a duration, if it is one and at most [`Dur::MAX`].
    fn from_secs_f64(secs: f64) -> Option<Self> {
        Duration::try_from_secs_f64(secs)
            .ok()
            .filter(|d| *d <= Self::MAX.0)
            .map(Dur)
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_nanos() == 0 {
            write!(f, "{}s", d.as_secs())
        } else if d.as_nanos().is_multiple_of(1_000_000) {
            write!(f, "{}ms", d.as_millis())
        } else {
            write!(f, "{}s", d.as_secs_f64())
        }
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) if n >= 0.0 => Dur::from_secs_f64(n).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "{n} seconds is out of range (at most 31536000, one year)"
                ))
            }),
            Raw::Num(n) => Err(serde::de::Error::custom(format!(
                "{n} is negative; durations are >= 0"
            ))),
            Raw::Text(s) => Dur::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// A regex validated at load time (so a bad one is reported with its line), matched against
/// the whole value.
#[derive(Clone, Debug)]
pub struct Regex {
    pub source: String,
    pub anchored: regex::Regex,
}

impl PartialEq for Regex {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Regex {
    pub fn new(source: &str) -> Result<Self, regex::Error> {
        Ok(Self {
            source: source.to_owned(),
            anchored: regex::Regex::new(&format!("^(?:{source})$"))?,
        })
    }

    pub fn is_match(&self, s: &str) -> bool {
        self.anchored.is_match(s)
    }
}

impl Serialize for Regex {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for Regex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Regex::new(&s).map_err(|e| serde::de::Error::custom(format!("bad regex {s:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults() {
        let c = Config::parse("t", "").expect("valid");
        assert_eq!(c, Config::default());
        assert_eq!(c.namespace.0, "default");
        assert_eq!(c.limits.max_request_headers_kb, 60);
    }

    #[test]
    fn durations_parse_in_every_unit() {
        assert_eq!(Dur::parse("250ms"), Ok(Dur::millis(250)));
        assert_eq!(Dur::parse("1.5s"), Ok(Dur::millis(1500)));
        assert_eq!(Dur::parse("2m"), Ok(Dur::secs(120)));
        assert_eq!(Dur::parse("3"), Ok(Dur::secs(3)));
        assert!(Dur::parse("fast").is_err());
        assert!(Dur::parse("3 days").is_err());
        assert_eq!(Dur::millis(250).to_string(), "250ms");
        assert_eq!(Dur::secs(3).to_string(), "3s");
    }

    #[test]
    fn durations_past_a_year_are_refused_naming_where() {
        assert_eq!(Dur::parse("8760h"), Ok(Dur::MAX));
        assert!(Dur::parse("8761h").is_err());
        for value in ["10000h", "1e300", "18446744073709551615"] {
            let yaml = format!(
                "clusters:\n  - name: a\n    endpoints: [127.0.0.1:1]\n    connect_timeout: {value}\n"
            );
            let err = Config::parse("f.yaml", &yaml).expect_err(value).to_string();
            assert!(
                err.contains("clusters[0]") && err.contains("one year"),
                "{err}"
            );
        }
    }

    #[test]
    fn type_errors_name_the_line_and_field() {
        let yaml = "clusters:\n  - name: a\n    endpoints: [127.0.0.1:1]\n    conect_timeout: 1s\n";
        let err = Config::parse("f.yaml", yaml).expect_err("typo").to_string();
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("conect_timeout"), "{err}");
        let yaml = "clusters:\n  - name: a\n    endpoints: [nonsense]\n";
        let err = Config::parse("f.yaml", yaml)
            .expect_err("bad addr")
            .to_string();
        assert!(err.contains("line 3"), "{err}");
        let yaml = "outbound:\n  listeners:\n  - port: 80\n    virtual_hosts:\n    - name: a\n      domains: [a]\n      routes:\n      - match: {regex: '(unclosed'}\n        route: {cluster: x}\n";
        let err = Config::parse("f.yaml", yaml)
            .expect_err("bad regex")
            .to_string();
        assert!(err.contains("line 8") && err.contains("regex"), "{err}");
    }

    #[test]
    fn references_are_checked_with_the_field_path() {
        let yaml = r#"
clusters:
  - name: reviews-v1
    endpoints: ["127.0.0.1:9080"]
outbound:
  listeners:
    - port: 9080
      virtual_hosts:
        - name: reviews
          domains: [reviews]
          routes:
            - route:
                weighted_clusters:
                  - {cluster: reviews-v1, weight: 90}
                  - {cluster: reviews-v2, weight: 10}
"#;
        let err = Config::parse("f.yaml", yaml)
            .expect_err("unknown")
            .to_string();
        assert!(
            err.contains(
                "outbound.listeners[0].virtual_hosts[0].routes[0].route.weighted_clusters[1].cluster"
            ) && err.contains("reviews-v2"),
            "{err}"
        );
    }

    #[test]
    fn exclusive_fields_and_bad_retry_on_are_rejected() {
        let base = |route: &str| {
            format!(
                "clusters: [{{name: a, endpoints: ['127.0.0.1:1']}}]\noutbound:\n  listeners:\n  - port: 80\n    virtual_hosts:\n    - name: v\n      domains: ['*']\n      routes:\n      - {route}\n"
            )
        };
        assert!(Config::parse("f", &base("route: {cluster: a}")).is_ok());
        let both = base("{match: {prefix: /a, path: /b}, route: {cluster: a}}");
        assert!(Config::parse("f", &both).is_err());
        let none = base("route: {}");
        assert!(Config::parse("f", &none).is_err());
        let retry =
            base("route: {cluster: a, retry_policy: {retry_on: 'connect-failure,sometimes'}}");
        let err = Config::parse("f", &retry).expect_err("bad").to_string();
        assert!(
            err.contains("retry_on") && err.contains("sometimes"),
            "{err}"
        );
        let dup = "clusters: [{name: a, endpoints: ['127.0.0.1:1']}, {name: a, endpoints: ['127.0.0.1:2']}]";
        assert!(
            Config::parse("f", dup)
                .expect_err("dup")
                .to_string()
                .contains("clusters[1].name")
        );
    }

    #[test]
    fn the_committed_examples_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/proxy");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("examples/proxy") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "yaml") {
                Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(
            n >= 2,
            "expected the bookinfo examples in {}",
            dir.display()
        );
    }

    /// Hostile input: any config text is a config or an error naming where it came from,
    /// never a panic — raw text, and YAML of the right shape with wrong values.
    mod hostile {
        use proptest::prelude::*;

        use super::*;

        fn scalar() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<i64>().prop_map(|n| n.to_string()),
                any::<u64>().prop_map(|n| n.to_string()),
                Just("-1".to_owned()),
                Just("1e400".to_owned()),
                Just("~".to_owned()),
                Just("\"\"".to_owned()),
                "[0-9]{1,6}(ms|s|m|h|d|us|ns|x)?",
                "\"[ -~]{0,16}\"",
                "[a-z0-9.:/*-]{0,16}",
            ]
        }

        fn document() -> impl Strategy<Value = String> {
            (
                scalar(),
                scalar(),
                scalar(),
                scalar(),
                scalar(),
                scalar(),
                scalar(),
            )
                .prop_map(|(a, b, c, d, e, f, g)| {
                    // The shape of examples/proxy/grpc.yaml, every value hostile.
                    [
                        "clusters:".to_owned(),
                        format!("  - name: {a}"),
                        format!("    endpoints: [{b}]"),
                        format!("    protocol: {d}"),
                        format!("    lb_policy: {e}"),
                        format!("    connect_timeout: {c}"),
                        "outbound:".to_owned(),
                        "  listeners:".to_owned(),
                        format!("    - port: {g}"),
                        format!("      name: {e}"),
                        "      virtual_hosts:".to_owned(),
                        format!("        - name: {a}"),
                        format!("          services: [{e}]"),
                        "          routes:".to_owned(),
                        format!("            - match: {{prefix: {e}}}"),
                        format!(
                            "              route: {{cluster: {a}, timeout: {f}, \
                             retry_policy: {{retry_on: {d}, num_retries: {g}}}}}"
                        ),
                    ]
                    .join("\n")
                })
        }

        proptest! {
            #[test]
            fn any_text_is_a_config_or_an_error(text in prop_oneof![any::<String>(), document(), "[-:{}\\[\\],\\n a-z0-9]{0,200}"]) {
                if let Err(e) = Config::parse("hostile.yaml", &text) {
                    prop_assert!(e.to_string().contains("hostile.yaml"), "{e}");
                }
            }
        }
    }
}
