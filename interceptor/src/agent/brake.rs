//! The node-wide sk_msg brake (issue 15, item 2): while the kernel reports TCP under memory
//! pressure, new connections stay on loopback TCP (`CONFIG_MSG_BRAKE`; sockops counts
//! `msg_setup_skipped_memory_pressure`). A redirected message skips the receiver's TCP receive
//! window: a sender is not slowed down by a peer that does not read, so under pressure TCP's
//! own flow control is the safer path. Connections already redirected stay so (switching a
//! live direction is not order-safe), the brake only holds new ones.
//!
//! No BPF program can read the kernel's `tcp_memory_pressure` (a global the sockops and sk_msg
//! contexts do not expose; aya-ebpf 0.2 has no kfuncs or CO-RE reads of `sk_prot`), so the agent
//! reads the same flag where the kernel prints it: the `press` column of `/proc/net/protocols`
//! (`proto_memory_pressure()` for the TCP and TCPv6 protos, which share one state).

use std::path::PathBuf;

use interceptor_common::config::CONFIG_MSG_BRAKE;
use tracing::{info, warn};

use crate::bpf::Maps;

/// Where the kernel prints each protocol's memory-pressure state.
pub const PROTOCOLS: &str = "/proc/net/protocols";

pub(super) struct Brake {
    source: PathBuf,
    unreadable: bool,
}

impl Brake {
    pub(super) fn new(source: PathBuf) -> Self {
        Self {
            source,
            unreadable: false,
        }
    }

    /// One check: sets or clears `CONFIG_MSG_BRAKE` when the kernel's state and the flag differ.
    pub(super) fn check(&mut self, maps: &mut Maps) {
        let pressure = match std::fs::read_to_string(&self.source) {
            Ok(text) => tcp_under_pressure(&text),
            Err(err) => {
                if !self.unreadable {
                    warn!(source = %self.source.display(), %err, "TCP memory pressure unreadable; brake off");
                }
                self.unreadable = true;
                Some(false)
            }
        };
        let Some(pressure) = pressure else {
            return;
        };
        let Ok(mut cfg) = maps.global_config() else {
            return;
        };
        if (cfg.flags & CONFIG_MSG_BRAKE != 0) == pressure {
            return;
        }
        if pressure {
            cfg.flags |= CONFIG_MSG_BRAKE;
        } else {
            cfg.flags &= !CONFIG_MSG_BRAKE;
        }
        match maps.set_global_config(cfg) {
            Ok(()) if pressure => {
                info!("TCP memory pressure: new connections stay on TCP (sk_msg brake on)");
            }
            Ok(()) => info!("TCP memory pressure gone: sk_msg brake off"),
            Err(err) => warn!(%err, "setting the sk_msg brake"),
        }
    }
}

/// Whether `/proc/net/protocols` says TCP (or TCPv6) is under memory pressure; None when the
/// text has no such row or column.
pub fn tcp_under_pressure(protocols: &str) -> Option<bool> {
    let mut lines = protocols.lines();
    let column = lines
        .next()?
        .split_whitespace()
        .position(|c| c == "press")?;
    let mut seen = None;
    for line in lines {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if matches!(fields.first(), Some(&("TCP" | "TCPv6"))) {
            let yes = *fields.get(column)? == "yes";
            seen = Some(seen.unwrap_or(false) || yes);
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::tcp_under_pressure;

    const HEADER: &str = "protocol  size sockets  memory press maxhdr  slab module     cl co di ac io in de sh ss gs se re bi br ha uh gp em\n";

    #[test]
    fn reads_the_press_column_of_tcp() {
        let calm = format!(
            "{HEADER}TCPv6     2432      0     436   no     192   yes  kernel      y  y  y  y  y  y  y  y  y  y  y  y  n  y  y  y  y  y\n\
             TCP       2304      1     436   no     192   yes  kernel      y  y  y  y  y  y  y  y  y  y  y  y  n  y  y  y  y  y\n\
             UDP       1472      0       2   NI       0   yes  kernel      y  y  y  n  y  y  y  n  y  y  y  y  y  n  n  y  y  n\n"
        );
        assert_eq!(tcp_under_pressure(&calm), Some(false));
        let pressed = calm.replacen("1     436   no", "1     436   yes", 1);
        assert_eq!(tcp_under_pressure(&pressed), Some(true));
        assert_eq!(tcp_under_pressure(HEADER), None);
        assert_eq!(tcp_under_pressure(""), None);
    }
}
