//! Original destinations of redirected connections, and what kind of interception made them.

use crate::addr::Addr;

/// An app's connection rewritten to the proxy's outbound port.
pub const KIND_OUTBOUND: u32 = 1;
/// The proxy's own connection to its pod's app, from the passthrough address (127.0.0.6).
/// Not redirected, only put in the sockhash so the hop skips the TCP/IP stack.
pub const KIND_PASSTHROUGH: u32 = 2;
/// The proxy calling its own pod's address: sent to the inbound port, as Istio's
/// `ISTIO_OUTPUT` rule 2 does (`-o lo ! -d 127.0.0.1 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT`).
pub const KIND_SELF_INBOUND: u32 = 3;

/// Value of `COOKIE_ORIG` (keyed by the app socket's cookie, written by connect4) and of
/// `TUPLE_ORIG` (keyed by the proxy-side socket's 4-tuple, written by sockops).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// Destination the app asked for, network byte order words (IPv4-mapped for IPv4).
    pub ip: Addr,
    /// Destination port, host byte order.
    pub port: u32,
    /// The pod the connection belongs to.
    pub pod_id: u32,
    /// `KIND_*`.
    pub kind: u32,
    /// `ORIG_*` flags.
    pub flags: u32,
}

/// Leave this connection's sockets out of the sockhash: the app↔proxy hop uses loopback TCP.
pub const ORIG_NO_SOCKMAP: u32 = 1 << 0;
/// A DNS-over-TCP connection sent to the proxy's DNS port. When its destination cannot be
/// recorded (kernels < 5.15 with an already-bound source, see `connect_refused_source`) it is
/// redirected anyway: the DNS proxy then forwards to the pod's resolv.conf nameservers.
pub const ORIG_DNS: u32 = 1 << 1;
/// Set by sockops on the `TUPLE_ORIG` entry when the connecting end stayed out of the sockhash
/// (adaptive policy or the memory-pressure brake): the accepted end stays out too, so both
/// ends of the hop agree and no byte is ever redirected.
pub const ORIG_SKIP_SHORT: u32 = 1 << 2;
