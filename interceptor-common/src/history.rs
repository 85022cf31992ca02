//! Per-(pod, destination port) history of how much traffic redirected connections carried,
//! so sockops can leave connections that would not pay for the psock setup (connection per
//! request) on loopback TCP (`--msg-redirect-policy adaptive`, issue 15 item 2).

use crate::sockmap::SockKey;

/// `MSG_HISTORY` key: the pod (network-namespace cookie of the connecting socket; 0 on kernels
/// < 5.15, where the history is per port, node-wide), the destination port the app (or, for
/// the passthrough hop, the proxy) asked for, and the kind of hop (`origdst::KIND_*` or
/// [`KIND_POD_TO_POD`]: an
/// outbound call to port P and the proxy's passthrough to the pod's own port P differ).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HistKey {
    pub netns: u64,
    /// Host byte order.
    pub port: u32,
    /// `origdst::KIND_*`.
    pub kind: u32,
}

/// `HistKey::kind` of a same-node pod→pod hop (the client sidecar's upstream connection to
/// another enabled pod; `netns` is the client pod's, `port` the server port). The
/// `origdst::KIND_*` values are 1–3.
pub const KIND_POD_TO_POD: u32 = 4;

/// `MSG_HISTORY` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistVal {
    /// Connections that closed with fewer than [`LONG_MSGS`] messages since the last one that
    /// carried more, saturating at [`SHORT_MAX`]; a connection that carries [`LONG_MSGS`]
    /// resets it to 0.
    pub short_streak: u32,
    /// Connections seen carrying at least [`LONG_MSGS`] messages (saturating; for `status`).
    pub long: u32,
    /// `bpf_ktime_get_ns` of the last short close: a streak older than [`HISTORY_TTL_NS`] no
    /// longer counts (the traffic may have changed, and a port on TCP only learns again when
    /// its connections close).
    pub last_short_ns: u64,
}

/// `CONN_MSGS` value: one per connection that sockops decided for, under the connection's
/// canonical key ([`canonical`]), until it proved long or closed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnMsgs {
    pub hist: HistKey,
    /// Messages sk_msg saw in either direction (redirected connections only).
    pub msgs: u32,
    /// `CONN_*` flags.
    pub flags: u32,
}

/// The connection was left on TCP: sk_msg never sees it, so sockops counts its data segments
/// at close instead of messages.
pub const CONN_TCP: u32 = 1 << 0;

/// A connection that carried this many messages (both directions; data segments if it ran on
/// TCP) pays for its psock: a request and its response are 2–3, so this is three or more
/// round trips.
pub const LONG_MSGS: u32 = 8;
/// Short connections in a row (no long one between) after which new connections to the same
/// pod and port stay on TCP.
pub const SKIP_AFTER: u32 = 4;
/// Saturation of `short_streak`.
pub const SHORT_MAX: u32 = 64;
/// A short streak older than this is forgotten (1 s).
pub const HISTORY_TTL_NS: u64 = 1_000_000_000;

impl HistVal {
    /// Whether a new connection should stay on TCP, at time `now_ns`.
    #[inline(always)]
    pub const fn says_short(&self, now_ns: u64) -> bool {
        self.short_streak >= SKIP_AFTER && now_ns.wrapping_sub(self.last_short_ns) < HISTORY_TTL_NS
    }

    /// Records one connection that carried `msgs` messages, closed (or proved long) at
    /// `now_ns`.
    #[inline(always)]
    pub const fn record(&mut self, msgs: u32, now_ns: u64) {
        if msgs >= LONG_MSGS {
            self.short_streak = 0;
            self.long = self.long.saturating_add(1);
        } else {
            // An expired streak starts again from this connection.
            if now_ns.wrapping_sub(self.last_short_ns) >= HISTORY_TTL_NS {
                self.short_streak = 0;
            }
            if self.short_streak < SHORT_MAX {
                self.short_streak += 1;
            }
            self.last_short_ns = now_ns;
        }
    }
}

/// The one orientation of a connection both ends compute alike from their own key (the end
/// with the lower port first; the lower address words when the ports are equal), so sk_msg
/// counts the messages of both directions in one `CONN_MSGS` entry.
#[inline(always)]
pub const fn canonical(key: &SockKey) -> SockKey {
    if key.local_port < key.remote_port {
        return *key;
    }
    if key.local_port > key.remote_port {
        return key.mirror();
    }
    let (l, r) = (&key.local_ip, &key.remote_ip);
    let local_first = l[0] < r[0]
        || (l[0] == r[0]
            && (l[1] < r[1] || (l[1] == r[1] && (l[2] < r[2] || (l[2] == r[2] && l[3] <= r[3])))));
    if local_first {
        *key
    } else {
        key.mirror()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(lp: u32, rp: u32, l: u32, r: u32) -> SockKey {
        SockKey {
            local_ip: [0, 0, 0, l],
            remote_ip: [0, 0, 0, r],
            local_port: lp,
            remote_port: rp,
            netns: 7,
        }
    }

    #[test]
    fn both_ends_find_the_same_canonical_key() {
        for k in [
            key(40000, 15001, 1, 1),
            key(80, 80, 1, 2),
            key(80, 80, 3, 2),
        ] {
            assert_eq!(canonical(&k), canonical(&k.mirror()));
        }
        assert_eq!(canonical(&key(15001, 40000, 1, 1)).local_port, 15001);
    }

    #[test]
    fn a_streak_of_short_connections_says_short_until_a_long_one_or_the_ttl() {
        let mut h = HistVal {
            short_streak: 0,
            long: 0,
            last_short_ns: 0,
        };
        let t = 10 * HISTORY_TTL_NS;
        for i in 0..SKIP_AFTER {
            assert!(!h.says_short(t + u64::from(i)));
            h.record(2, t + u64::from(i));
        }
        assert!(h.says_short(t + 10));
        assert!(!h.says_short(t + 10 + HISTORY_TTL_NS), "expired");
        h.record(LONG_MSGS, t + 11);
        assert!(!h.says_short(t + 12), "a long connection resets the streak");
        assert_eq!(h.long, 1);
        // An expired streak restarts at 1.
        for _ in 0..SKIP_AFTER - 1 {
            h.record(1, t + 20);
        }
        h.record(1, t + 20 + 2 * HISTORY_TTL_NS);
        assert_eq!(h.short_streak, 1);
    }
}
