//! Records the programs push to the `EVENTS` ring buffer to wake the agent.

/// A proxy started listening on the inbound port: the agent re-resolves which pod owns it.
pub const EVENT_LISTENER: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// `EVENT_*`.
    pub kind: u32,
    /// Local port of the socket, host byte order.
    pub port: u32,
    /// Socket cookie (`bpf_get_socket_cookie`, the same value `sock_diag` reports).
    pub cookie: u64,
}
