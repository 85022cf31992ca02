//! Names of maps and programs: the eBPF crate defines them, the agent finds them by these names.
//! Kept to 15 characters so `bpftool` shows what the code says.

pub mod map {
    pub const CONFIG: &str = "CONFIG";
    pub const ABI: &str = "ABI";
    pub const POD_CONFIG: &str = "POD_CONFIG";
    pub const POD_IPS: &str = "POD_IPS";
    pub const POD_PORTS: &str = "POD_PORTS";
    pub const CIDR_EXCLUDE: &str = "CIDR_EXCLUDE";
    pub const CIDR_INCLUDE: &str = "CIDR_INCLUDE";
    pub const POD_INFO: &str = "POD_INFO";
    pub const POD_LISTENER: &str = "POD_LISTENER";
    pub const POD_LISTENER6: &str = "POD_LISTENER6";
    pub const LISTENERS: &str = "LISTENERS";
    pub const COOKIE_ORIG: &str = "COOKIE_ORIG";
    pub const TUPLE_ORIG: &str = "TUPLE_ORIG";
    pub const SOCKS: &str = "SOCKS";
    pub const MSG_FALLBACK: &str = "MSG_FALLBACK";
    pub const PEER_SEQ: &str = "PEER_SEQ";
    pub const MSG_HISTORY: &str = "MSG_HISTORY";
    pub const CONN_MSGS: &str = "CONN_MSGS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const NETNS_PROBE: &str = "NETNS_PROBE";
    pub const EVENTS: &str = "EVENTS";
    pub const DNS_ORIG: &str = "DNS_ORIG";
    pub const COOKIE_PREV: &str = "COOKIE_PREV";
    pub const TUPLE_PREV: &str = "TUPLE_PREV";
    pub const DNS_PREV: &str = "DNS_PREV";

    /// The previous ABI's connection maps, as this ABI's programs see them (`layout::
    /// CONNECTION_MAPS`): bound to the old maps by an ABI migration, else one unused slot each.
    /// Not state of their own, so not in [`PINNED`] (never kept or converted by a migration):
    /// the migration's staging pins the old maps under these names in `maps_next/` before the
    /// object is loaded there, and they are pinned with the rest from then on (a fresh load
    /// pins the unused slots).
    pub const PREVIOUS: &[&str] = &[COOKIE_PREV, TUPLE_PREV, DNS_PREV];

    /// Every map the agent pins, in the order `status` reports them.
    pub const PINNED: &[&str] = &[
        CONFIG,
        ABI,
        POD_CONFIG,
        POD_IPS,
        POD_PORTS,
        CIDR_EXCLUDE,
        CIDR_INCLUDE,
        POD_INFO,
        POD_LISTENER,
        POD_LISTENER6,
        LISTENERS,
        COOKIE_ORIG,
        TUPLE_ORIG,
        SOCKS,
        MSG_FALLBACK,
        PEER_SEQ,
        COUNTERS,
        NETNS_PROBE,
        EVENTS,
        DNS_ORIG,
        MSG_HISTORY,
        CONN_MSGS,
    ];
}

pub mod prog {
    /// cgroup/connect4: redirect an app's connect to the proxy.
    pub const CONNECT4: &str = "redirect_conn4";
    /// cgroup/connect6: the same for IPv6 and dual-stack sockets.
    pub const CONNECT6: &str = "redirect_conn6";
    /// sockops: put both ends of intercepted local connections in the sockhash.
    pub const SOCKOPS: &str = "track_sockets";
    /// sk_msg: move bytes straight into the peer socket.
    pub const SK_MSG: &str = "msg_to_peer";
    /// cgroup/getsockopt: answer SO_ORIGINAL_DST.
    pub const GETSOCKOPT: &str = "orig_dst";
    /// sk_lookup: steer inbound connections to the proxy's inbound listener.
    pub const SK_LOOKUP: &str = "steer_inbound";
    /// cgroup/sendmsg4: an enabled pod's UDP DNS queries to the proxy's DNS port.
    pub const SENDMSG4: &str = "dns_query4";
    /// cgroup/sendmsg6: the same for IPv6 and dual-stack sockets.
    pub const SENDMSG6: &str = "dns_query6";
    /// cgroup/recvmsg4: the proxy's DNS replies carry the resolver's address as source.
    pub const RECVMSG4: &str = "dns_reply4";
    /// cgroup/recvmsg6: the same for IPv6 and dual-stack sockets.
    pub const RECVMSG6: &str = "dns_reply6";
    /// The DNS capture programs, attached together or not at all.
    pub const DNS: [&str; 4] = [SENDMSG4, SENDMSG6, RECVMSG4, RECVMSG6];
    /// Every program of the family, in the order status lists them (an upgrade swaps them in
    /// `layout::SWAP_ORDER`).
    pub const ALL: [&str; 10] = [
        CONNECT4, CONNECT6, SOCKOPS, GETSOCKOPT, SK_MSG, SK_LOOKUP, SENDMSG4, SENDMSG6, RECVMSG4,
        RECVMSG6,
    ];
}

/// Sizes of the maps. Sockets and connections are bounded by what a node runs at once.
pub mod size {
    /// Pods per node. Kubernetes' default is 110 and large nodes run a few hundred; 16384
    /// leaves room for the 10 000-pod benchmark (`cargo xtask bench scale`). An agent adopting
    /// maps pinned with another size uses theirs (`Maps::pod_capacity`).
    pub const PODS: u32 = 16384;
    /// Two addresses (IPv4 and IPv6) per pod.
    pub const POD_IPS: u32 = 2 * PODS;
    /// Istio's defaults take 6 rows per pod (the proxy's own ports, excluded inbound): 16 per
    /// pod leaves room for annotations' lists on every pod.
    pub const POD_PORTS: u32 = 16 * PODS;
    /// LPM tries allocate per entry: a size costs nothing until used.
    pub const CIDRS: u32 = 4 * PODS;
    pub const CONNECTIONS: u32 = 65536;
    /// (pod, destination port, hop kind) histories of the adaptive sk_msg policy (LRU).
    pub const HISTORIES: u32 = 16384;
    pub const SOCKETS: u32 = 131072;
    /// Listening sockets on the inbound port: a proxy may listen with one SO_REUSEPORT socket
    /// per worker and per family (Envoy), so several per pod.
    pub const LISTENERS: u32 = 4 * PODS;
    pub const PROBES: u32 = 1024;
    /// UDP sockets with a captured DNS query (LRU: a socket's entry outlives nothing but
    /// the socket's use; the oldest go first).
    pub const DNS_SOCKETS: u32 = 65536;
    pub const EVENTS_BYTES: u32 = 64 * 1024;
    /// What one pod may use of `CIDR_EXCLUDE` and of `CIDR_INCLUDE` (each): one pod's long
    /// list must not leave later pods without room (they would run unintercepted).
    pub const PER_POD_CIDRS: u32 = 256;
    /// What one pod may use of `POD_PORTS` (all four lists and the always-excluded ports).
    /// (Fixed, not a share of `POD_PORTS`: a node's map grew for more pods, not for longer
    /// lists.)
    pub const PER_POD_PORTS: u32 = 1024;
}

/// A UDP `connect()` to this address lets the agent learn a network namespace's cookie on
/// kernels without `SO_NETNS_COOKIE` (< 5.14): connect4 records it under the socket cookie. UDP
/// connect sends nothing. 127.255.255.254:65535.
pub const NETNS_PROBE_IP4: [u8; 4] = [127, 255, 255, 254];
pub const NETNS_PROBE_PORT: u16 = 65535;
