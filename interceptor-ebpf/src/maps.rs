//! Every map of the family. All are pinned by name (the agent sets the pin directory), so a
//! restarted agent, `interceptor pod ...` and `interceptor status` see the same state.

use aya_ebpf::{
    bindings::BPF_ANY,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockHash},
    programs::SockOpsContext,
    EbpfContext, Global,
};
use interceptor_common::{
    config::GlobalConfig,
    counters::Counter,
    dns::DnsOrig,
    history::{ConnMsgs, HistKey, HistVal, LONG_MSGS},
    names::size,
    origdst::OrigDst,
    pod::{CidrKey, PodConfig, PodInfo, PortKey},
    sockmap::{PeerSeq, SockKey},
};

/// Node-wide settings, slot 0.
#[map]
pub(crate) static CONFIG: Array<GlobalConfig> = Array::pinned(1, 0);

/// ABI version of whoever created the pinned maps (`interceptor_common::ABI_VERSION`), slot 0.
/// Only user space reads it.
#[map]
pub(crate) static ABI: Array<u32> = Array::pinned(1, 0);

/// `BPF_F_NO_PREALLOC` for the pod tables: sized for 16 384 pods where a node runs a few hundred,
/// and written only by the agent (never from a program, where allocating could fail), so they
/// take kernel memory for the entries they hold, not for their capacity.
const NO_PREALLOC: u32 = 1;

/// Enabled pods by network-namespace cookie.
#[map]
pub(crate) static POD_CONFIG: HashMap<u64, PodConfig> = HashMap::pinned(size::PODS, NO_PREALLOC);

/// Pod addresses (16-byte, IPv4-mapped for IPv4) → the pod's network-namespace cookie, which
/// keys `POD_CONFIG`.
#[map]
pub(crate) static POD_IPS: HashMap<[u32; 4], u64> = HashMap::pinned(size::POD_IPS, NO_PREALLOC);

/// Per-pod port include/exclude lists.
#[map]
pub(crate) static POD_PORTS: HashMap<PortKey, u32> = HashMap::pinned(size::POD_PORTS, NO_PREALLOC);

/// Per-pod `excludeOutboundIPRanges`.
#[map]
pub(crate) static CIDR_EXCLUDE: LpmTrie<CidrKey, u32> = LpmTrie::pinned(size::CIDRS, 0);

/// Per-pod `includeOutboundIPRanges` (when not `*`).
#[map]
pub(crate) static CIDR_INCLUDE: LpmTrie<CidrKey, u32> = LpmTrie::pinned(size::CIDRS, 0);

/// User-space metadata of each pod (never read here; pinned with the rest).
#[map]
pub(crate) static POD_INFO: HashMap<u32, PodInfo> = HashMap::pinned(size::PODS, NO_PREALLOC);

/// Pod id → socket cookie of its proxy's inbound listener (resolved by the agent).
#[map]
pub(crate) static POD_LISTENER: HashMap<u32, u64> = HashMap::pinned(size::PODS, 0);

/// Pod id → socket cookie of its proxy's IPv6 inbound listener, when it has one of its own
/// (Envoy listens on `0.0.0.0:15006` and `[::]:15006` with IPV6_V6ONLY): IPv6 connections go
/// there, IPv4 ones to `POD_LISTENER`.
#[map]
pub(crate) static POD_LISTENER6: HashMap<u32, u64> = HashMap::pinned(size::PODS, 0);

/// Listening sockets on the inbound port, by socket cookie (inserted by sockops at listen()).
#[map]
pub(crate) static LISTENERS: SockHash<u64> = SockHash::pinned(size::LISTENERS, 0);

/// connect → established: original destination by the app socket's cookie. LRU because a
/// connect that never completes leaves its entry behind.
#[map]
pub(crate) static COOKIE_ORIG: LruHashMap<u64, OrigDst> = LruHashMap::pinned(size::CONNECTIONS, 0);

/// Original destination by the 4-tuple of the proxy-side socket (what getsockopt sees).
/// Removed when that socket closes; LRU as a backstop.
#[map]
pub(crate) static TUPLE_ORIG: LruHashMap<SockKey, OrigDst> =
    LruHashMap::pinned(size::CONNECTIONS, 0);

/// The previous ABI's `COOKIE_ORIG`, `TUPLE_ORIG` and `DNS_ORIG` (`names::map::PREVIOUS`): an
/// ABI migration pins the old maps under these names before it loads this object, so a
/// program of this ABI also finds what one of the old ABI wrote — the old writers still run
/// while the readers are swapped (`interceptor_common::layout::SWAP_ORDER`). Without a
/// migration, one unused slot each. The previous layouts are this ABI's: a build that changes
/// one declares its predecessor's type here.
#[map]
pub(crate) static COOKIE_PREV: HashMap<u64, OrigDst> = HashMap::pinned(1, 0);
#[map]
pub(crate) static TUPLE_PREV: HashMap<SockKey, OrigDst> = HashMap::pinned(1, 0);
#[map]
pub(crate) static DNS_PREV: HashMap<u64, DnsOrig> = HashMap::pinned(1, 0);

/// Both ends of every intercepted local connection; `msg_to_peer` is attached here.
#[map]
pub(crate) static SOCKS: SockHash<SockKey> = SockHash::pinned(size::SOCKETS, 0);

/// Directions (sender 4-tuple) that had to fall back to TCP once and stay there, so bytes are
/// never delivered out of order.
#[map]
pub(crate) static MSG_FALLBACK: LruHashMap<SockKey, u32> = LruHashMap::pinned(size::CONNECTIONS, 0);

/// Active ends of pod→pod connections (node-wide key) → their sequence numbers: the passive end
/// joins the sockhash only if its own mirror those (see `sockops::pod_to_pod`).
#[map]
pub(crate) static PEER_SEQ: LruHashMap<SockKey, PeerSeq> = LruHashMap::pinned(size::CONNECTIONS, 0);

/// `--msg-redirect-policy adaptive`: per (pod, destination port, hop kind), how much the
/// recent connections carried (see `interceptor_common::history`). LRU: a node's busy ports
/// keep their entries, idle ones make room.
#[map]
pub(crate) static MSG_HISTORY: LruHashMap<HistKey, HistVal> =
    LruHashMap::pinned(size::HISTORIES, 0);

/// Connections sockops decided for under the adaptive policy, by canonical key
/// (`history::canonical`), until they proved long (sk_msg) or closed (sockops).
#[map]
pub(crate) static CONN_MSGS: LruHashMap<SockKey, ConnMsgs> =
    LruHashMap::pinned(size::CONNECTIONS, 0);

/// One counter per decision; summed over CPUs by user space.
#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::COUNT, 0);

/// Socket cookie of a probe socket → its network-namespace cookie (kernels < 5.14).
#[map]
pub(crate) static NETNS_PROBE: LruHashMap<u64, u64> = LruHashMap::pinned(size::PROBES, 0);

/// Wakes the agent when a proxy starts listening.
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::pinned(size::EVENTS_BYTES, 0);

/// Page size of the running kernel, set by the loader: getsockopt must step aside for option
/// values larger than a page (see getsockopt.rs).
#[no_mangle]
pub(crate) static PAGE_SIZE: Global<u32> = Global::new(4096);

/// 1 when the kernel lets sockops, sk_msg and getsockopt read the network-namespace cookie
/// (>= 5.15), set by the loader from a helper probe. A read-only global: the verifier sees the
/// constant and skips the helper call on kernels that lack it.
#[no_mangle]
pub(crate) static NETNS_KEYS: Global<u32> = Global::new(0);

/// The network-namespace cookie that goes into `SockKey`s: the socket's, or 0 on kernels that
/// cannot tell it to every program that builds the key.
#[inline(always)]
pub(crate) fn netns_key<C: EbpfContext>(ctx: &C) -> u64 {
    if NETNS_KEYS.load() == 0 {
        return 0;
    }
    // Only reached where the probe found the helper.
    crate::ctx::netns_cookie(ctx)
}

#[inline(always)]
pub(crate) fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter.index()) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}

/// The netns cookie of the pod owning `addr`, or 0 (cookies start at 1). A plain value instead
/// of an `Option`: LLVM compares options branch-free, reading the undefined payload of `None`,
/// which the verifier rejects ("R1 !read_ok").
#[inline(always)]
pub(crate) fn pod_of(addr: &[u32; 4]) -> u64 {
    match POD_IPS.get_ptr(addr) {
        // SAFETY: a valid map value pointer for this program run.
        Some(p) => unsafe { core::ptr::read_volatile(p) },
        None => 0,
    }
}

#[inline(always)]
pub(crate) fn config() -> Option<&'static GlobalConfig> {
    CONFIG.get(0)
}

// Typed reads: map values are copied out at once, so no reference into a map outlives the
// lookup (another CPU may update or delete the entry under it).

/// The enabled pod with this network-namespace cookie.
#[inline(always)]
pub(crate) fn pod_config(netns: u64) -> Option<PodConfig> {
    // SAFETY: copied out at once.
    unsafe { POD_CONFIG.get(&netns) }.copied()
}

/// Socket cookie of the pod's proxy inbound listener for this family.
#[inline(always)]
pub(crate) fn pod_listener(pod_id: u32, v6: bool) -> Option<u64> {
    let map = if v6 { &POD_LISTENER6 } else { &POD_LISTENER };
    // SAFETY: copied out at once.
    unsafe { map.get(&pod_id) }.copied()
}

/// A `POD_PORTS` rule (`PORT_INCLUDE`/`PORT_EXCLUDE`), 0 when there is none.
#[inline(always)]
pub(crate) fn port_rule(key: &PortKey) -> u32 {
    // SAFETY: copied out at once.
    unsafe { POD_PORTS.get(key) }.copied().unwrap_or(0)
}

/// The original destination recorded for the proxy-side socket with this 4-tuple.
#[inline(always)]
pub(crate) fn tuple_orig(key: &SockKey) -> Option<OrigDst> {
    // SAFETY: copied out at once.
    unsafe { TUPLE_ORIG.get(key).or_else(|| TUPLE_PREV.get(key)) }.copied()
}

/// Only the flags of `tuple_orig`: one volatile load instead of a copy of the whole value
/// (what sockops can afford in its instruction budget).
#[inline(always)]
pub(crate) fn tuple_orig_flags(key: &SockKey) -> Option<u32> {
    let orig = TUPLE_ORIG
        .get_ptr(key)
        .or_else(|| TUPLE_PREV.get_ptr(key))?;
    // SAFETY: a valid map value pointer for this program run.
    Some(unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*orig).flags)) })
}

/// Takes the original destination connect4/6 recorded under this socket cookie.
#[inline(always)]
pub(crate) fn take_cookie_orig(cookie: u64) -> Option<OrigDst> {
    // SAFETY: copied out at once.
    if let Some(orig) = unsafe { COOKIE_ORIG.get(&cookie) }.copied() {
        let _ = COOKIE_ORIG.remove(&cookie);
        return Some(orig);
    }
    // A connect that ran under the previous ABI's connect4/6 (see `COOKIE_PREV`).
    // SAFETY: copied out at once.
    let orig = unsafe { COOKIE_PREV.get(&cookie) }.copied()?;
    let _ = COOKIE_PREV.remove(&cookie);
    Some(orig)
}

/// Drops the original destination recorded under this 4-tuple (the socket closed), here and
/// in the previous ABI's map.
#[inline(always)]
pub(crate) fn forget_tuple_orig(key: &SockKey) {
    let _ = TUPLE_ORIG.remove(key);
    let _ = TUPLE_PREV.remove(key);
}

/// The active end's sequence numbers recorded under `key`, removed as they are read.
#[inline(always)]
pub(crate) fn take_peer_seq(key: &SockKey) -> Option<PeerSeq> {
    // SAFETY: copied out at once.
    let seq = unsafe { PEER_SEQ.get(key) }.copied()?;
    let _ = PEER_SEQ.remove(key);
    Some(seq)
}

/// Whether this direction fell back to TCP for good.
#[inline(always)]
pub(crate) fn fell_back(key: &SockKey) -> bool {
    MSG_FALLBACK.get_ptr(key).is_some()
}

/// The history of `key`, if there is one.
#[inline(always)]
pub(crate) fn history(key: &HistKey) -> Option<HistVal> {
    // SAFETY: copied out at once.
    unsafe { MSG_HISTORY.get(key) }.copied()
}

/// Records one connection that carried `msgs` messages in the history of `key`. Two CPUs may
/// update one entry at once and lose one record: the history is a heuristic, and every
/// decision it leads to is order-safe (taken before a connection's first byte).
#[inline(always)]
pub(crate) fn record_history(key: &HistKey, msgs: u32, now_ns: u64) {
    if msgs >= LONG_MSGS {
        count(Counter::MsgHistoryLong);
    } else {
        count(Counter::MsgHistoryShort);
    }
    match MSG_HISTORY.get_ptr_mut(key) {
        // SAFETY: a valid map value pointer for this program run.
        Some(p) => unsafe { (*p).record(msgs, now_ns) },
        None => {
            let mut fresh = HistVal {
                short_streak: 0,
                long: 0,
                last_short_ns: 0,
            };
            fresh.record(msgs, now_ns);
            let _ = MSG_HISTORY.insert(key, &fresh, 0);
        }
    }
}

/// sk_msg: one more message on a connection sockops is tracking (`canonical` key). Once it
/// carried `LONG_MSGS` it is recorded as long at once (a keep-alive connection may never
/// close while it matters) and no longer tracked.
#[inline(always)]
pub(crate) fn count_conn_msg(canonical: &SockKey) {
    let Some(p) = CONN_MSGS.get_ptr_mut(canonical) else {
        return;
    };
    // SAFETY: a valid map value pointer for this program run. Not atomic (the BPF target's
    // `core` has no atomics): the two ends of a request/response connection rarely send at
    // the same instant, and a lost increment only delays "long" by a message.
    let msgs = unsafe {
        let msgs = core::ptr::addr_of_mut!((*p).msgs);
        let n = core::ptr::read_volatile(msgs).saturating_add(1);
        core::ptr::write_volatile(msgs, n);
        n
    };
    if msgs >= LONG_MSGS {
        // SAFETY: as above.
        let hist = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*p).hist)) };
        // Only the CPU whose remove succeeds records it.
        if CONN_MSGS.remove(canonical).is_ok() {
            record_history(&hist, msgs, crate::ctx::now_ns());
        }
    }
}

/// Whether the connecting end of this connection (canonical key) was left on TCP at setup.
#[inline(always)]
pub(crate) fn decided_tcp(canonical: &SockKey) -> bool {
    let Some(p) = CONN_MSGS.get_ptr(canonical) else {
        return false;
    };
    // SAFETY: a valid map value pointer for this program run.
    let flags = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*p).flags)) };
    flags & interceptor_common::history::CONN_TCP != 0
}

/// sockops at close: the tracked connection's count (messages, or the closing socket's data
/// segments if it ran on TCP) goes into its history; the first end to close records it.
#[inline(always)]
pub(crate) fn close_conn(canonical: &SockKey, tcp_segs: u32) {
    // SAFETY: copied out at once.
    let Some(conn) = unsafe { CONN_MSGS.get(canonical) }.copied() else {
        return;
    };
    if CONN_MSGS.remove(canonical).is_err() {
        return;
    }
    let msgs = if conn.flags & interceptor_common::history::CONN_TCP != 0 {
        tcp_segs
    } else {
        conn.msgs
    };
    record_history(&conn.hist, msgs, crate::ctx::now_ns());
}

/// Adds the sock_ops callback's socket to `map` under `key`.
#[inline(always)]
pub(crate) fn add_socket<K>(
    map: &SockHash<K>,
    key: &mut K,
    ctx: &SockOpsContext,
) -> Result<(), i32> {
    // SAFETY: ctx.ops is the live bpf_sock_ops of this callback.
    let ops = unsafe { &mut *ctx.ops };
    map.update(key, ops, BPF_ANY as u64)
}

/// The resolver each socket with a captured UDP DNS query asked, by socket cookie (see
/// `interceptor_common::dns::DnsOrig`). LRU: nothing tells the programs when a UDP socket
/// closes, so the least recently used entries make room.
#[map]
pub(crate) static DNS_ORIG: LruHashMap<u64, DnsOrig> = LruHashMap::pinned(size::DNS_SOCKETS, 0);

/// The resolver the socket `cookie` asked, if it had a query captured.
#[inline(always)]
pub(crate) fn dns_orig(cookie: u64) -> Option<DnsOrig> {
    // SAFETY: the value is copied out at once.
    unsafe { DNS_ORIG.get(&cookie).or_else(|| DNS_PREV.get(&cookie)) }.copied()
}
