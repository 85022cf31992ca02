//! The C socket address structs the programs write: `bpf_bind` takes them in connect4/6, and
//! getsockopt answers `SO_ORIGINAL_DST` with them.

use interceptor_common::addr::Addr;

/// `struct sockaddr_in`.
#[repr(C)]
pub(crate) struct SockaddrIn {
    pub(crate) family: u16,
    /// Network byte order.
    pub(crate) port: u16,
    /// Network byte order.
    pub(crate) addr: u32,
    pub(crate) zero: [u8; 8],
}

/// `struct sockaddr_in6`.
#[repr(C)]
pub(crate) struct SockaddrIn6 {
    pub(crate) family: u16,
    /// Network byte order.
    pub(crate) port: u16,
    pub(crate) flowinfo: u32,
    /// Network byte order words.
    pub(crate) addr: Addr,
    pub(crate) scope_id: u32,
}
