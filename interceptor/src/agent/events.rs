//! The datapath's voice in the agent: its event ring buffer (a new proxy listener wakes a
//! listener pass at once instead of at the next tick) and its aya-log records as tracing events.

#![allow(
    unsafe_code,
    reason = "AsyncFd registration of the ring buffer's descriptor; reading its records"
)]

use std::os::fd::AsRawFd;

use aya::maps::{MapData, RingBuf};
use interceptor_common::{
    event::{EVENT_LISTENER, Event},
    names,
};
use tokio::io::{Interest, unix::AsyncFd};
use tracing::debug;

use crate::bpf::{self, Datapath, Pins};

/// aya-log: the programs' log records become tracing events.
pub(super) fn start_logs(datapath: &mut Datapath) -> Option<tokio::task::JoinHandle<()>> {
    let logger = match datapath.ebpf_mut() {
        Some(ebpf) => aya_log::EbpfLogger::init(ebpf),
        None => {
            let path = datapath.pins.prog(names::prog::SOCKOPS);
            match aya::programs::SockOps::from_pin(&path).and_then(|p| p.info()) {
                Ok(info) => aya_log::EbpfLogger::init_from_id(info.id()),
                Err(err) => {
                    debug!(%err, "no pinned program to read logs from");
                    return None;
                }
            }
        }
    };
    match logger {
        Ok(logger) => Some(tokio::spawn(bpf::logs::forward(logger))),
        Err(err) => {
            debug!(%err, "eBPF logs unavailable");
            None
        }
    }
}

pub(super) struct Events(RingBuf<MapData>);

impl AsRawFd for Events {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

pub(super) fn open_events(pins: &Pins) -> Option<AsyncFd<Events>> {
    let ring: RingBuf<MapData> = bpf::maps::open_pinned(pins, names::map::EVENTS)
        .inspect_err(|err| debug!(%err, "no event ring buffer; polling only"))
        .ok()?;
    // SAFETY: Events owns the ring buffer's descriptor for as long as the AsyncFd lives.
    unsafe { AsyncFd::register_with_interest(Events(ring), Interest::READABLE) }.ok()
}

/// Waits for datapath events; returns the socket cookies of the new inbound listeners they
/// announce (empty when none was a listener event). Never resolves without an event buffer.
pub(super) async fn next_event(events: &mut Option<AsyncFd<Events>>) -> Vec<u64> {
    let Some(fd) = events else {
        return std::future::pending().await;
    };
    let Ok(mut guard) = fd.readable_mut().await else {
        return std::future::pending().await;
    };
    let mut listeners = Vec::new();
    let ring = &mut guard.get_inner_mut().0;
    while let Some(item) = ring.next() {
        if item.len() >= std::mem::size_of::<Event>() {
            // SAFETY: the record is at least one Event long; the ring's records are 8-byte
            // aligned but Event is read unaligned anyway.
            let event: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            if event.kind == EVENT_LISTENER {
                listeners.push(event.cookie);
            }
        }
    }
    guard.clear_ready();
    listeners
}
