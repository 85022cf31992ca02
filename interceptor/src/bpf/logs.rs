//! The programs' own log records (aya-log) in the agent's tracing output.

#![allow(
    unsafe_code,
    reason = "registering aya-log's ring buffer descriptor with tokio"
)]

use std::os::fd::AsRawFd;

use aya_log::EbpfLogger;
use tokio::io::{Interest, unix::AsyncFd};
use tracing::warn;

/// Drains the aya-log ring buffer whenever it becomes readable, until the task is dropped.
/// The logger must live as long as the programs that log (TOOLCHAIN.md).
pub async fn forward(logger: EbpfLogger<&'static dyn log::Log>) {
    struct Fd(EbpfLogger<&'static dyn log::Log>);
    impl AsRawFd for Fd {
        fn as_raw_fd(&self) -> std::os::fd::RawFd {
            self.0.as_raw_fd()
        }
    }
    // SAFETY: Fd owns the ring buffer's descriptor for as long as the AsyncFd lives.
    let registered = unsafe { AsyncFd::register_with_interest(Fd(logger), Interest::READABLE) };
    let mut fd = match registered.map_err(|e| e.into_parts().1) {
        Ok(fd) => fd,
        Err(err) => {
            warn!(%err, "cannot poll the eBPF log buffer; program logs are not shown");
            return;
        }
    };
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(err) => {
                warn!(%err, "eBPF log buffer failed");
                return;
            }
        };
        guard.get_inner_mut().0.flush();
        guard.clear_ready();
    }
}
