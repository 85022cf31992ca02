//! Indices of the per-CPU `COUNTERS` array: one counter per decision the programs take.

macro_rules! counters {
    ($($(#[cfg($cfg:meta)])? $(#[doc = $doc:literal])* $variant:ident = $name:literal,)+) => {
        /// A slot of the `COUNTERS` per-CPU array.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $($(#[cfg($cfg)])? $(#[doc = $doc])* $variant,)+
        }

        impl Counter {
            /// Every counter, in slot order.
            pub const ALL: &'static [Counter] = &[$($(#[cfg($cfg)])? Counter::$variant,)+];

            /// The name `interceptor status --json` reports under `counters`.
            pub const fn name(self) -> &'static str {
                match self {
                    $($(#[cfg($cfg)])? Counter::$variant => $name,)+
                }
            }

            /// What the counter counts (its doc comment), for `interceptor status`.
            pub const fn meaning(self) -> &'static str {
                match self {
                    $($(#[cfg($cfg)])? Counter::$variant => concat!($($doc),*),)+
                }
            }
        }
    };
}

counters! {
    /// connect rewritten to the proxy's outbound port.
    ConnectRedirected = "connect_redirected",
    /// The proxy's own connection (UID/GID): left alone.
    ConnectSkippedProxy = "connect_skipped_proxy",
    /// Destination on loopback: left alone (Istio rule 8).
    ConnectSkippedLoopback = "connect_skipped_loopback",
    /// Destination is the pod's own address: left alone (Istio rule 3).
    ConnectSkippedPodLocal = "connect_skipped_pod_local",
    /// Destination port excluded (`excludeOutboundPorts`).
    ConnectSkippedPort = "connect_skipped_port",
    /// Destination in an excluded CIDR (`excludeOutboundIPRanges`).
    ConnectSkippedCidr = "connect_skipped_cidr",
    /// Destination outside `includeOutboundIPRanges`.
    ConnectSkippedNotIncluded = "connect_skipped_not_included",
    /// The pod captures no outbound traffic.
    ConnectSkippedOutboundOff = "connect_skipped_outbound_off",
    /// Fail-open pod: a connect that could not be sent through the proxy went direct (see
    /// `connect_refused_source` for why it could not).
    ConnectSkippedSource = "connect_skipped_source",
    /// Fail-closed pod (the default): a connect that could not be sent through the proxy was
    /// refused (EPERM). On kernels < 5.15 (no network-namespace cookie in sockops, sk_msg and
    /// getsockopt) the app side must be bound to its pod's address to stay unique on the node:
    /// a socket already bound to a port or to loopback, or a pod without an address of that
    /// family, cannot be.
    ConnectRefusedSource = "connect_refused_source",
    /// Fail-open pod whose proxy is not listening (nothing on its loopback capture port, as the
    /// kernel sees it at connect time): the connect went direct. A fail-closed pod's connect
    /// is sent to the port anyway and refused there (ECONNREFUSED), as with iptables.
    ConnectNoProxyDirect = "connect_no_proxy_direct",
    /// Proxy passthrough connection (from 127.0.0.6) marked for the sockhash.
    ConnectPassthrough = "connect_passthrough",
    /// Proxy calling its own pod: sent to the inbound port.
    ConnectSelfInbound = "connect_self_inbound",
    /// Could not record the original destination (map full): connect refused, or left alone in
    /// a fail-open pod.
    ConnectMapFull = "connect_map_full",
    /// Socket of an intercepted connection added to the sockhash.
    SockhashInsert = "sockhash_insert",
    /// Adding a socket to the sockhash failed (map full or the socket belongs to another map).
    SockhashInsertFailed = "sockhash_insert_failed",
    /// Socket of a same-node pod→pod connection (both ends in enabled pods of this node, the
    /// port captured inbound by the server pod) added to the sockhash (kernels >= 5.15).
    PodToPodInsert = "pod_to_pod_insert",
    /// Socket between two pod addresses of this node left out of the sockhash: the socket is
    /// not in the namespace owning its address, a pod asked `--no-sockmap`, or the server
    /// pod does not capture the port (then the hop crosses the veths, as before).
    PodToPodSkipped = "pod_to_pod_skipped",
    /// Passive end of a pod→pod connection left out of the sockhash because no active end with
    /// the mirrored tuple and matching sequence numbers was recorded: a different connection
    /// that NAT (a Service address's DNAT with a remapped source port) gave the same tuple, a
    /// TCP Fast Open child (established before its client), or a client end not inserted.
    PodToPodUnproven = "pod_to_pod_unproven",
    /// Socket of an intercepted connection closed (it leaves the sockhash by itself).
    SockhashRemove = "sockhash_remove",
    /// A listener on the inbound port was put in the listener map.
    ListenerInsert = "listener_insert",
    /// A listener on the inbound port outside any enabled, inbound-capturing pod: not put in
    /// the listener map, agent not woken (kernels >= 5.15, which tell the namespace here).
    ListenerSkippedNotPod = "listener_skipped_not_pod",
    /// Message moved into the peer socket by `bpf_msg_redirect_hash`.
    MsgRedirected = "msg_redirected",
    /// Of `msg_redirected`: on a same-node pod→pod hop (sidecar to the other pod's sidecar).
    MsgRedirectedPodToPod = "msg_redirected_pod_to_pod",
    /// Peer socket missing from the sockhash: that direction falls back to TCP for good.
    MsgRedirectFailed = "msg_redirect_failed",
    /// Of `msg_redirect_failed`: on a same-node pod→pod hop (typically the client sidecar
    /// wrote before the server pod's end of the handshake was processed).
    MsgRedirectFailedPodToPod = "msg_redirect_failed_pod_to_pod",
    /// A direction fell back to TCP, so its reverse direction was moved to TCP too (a
    /// half-redirected connection is slower than plain TCP; redirect → TCP is order-safe).
    MsgFallbackReverse = "msg_fallback_reverse",
    /// Message sent over TCP on a direction that fell back (keeps bytes in order).
    MsgFallbackPass = "msg_fallback_pass",
    /// sk_msg redirect switched off in `CONFIG`: message sent over TCP.
    MsgRedirectDisabled = "msg_redirect_disabled",
    /// SO_ORIGINAL_DST answered for a redirected connection.
    OrigDstAnswered = "orig_dst_answered",
    /// SO_ORIGINAL_DST answered with the local address of an inbound connection to a pod.
    OrigDstLocal = "orig_dst_local",
    /// Inbound connection handed to the proxy's inbound listener.
    InboundAssigned = "inbound_assigned",
    /// Inbound port excluded or not included: left alone.
    InboundSkippedPort = "inbound_skipped_port",
    /// Inbound connection from inside the pod (loopback or its own address): left alone.
    InboundSkippedLocal = "inbound_skipped_local",
    /// No proxy listener known for the pod: refused, as Istio's REDIRECT to a closed port is.
    InboundNoListener = "inbound_no_listener",
    /// `bpf_sk_assign` failed (the listener closed): refused.
    InboundAssignFailed = "inbound_assign_failed",
    /// Fail-open pod without a live proxy listener: the inbound connection went to the app
    /// directly instead of being refused.
    InboundNoProxyDirect = "inbound_no_proxy_direct",
    /// Network-namespace cookie recorded for the agent's probe.
    NetnsProbe = "netns_probe",
    /// A pod refused because its lists exceed its share of a node-wide map (written by user
    /// space: the offending pod gets the error, other pods keep their room).
    PodQuotaExceeded = "pod_quota_exceeded",
    /// UDP DNS query (sendmsg to port 53 of a captured resolver) sent to the proxy's DNS port.
    DnsQueryRedirected = "dns_query_redirected",
    /// connect of a UDP socket to port 53 of a captured resolver sent to the proxy's DNS port
    /// (glibc, dig: connected sockets); TCP ones count as `dns_tcp_redirected`.
    DnsConnectRedirected = "dns_connect_redirected",
    /// TCP connect to port 53 of a captured resolver sent to the proxy's DNS port.
    DnsTcpRedirected = "dns_tcp_redirected",
    /// TCP connect to port 53 sent to the proxy's DNS port without a recorded destination (a
    /// source that is not pod-unique on kernels < 5.15): the DNS proxy forwards it to the
    /// pod's resolv.conf nameservers instead of the address the app asked.
    DnsTcpUnrecorded = "dns_tcp_unrecorded",
    /// The proxy's own DNS query or connect (UID/GID): left alone.
    DnsSkippedProxy = "dns_skipped_proxy",
    /// Port 53 to an address that is not one of the pod's nameservers (without capture-all):
    /// left alone, as istio-iptables' per-nameserver rules.
    DnsSkippedNotNameserver = "dns_skipped_not_nameserver",
    /// Reply from the proxy's DNS port given the resolver's address as its source (recvmsg).
    DnsReplyRewritten = "dns_reply_rewritten",
    /// Could not record the resolver of a UDP query (map update failed): the query went to
    /// the resolver directly, uncaptured.
    DnsMapFull = "dns_map_full",
    /// Connection established under sockops built with the `upgrade-probe` feature (a test
    /// build whose programs differ from the release's): proves an in-place upgrade attached the
    /// new code. Always 0 in a release build.
    UpgradeProbe = "upgrade_probe",
    /// `--msg-redirect-policy adaptive`: a new connection's pod and destination port had a
    /// history of recent connections (`MSG_HISTORY`) to decide by.
    MsgSetupHistoryHit = "msg_setup_history_hit",
    /// `--msg-redirect-policy adaptive`: no recent history for the connection's pod and
    /// destination port: it joined the sockhash (the default).
    MsgSetupHistoryMiss = "msg_setup_history_miss",
    /// Connection left on loopback TCP at setup (both ends out of the sockhash): its pod and
    /// port's recent connections closed after too few messages to pay for the psock setup.
    MsgSetupSkippedShortLived = "msg_setup_skipped_short_lived",
    /// Connection left on loopback TCP at setup because the node's TCP memory is under
    /// pressure (the agent watches /proc/net/sockstat; redirected bytes are not charged to the
    /// receiver's buffer).
    MsgSetupSkippedMemoryPressure = "msg_setup_skipped_memory_pressure",
    /// A decided connection recorded in `MSG_HISTORY` as short (closed with few messages).
    MsgHistoryShort = "msg_history_short",
    /// A decided connection recorded in `MSG_HISTORY` as long (carried enough messages).
    MsgHistoryLong = "msg_history_long",
    #[cfg(feature = "abi-probe")]
    /// Connection established under sockops built with the `abi-probe` feature (a test build
    /// whose ABI is one newer: this slot is its layout change). Proves an ABI migration attached
    /// the new code and the new `COUNTERS` map. Absent from a release build.
    AbiProbe = "abi_probe",
}

impl Counter {
    pub const COUNT: u32 = Counter::ALL.len() as u32;

    pub const fn index(self) -> u32 {
        self as u32
    }
}

/// `COUNTERS` as ABI 6 laid it out: slot `i` held the counter named `ABI6_SLOTS[i]`. An ABI
/// migration copies each old slot into the slot of the same name (`interceptor/src/bpf/migrate.rs`);
/// a counter this build dropped is not carried over, one it added starts at 0.
pub const ABI6_SLOTS: &[&str] = &[
    "connect_redirected",
    "connect_skipped_proxy",
    "connect_skipped_loopback",
    "connect_skipped_pod_local",
    "connect_skipped_port",
    "connect_skipped_cidr",
    "connect_skipped_not_included",
    "connect_skipped_outbound_off",
    "connect_skipped_source",
    "connect_refused_source",
    "connect_no_proxy_direct",
    "connect_passthrough",
    "connect_self_inbound",
    "connect_map_full",
    "sockhash_insert",
    "sockhash_insert_failed",
    "pod_to_pod_insert",
    "pod_to_pod_skipped",
    "pod_to_pod_unproven",
    "sockhash_remove",
    "listener_insert",
    "listener_skipped_not_pod",
    "msg_redirected",
    "msg_redirected_pod_to_pod",
    "msg_redirect_failed",
    "msg_redirect_failed_pod_to_pod",
    "msg_fallback_reverse",
    "msg_fallback_pass",
    "msg_redirect_disabled",
    "orig_dst_answered",
    "orig_dst_local",
    "inbound_assigned",
    "inbound_skipped_port",
    "inbound_skipped_local",
    "inbound_no_listener",
    "inbound_assign_failed",
    "inbound_no_proxy_direct",
    "netns_probe",
    "pod_quota_exceeded",
    "dns_query_redirected",
    "dns_connect_redirected",
    "dns_tcp_redirected",
    "dns_tcp_unrecorded",
    "dns_skipped_proxy",
    "dns_skipped_not_nameserver",
    "dns_reply_rewritten",
    "dns_map_full",
    "upgrade_probe",
];

/// `COUNTERS` as ABI 7 laid it out: ABI 6's slots, then the adaptive policy's six.
pub const ABI7_SLOTS: &[&str] = &[
    "connect_redirected",
    "connect_skipped_proxy",
    "connect_skipped_loopback",
    "connect_skipped_pod_local",
    "connect_skipped_port",
    "connect_skipped_cidr",
    "connect_skipped_not_included",
    "connect_skipped_outbound_off",
    "connect_skipped_source",
    "connect_refused_source",
    "connect_no_proxy_direct",
    "connect_passthrough",
    "connect_self_inbound",
    "connect_map_full",
    "sockhash_insert",
    "sockhash_insert_failed",
    "pod_to_pod_insert",
    "pod_to_pod_skipped",
    "pod_to_pod_unproven",
    "sockhash_remove",
    "listener_insert",
    "listener_skipped_not_pod",
    "msg_redirected",
    "msg_redirected_pod_to_pod",
    "msg_redirect_failed",
    "msg_redirect_failed_pod_to_pod",
    "msg_fallback_reverse",
    "msg_fallback_pass",
    "msg_redirect_disabled",
    "orig_dst_answered",
    "orig_dst_local",
    "inbound_assigned",
    "inbound_skipped_port",
    "inbound_skipped_local",
    "inbound_no_listener",
    "inbound_assign_failed",
    "inbound_no_proxy_direct",
    "netns_probe",
    "pod_quota_exceeded",
    "dns_query_redirected",
    "dns_connect_redirected",
    "dns_tcp_redirected",
    "dns_tcp_unrecorded",
    "dns_skipped_proxy",
    "dns_skipped_not_nameserver",
    "dns_reply_rewritten",
    "dns_map_full",
    "upgrade_probe",
    "msg_setup_history_hit",
    "msg_setup_history_miss",
    "msg_setup_skipped_short_lived",
    "msg_setup_skipped_memory_pressure",
    "msg_history_short",
    "msg_history_long",
];

/// The slot a counter of the given name has in this build's `COUNTERS`.
pub fn slot_of(name: &str) -> Option<u32> {
    Counter::ALL
        .iter()
        .find(|c| c.name() == name)
        .map(|c| c.index())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The frozen lists are what those ABIs ran: ABI 6's is ABI 7's first 48 slots (7 only
    /// appended), and ABI 7's is exactly this release build's layout (the probe build appends
    /// one). A change of `Counter` without a new frozen list and an ABI bump fails here.
    #[test]
    fn frozen_slot_lists_match_the_layouts_they_name() {
        assert_eq!(ABI6_SLOTS.len(), 48);
        assert_eq!(&ABI7_SLOTS[..ABI6_SLOTS.len()], ABI6_SLOTS);
        for (i, name) in ABI7_SLOTS.iter().enumerate() {
            assert_eq!(Counter::ALL[i].name(), *name, "slot {i}");
        }
        #[cfg(not(feature = "abi-probe"))]
        assert_eq!(Counter::ALL.len(), ABI7_SLOTS.len());
        #[cfg(feature = "abi-probe")]
        {
            assert_eq!(Counter::ALL.len(), ABI7_SLOTS.len() + 1);
            assert_eq!(Counter::ALL[ABI7_SLOTS.len()].name(), "abi_probe");
        }
    }
}
