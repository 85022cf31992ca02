//! Node-wide settings the programs read from the one-entry `CONFIG` array.

use crate::addr::Addr;

/// Value of `CONFIG[0]`. Written by the agent before any pod is enabled.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GlobalConfig {
    /// Port of the proxy's outbound listener on loopback (Istio: 15001). Host byte order.
    pub outbound_port: u32,
    /// Port of the proxy's inbound listener (Istio: 15006). Host byte order.
    pub inbound_port: u32,
    /// `CONFIG_*` flags.
    pub flags: u32,
    /// Source address the proxy binds for its inbound passthrough hop (Istio: 127.0.0.6).
    /// Network byte order.
    pub passthrough_ip4: u32,
    /// IPv6 passthrough source (Istio: `::6`). Network byte order words.
    pub passthrough_ip6: Addr,
    /// Port of the proxy's DNS listener on loopback, UDP and TCP (Istio: 15053). Host byte
    /// order.
    pub dns_port: u32,
}

/// Istio's inbound passthrough source, `127.0.0.6`: the proxy connects to the app from it, so
/// the datapath and iptables rules can tell the proxy's own hop from the app's traffic.
pub const PASSTHROUGH_V4: [u8; 4] = [127, 0, 0, 6];
/// IPv6 passthrough source, `::6`.
pub const PASSTHROUGH_V6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6];

/// sk_msg redirect of the app↔proxy hop is on (off = the same interception over loopback TCP,
/// which the benchmark uses to isolate what the sockmap saves).
pub const CONFIG_MSG_REDIRECT: u32 = 1 << 0;
/// With `CONFIG_MSG_REDIRECT`: also short-circuit the sidecar→sidecar hop of two enabled pods
/// of this node (sockops.rs `pod_to_pod`; kernels >= 5.15). Off = that hop crosses the veths.
pub const CONFIG_POD_TO_POD: u32 = 1 << 1;
/// With `CONFIG_MSG_REDIRECT`: `--msg-redirect-policy adaptive` — an app↔proxy or passthrough
/// connection joins the sockhash only if its pod and port's recent connections carried enough
/// messages (`history`). Off = `always`, the default.
pub const CONFIG_MSG_ADAPTIVE: u32 = 1 << 2;
/// Set by the agent while the node's TCP memory is under pressure: new connections stay on
/// TCP (redirected bytes are not charged to the receiver's socket buffer).
pub const CONFIG_MSG_BRAKE: u32 = 1 << 3;

/// The two ends of every in-pod hop of an enabled pod (app→proxy, proxy→app passthrough, the
/// proxy's own inbound call, DNS over TCP to the proxy: the sockets connect4/6 recorded) get
/// `TCP_NODELAY` at sockops' established callback, redirected or not. A hop left on loopback
/// TCP (`--no-sockmap`, `--no-msg-redirect`, a lost first-write race, the adaptive policy,
/// the brake) would otherwise hold a corked app's sub-MSS tail for the proxy's delayed ACK
/// (40 ms; README, issue 15); a redirected hop never Nagles anyway. Default on; off with
/// `agent --no-app-nodelay`, and below Linux 6.1 (bpf_setsockopt refuses TCP_NODELAY there).
/// New within ABI 7: programs built before it ignore the bit.
pub const CONFIG_APP_NODELAY: u32 = 1 << 4;

impl GlobalConfig {
    pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
    pub const DEFAULT_INBOUND_PORT: u16 = 15006;
    pub const DEFAULT_DNS_PORT: u16 = 15053;

    pub const fn istio_defaults() -> Self {
        Self {
            outbound_port: Self::DEFAULT_OUTBOUND_PORT as u32,
            inbound_port: Self::DEFAULT_INBOUND_PORT as u32,
            flags: CONFIG_MSG_REDIRECT | CONFIG_POD_TO_POD | CONFIG_APP_NODELAY,
            passthrough_ip4: u32::from_ne_bytes(PASSTHROUGH_V4),
            passthrough_ip6: addr_words(PASSTHROUGH_V6),
            dns_port: Self::DEFAULT_DNS_PORT as u32,
        }
    }
}

/// 16 address bytes as the four network-order words of an [`Addr`].
const fn addr_words(b: [u8; 16]) -> Addr {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}
