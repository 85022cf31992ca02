//! Map keys and values shared by the interceptor eBPF programs (`interceptor-ebpf`) and the agent.
//!
//! Every type is `#[repr(C)]`, `Copy` and free of implicit padding (only `u32`/`u64` fields, or
//! explicit padding), so the kernel and user-space views agree byte for byte. Byte order is part
//! of each type and is written on each field.
//!
//! Addresses are always 16 bytes: IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`), so an `AF_INET`
//! socket and a dual-stack `AF_INET6` socket talking IPv4 produce the same keys.
#![no_std]

pub mod addr;
pub mod config;
pub mod counters;
pub mod dns;
pub mod event;
pub mod history;
pub mod layout;
pub mod names;
pub mod origdst;
pub mod pod;
pub mod sockmap;

/// Bumped whenever a pinned map's layout or meaning changes (and that map's `layout::MAPS` entry
/// with it): an agent never reads pinned state with another ABI's layout. Programs may change
/// within one ABI: an agent of the same ABI replaces them in place and keeps the maps. An agent
/// of a newer ABI migrates an older one's datapath from `layout::MIGRATES_FROM` on; it refuses
/// older ones and newer ones (a downgrade).
///
/// 5: `COUNTERS` gained `upgrade_probe` (one more slot).
/// 6: `SOCKS`/`MSG_FALLBACK` also hold pod→pod keys (`netns` 0, see `sockmap::SockKey`);
/// `COUNTERS` gained `msg_redirected_pod_to_pod`, `msg_redirect_failed_pod_to_pod`,
/// `pod_to_pod_insert`, `pod_to_pod_skipped`, `pod_to_pod_unproven`; `CONFIG` flag
/// `CONFIG_POD_TO_POD`; new map `PEER_SEQ`. The pod tables hold 16 384 pods, not preallocated
/// (`names::size`; same layouts).
/// 7: `--msg-redirect-policy adaptive` (issue 15 item 2): new maps `MSG_HISTORY` and
/// `CONN_MSGS` (`history`); `COUNTERS` gained `msg_setup_*` and `msg_history_*` slots at its end;
/// `CONFIG` flags `CONFIG_MSG_ADAPTIVE`, `CONFIG_MSG_BRAKE`; `OrigDst` flag `ORIG_SKIP_SHORT`
/// (`TUPLE_ORIG`). No existing layout changed except `COUNTERS`'s length; `CONFIG` and
/// `TUPLE_ORIG` keep theirs (an entry without the new flags means what it meant at 6). An agent
/// of ABI 7 migrates a datapath of ABI 6 (`layout`). Later within 7, no layout change: the
/// `CONFIG` flag `CONFIG_APP_NODELAY` (TCP_NODELAY on in-pod hops), ignored by earlier programs.
/// 8 (the `abi-probe` test build only, never released): `COUNTERS` gained `abi_probe`. An agent
/// of ABI 8 migrates a datapath of ABI 7 or 6: the ABI change the e2e tests exercise (7→8).
///
/// Every map's own layout version and how a change of it is migrated: [`layout::MAPS`].
#[cfg(not(feature = "abi-probe"))]
pub const ABI_VERSION: u32 = 7;
#[cfg(feature = "abi-probe")]
pub const ABI_VERSION: u32 = 8;

#[cfg(feature = "user")]
mod pod_impls {
    use crate::{
        config::GlobalConfig,
        dns::DnsOrig,
        event::Event,
        history::{ConnMsgs, HistKey, HistVal},
        origdst::OrigDst,
        pod::{CidrKey, PodConfig, PodInfo, PortKey},
        sockmap::SockKey,
    };

    // SAFETY: all of these are #[repr(C)], Copy, and have no padding bytes (checked by the
    // layout tests below), so any bit pattern the kernel hands back is a valid value.
    unsafe impl aya::Pod for GlobalConfig {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for DnsOrig {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for PodConfig {}
    unsafe impl aya::Pod for PodInfo {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for CidrKey {}
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for HistKey {}
    unsafe impl aya::Pod for HistVal {}
    unsafe impl aya::Pod for ConnMsgs {}
}

#[cfg(test)]
mod layout_tests {
    use core::mem::size_of;

    use crate::{
        config::GlobalConfig,
        dns::DnsOrig,
        event::Event,
        history::{ConnMsgs, HistKey, HistVal},
        origdst::OrigDst,
        pod::{CidrKey, PodConfig, PodInfo, PortKey},
        sockmap::SockKey,
    };

    // The sizes are the sum of the field sizes: no implicit padding anywhere.
    #[test]
    fn no_padding() {
        assert_eq!(size_of::<SockKey>(), 16 + 16 + 4 + 4 + 8);
        assert_eq!(size_of::<HistKey>(), 8 + 4 + 4);
        assert_eq!(size_of::<HistVal>(), 4 + 4 + 8);
        assert_eq!(size_of::<ConnMsgs>(), 16 + 4 + 4);
        assert_eq!(size_of::<OrigDst>(), 16 + 4 * 4);
        assert_eq!(size_of::<PodConfig>(), 5 * 4 + 16 + 3 * 16);
        assert_eq!(size_of::<DnsOrig>(), 16 + 4 + 4);
        assert_eq!(size_of::<PortKey>(), 4 + 2 + 2);
        assert_eq!(size_of::<CidrKey>(), 4 + 4 + 16);
        assert_eq!(size_of::<GlobalConfig>(), 4 * 4 + 16 + 4);
        assert_eq!(size_of::<Event>(), 4 + 4 + 8);
        assert_eq!(
            size_of::<PodInfo>(),
            3 * 8 + 4 * 4 + crate::pod::POD_NAME_LEN
        );
    }
}
