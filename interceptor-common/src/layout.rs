//! Versioned map layouts: for every pinned map, the ABI at which its layout (type, key, value,
//! size or meaning) last changed, and what an agent of a newer ABI does with an older one's
//! contents. An agent that finds a datapath of an older ABI attached (`interceptor/src/bpf/migrate.rs`):
//! - **keeps** every map whose layout is the same in both ABIs — the very kernel object, shared
//!   by the old and new programs, so nothing is copied and nothing written meanwhile is lost;
//! - creates the others fresh and fills them according to their [`Migration`];
//! - then swaps every program on its link, so there is never a moment without one.
//!
//! Where the contents come from when a layout changes:
//! - **The pod registry's maps** (pod configs, addresses, port rules, ranges, identity records,
//!   per-pod listeners, the listener sockhash) are [`Migration::FromRegistry`]. The registry has
//!   no copy of its own: it *is* these maps (`interceptor/src/registry.rs`: every process sees
//!   the same state, and a restart loses nothing), and `/run/interceptor` holds only the lock,
//!   the status report and iptables-mode records. So the old maps are read as pods (identity,
//!   config, rows — decoded with the old ABI's layout) and each pod is written into the new maps
//!   by `Maps::write_pod`, the code `pod enable` writes with; each inbound pod's listener is
//!   found again by the agent's listener resolution (the sockhash holds sockets, which no map
//!   read returns). A rebuild, not an entry copy: a pod's entries are written as one pod, and a
//!   new layout's fields come from the code that writes them, not from a converter.
//! - **The connection-owned maps** (original destinations: `COOKIE_ORIG`, `TUPLE_ORIG`,
//!   `DNS_ORIG`) are [`Migration::Convert`]: entries are per connection, written by the programs,
//!   and nothing else knows them. While the programs are swapped, old writers and new readers
//!   run side by side: the new programs read the old map as their `*_PREV` map when their own
//!   has no entry (the migration pins the old map under that name before loading), and every
//!   reader is swapped before any writer ([`SWAP_ORDER`]), so no entry is ever where its reader
//!   does not look. Once every program is swapped the entries are copied old to new (a
//!   converter per map and old ABI), so the next migration finds them all in one map — not
//!   before: the old programs remove a closing connection's entry from the old map only.

use crate::names::{map, prog};

/// The oldest pinned ABI this build migrates from (the first whose layouts are written down
/// here). Older ones, and newer ones (a downgrade), are refused with what to do.
pub const MIGRATES_FROM: u32 = 6;

/// What a newer agent does with a map whose layout changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Migration {
    /// Entries converted in user space, old layout to new, before the programs are swapped
    /// (connection-owned maps: after, and read meanwhile through their `*_PREV` maps).
    /// Needs a converter for the old layout; without one the migration is refused.
    Convert,
    /// Written from what the agent knows (its options, the ABI number).
    Rebuild,
    /// Rebuilt from the pod registry (read from the old maps) by the code that writes pods in
    /// normal operation, into the new maps before the programs are swapped. The registry's
    /// lock is held from staging to commit, so no pod changes meanwhile.
    FromRegistry,
    /// Per-connection state: the new map starts empty, the old one lives on for the
    /// connections already in it (an established socket keeps the sk_msg program it joined
    /// with, and that program keeps its maps alive) and is freed with the last of them.
    Drain,
    /// Not carried over: a layout change of such a map is refused. (No map is left here; kept
    /// for the next map whose contents cannot be carried over.)
    Unsupported,
}

/// One pinned map: when its layout last changed and how a change is migrated.
#[derive(Clone, Copy, Debug)]
pub struct MapLayout {
    pub name: &'static str,
    /// The ABI at which this map's layout last changed. Maps of [`MIGRATES_FROM`] or older
    /// say `MIGRATES_FROM`: only differences after it matter.
    pub since: u32,
    pub migration: Migration,
}

const fn m(name: &'static str, since: u32, migration: Migration) -> MapLayout {
    MapLayout {
        name,
        since,
        migration,
    }
}

/// `COUNTERS` gained the `msg_setup_*`/`msg_history_*` slots at ABI 7, and `abi_probe` in the
/// `abi-probe` test build (ABI 8).
#[cfg(feature = "abi-probe")]
const COUNTERS_SINCE: u32 = 8;
#[cfg(not(feature = "abi-probe"))]
const COUNTERS_SINCE: u32 = 7;

/// The maps the `abi-probe` test build (ABI 8) declares changed besides `COUNTERS`, so the e2e
/// migration test runs the registry rebuild into every fresh registry map (`POD_CONFIG`,
/// `POD_IPS`, `POD_PORTS`, the CIDR tries, `POD_INFO`, `POD_LISTENER`/`POD_LISTENER6`, the
/// `LISTENERS` sockhash, whose sockets are borrowed from the proxies again) and the conversion
/// of every connection map (`COOKIE_ORIG`, `TUPLE_ORIG`, `DNS_ORIG`) under load. Their types
/// are the same: only the declared version moves.
#[cfg(feature = "abi-probe")]
const PROBED_SINCE: u32 = 8;
#[cfg(not(feature = "abi-probe"))]
const PROBED_SINCE: u32 = 6;

/// Every pinned map (`names::map::PINNED`, same order).
pub const MAPS: &[MapLayout] = &[
    // Written by the agent from its options at every start. ABI 7 added flags
    // (`CONFIG_MSG_ADAPTIVE`, `CONFIG_MSG_BRAKE`), not fields: same layout, kept (and
    // written with this agent's settings once the programs are swapped).
    m(map::CONFIG, 6, Migration::Rebuild),
    // Always fresh in a migration: it holds the ABI number itself.
    m(map::ABI, crate::ABI_VERSION, Migration::Rebuild),
    m(map::POD_CONFIG, PROBED_SINCE, Migration::FromRegistry),
    m(map::POD_IPS, PROBED_SINCE, Migration::FromRegistry),
    m(map::POD_PORTS, PROBED_SINCE, Migration::FromRegistry),
    m(map::CIDR_EXCLUDE, PROBED_SINCE, Migration::FromRegistry),
    m(map::CIDR_INCLUDE, PROBED_SINCE, Migration::FromRegistry),
    m(map::POD_INFO, PROBED_SINCE, Migration::FromRegistry),
    m(map::POD_LISTENER, PROBED_SINCE, Migration::FromRegistry),
    m(map::POD_LISTENER6, PROBED_SINCE, Migration::FromRegistry),
    // Holds sockets: rebuilt by the registry's listener resolution (a listener that opened
    // meanwhile is found by the agent's first pass after the migration).
    m(map::LISTENERS, PROBED_SINCE, Migration::FromRegistry),
    // connect4/6 write, sockops reads (and removes) at the handshake's end.
    m(map::COOKIE_ORIG, PROBED_SINCE, Migration::Convert),
    // sockops writes, getsockopt reads for the connection's life.
    // ABI 7 added the flag `ORIG_SKIP_SHORT`; an entry without it means what it meant at 6.
    m(map::TUPLE_ORIG, PROBED_SINCE, Migration::Convert),
    m(map::SOCKS, 6, Migration::Drain),
    m(map::MSG_FALLBACK, 6, Migration::Drain),
    m(map::PEER_SEQ, 6, Migration::Drain),
    m(map::COUNTERS, COUNTERS_SINCE, Migration::Convert),
    // A probe's entry lives for one agent call.
    m(map::NETNS_PROBE, 6, Migration::Drain),
    // Events not yet read by the old agent are lost either way (it is stopped).
    m(map::EVENTS, 6, Migration::Drain),
    // sendmsg4/6 write, recvmsg4/6 read.
    m(map::DNS_ORIG, PROBED_SINCE, Migration::Convert),
    // New at ABI 7 (`--msg-redirect-policy adaptive`): created empty when migrating from 6.
    // A hint learned from closed connections: an empty one means the default (join the
    // sockhash) until it learns again.
    m(map::MSG_HISTORY, 7, Migration::Drain),
    // New at ABI 7: per connection; a connection without an entry is one sockops did not
    // decide for (all those established before the migration), as at ABI 6.
    m(map::CONN_MSGS, 7, Migration::Drain),
];

/// The maps of one connection's sockhash state: sk_msg looks a socket up in `SOCKS`, its
/// fallback in `MSG_FALLBACK`, the pod→pod peer in `PEER_SEQ`, the adaptive count in
/// `CONN_MSGS`. Programs of one family must see one set: those the old ABI had are kept
/// together or drained together (a new one of this ABI starts empty either way).
pub const SOCKHASH_GROUP: &[&str] = &[map::SOCKS, map::MSG_FALLBACK, map::PEER_SEQ, map::CONN_MSGS];

/// A connection-owned map: the programs that write its entries and those that read them, and
/// the name under which this ABI's programs read the previous ABI's map.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionMap {
    pub name: &'static str,
    pub previous: &'static str,
    pub writers: &'static [&'static str],
    pub readers: &'static [&'static str],
}

pub const CONNECTION_MAPS: &[ConnectionMap] = &[
    ConnectionMap {
        name: map::COOKIE_ORIG,
        previous: map::COOKIE_PREV,
        writers: &[prog::CONNECT4, prog::CONNECT6],
        readers: &[prog::SOCKOPS],
    },
    ConnectionMap {
        name: map::TUPLE_ORIG,
        previous: map::TUPLE_PREV,
        writers: &[prog::SOCKOPS],
        // sockops reads it too (the accepted end's flags), and is swapped before connect4/6.
        readers: &[prog::GETSOCKOPT, prog::SOCKOPS],
    },
    ConnectionMap {
        name: map::DNS_ORIG,
        previous: map::DNS_PREV,
        // connect4/6 record a connected UDP socket's resolver (glibc, dig) as sendmsg4/6 do an
        // unconnected one's.
        writers: &[
            prog::CONNECT4,
            prog::CONNECT6,
            prog::SENDMSG4,
            prog::SENDMSG6,
        ],
        readers: &[prog::RECVMSG4, prog::RECVMSG6],
    },
];

/// The order in which an upgrade or migration swaps the programs. sk_msg first: sockets the
/// new sockops adds to a kept sockhash must get the new sk_msg. Then every reader of a
/// connection map before its writers: a new reader finds an old writer's entry (it falls back
/// to the old map), while an old reader would not find a new writer's.
pub const SWAP_ORDER: [&str; 10] = [
    prog::SK_MSG,
    prog::GETSOCKOPT,
    prog::SOCKOPS,
    prog::RECVMSG4,
    prog::RECVMSG6,
    prog::CONNECT4,
    prog::CONNECT6,
    prog::SENDMSG4,
    prog::SENDMSG6,
    // Reads no connection map; last, as it is one link update per pod.
    prog::SK_LOOKUP,
];

/// The layout entry of a pinned map.
pub fn of(name: &str) -> Option<&'static MapLayout> {
    MAPS.iter().find(|l| l.name == name)
}

impl MapLayout {
    /// Whether a map pinned by an agent of ABI `pinned` has this build's layout (and so is
    /// kept as it is).
    pub const fn same_since(&self, pinned: u32) -> bool {
        self.since <= pinned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pinned_map_has_a_layout() {
        assert_eq!(MAPS.len(), map::PINNED.len());
        for (l, name) in MAPS.iter().zip(map::PINNED) {
            assert_eq!(l.name, *name);
            assert!(l.since >= MIGRATES_FROM && l.since <= crate::ABI_VERSION);
        }
    }

    /// Every program is swapped once, and a connection map's readers before its writers (a
    /// program that is both, sockops for TUPLE_ORIG, reads the old map through its fallback).
    #[test]
    fn connection_maps_are_read_before_they_are_written_in_the_swap_order() {
        let at = |name: &str| SWAP_ORDER.iter().position(|p| *p == name).expect(name);
        for p in prog::ALL {
            assert_eq!(SWAP_ORDER.iter().filter(|s| **s == p).count(), 1, "{p}");
        }
        for c in CONNECTION_MAPS {
            assert_eq!(of(c.name).map(|l| l.migration), Some(Migration::Convert));
            assert!(map::PREVIOUS.contains(&c.previous), "{}", c.name);
            for w in c.writers {
                for r in c.readers.iter().filter(|r| *r != w) {
                    assert!(at(r) < at(w), "{}: {w} is swapped before {r}", c.name);
                }
            }
        }
    }

    /// A layout change of any pinned map is carried over (converted, rebuilt or drained).
    #[test]
    fn no_map_is_left_unsupported() {
        for l in MAPS {
            assert_ne!(l.migration, Migration::Unsupported, "{}", l.name);
        }
    }

    #[test]
    fn the_abi_map_is_always_fresh() {
        let abi = of(map::ABI).expect("ABI");
        assert!(!abi.same_since(crate::ABI_VERSION - 1));
    }
}
