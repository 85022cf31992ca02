//! `sockops` at the cgroup v2 root: both ends of every intercepted local connection go into the
//! `SOCKS` sockhash, keyed by their 4-tuple, so `msg_to_peer` can move bytes between them; so do
//! both ends of a connection from one enabled pod to another on this node (the client sidecar's
//! upstream socket and the server sidecar's socket `steer_inbound` handed it), keyed node-wide.
//! Also registers listeners on the inbound port for `steer_inbound`.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_LISTEN_CB,
    },
    macros::sock_ops,
    programs::SockOpsContext,
};
use aya_log_ebpf::warn;
use interceptor_common::{
    config::{
        CONFIG_APP_NODELAY, CONFIG_MSG_ADAPTIVE, CONFIG_MSG_BRAKE, CONFIG_MSG_REDIRECT,
        CONFIG_POD_TO_POD,
    },
    counters::Counter,
    event::{Event, EVENT_LISTENER},
    history::{canonical, ConnMsgs, HistKey, CONN_TCP, KIND_POD_TO_POD},
    origdst::{ORIG_NO_SOCKMAP, ORIG_SKIP_SHORT},
    pod::{POD_INBOUND, POD_NO_SOCKMAP},
    sockmap::{is_pod_to_pod, PeerSeq, SockKey, POD_TO_POD_NETNS},
};

use crate::{
    ctx,
    maps::{
        self, config, count, netns_key, pod_of, CONN_MSGS, EVENTS, LISTENERS, MSG_FALLBACK,
        NETNS_KEYS, PEER_SEQ, SOCKS, TUPLE_ORIG,
    },
    policy,
};

/// `TCP_CLOSE` from include/net/tcp_states.h.
const TCP_CLOSE: u32 = 7;

#[sock_ops]
pub fn track_sockets(ctx: SockOpsContext) -> u32 {
    let op = ctx::ops_op(&ctx);
    // The test build's difference (see the feature in Cargo.toml): one extra count.
    #[cfg(feature = "upgrade-probe")]
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        count(Counter::UpgradeProbe);
    }
    // The ABI test build's difference: a count in the slot only its ABI has.
    #[cfg(feature = "abi-probe")]
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        count(Counter::AbiProbe);
    }
    match op {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_active_established(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_passive_established(&ctx),
        BPF_SOCK_OPS_STATE_CB => on_state_change(&ctx),
        BPF_SOCK_OPS_TCP_LISTEN_CB => on_listen(&ctx),
        _ => {}
    }
    0
}

/// The socket's 4-tuple from its own point of view, or None for non-IP families.
#[inline(always)]
fn own_tuple(ctx: &SockOpsContext) -> Option<SockKey> {
    let (local_ip, remote_ip, local_port, remote_port) = ctx::ops_tuple(ctx)?;
    Some(SockKey {
        local_ip,
        remote_ip,
        local_port,
        remote_port,
        netns: netns_key(ctx),
    })
}

#[inline(always)]
fn redirect_enabled() -> bool {
    matches!(config(), Some(cfg) if cfg.flags & CONFIG_MSG_REDIRECT != 0)
}

/// One end of an in-pod hop of an enabled pod (a socket connect4/6 recorded, or its accepted
/// peer): `TCP_NODELAY`, whether or not it joins the sockhash (a joined socket can fall back
/// to TCP later, when sk_msg can no longer set options). A redirected hop never Nagles
/// (`tcp_bpf_sendmsg` hands each sendmsg over whole), so this only makes a hop left on
/// loopback TCP behave like it: Nagle there saves nothing (the proxy re-segments what it
/// forwards) and, with a corked app (nginx `tcp_nopush`), holds the response's tail until the
/// proxy's delayed ACK, 40 ms (README, issue 15). Never for other sockets: host, pods not
/// enabled, iptables-mode pods, the pod→pod hop. A failure leaves the socket as it was.
#[inline(always)]
fn app_nodelay(ctx: &SockOpsContext) {
    if !matches!(config(), Some(cfg) if cfg.flags & CONFIG_APP_NODELAY != 0) {
        return;
    }
    // A failure leaves the socket as it was; not logged (it would be once per connection,
    // and the agent only sets the flag where the kernel takes the option).
    let _ = ctx::ops_set_nodelay(ctx);
}

#[inline(always)]
fn add_to_sockhash(ctx: &SockOpsContext, key: &mut SockKey, inserted: Counter) {
    match maps::add_socket(&SOCKS, key, ctx) {
        Ok(()) => count(inserted),
        Err(err) => {
            count(Counter::SockhashInsertFailed);
            warn!(ctx, "sockhash insert failed: {}", err);
        }
    }
    // Ask for state changes so the connection's entries are cleaned up when it closes.
    let _ = ctx.set_cb_flags((ctx::ops_cb_flags(ctx) | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

/// The app's side (connect4/6 remembered its cookie): record the original destination under
/// the 4-tuple the proxy's accepted socket will have, and add the app socket.
#[inline(always)]
fn on_active_established(ctx: &SockOpsContext) {
    let Some(mut key) = own_tuple(ctx) else {
        return;
    };
    let Some(mut orig) = maps::take_cookie_orig(ctx::socket_cookie(ctx)) else {
        // Not an app connection connect4/6 redirected: perhaps a sidecar's upstream
        // connection to another pod of this node.
        pod_to_pod(ctx, &mut key, true);
        return;
    };
    app_nodelay(ctx);
    let wanted = redirect_enabled() && orig.flags & ORIG_NO_SOCKMAP == 0;
    let hist = HistKey {
        netns: key.netns,
        port: orig.port,
        kind: orig.kind,
    };
    let join = wanted && pays_to_redirect(&key, hist);
    if wanted && !join {
        // Decided before the first byte, for both ends: the accepted end reads this flag.
        orig.flags |= ORIG_SKIP_SHORT;
    }
    // The peer's entry is what tells on_passive_established (and getsockopt) that the accepted
    // socket belongs to an intercepted connection.
    if TUPLE_ORIG.insert(&key.mirror(), &orig, 0).is_err() {
        count(Counter::ConnectMapFull);
        return;
    }
    if join {
        add_to_sockhash(ctx, &mut key, Counter::SockhashInsert);
    } else {
        let _ = ctx.set_cb_flags((ctx::ops_cb_flags(ctx) | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
}

/// Whether a new app↔proxy (or passthrough) connection should join the sockhash, decided once
/// at the connecting end's established callback, before either end can send a byte (so a
/// connection is redirected from its first byte or never). The psock setup costs more than a
/// connection carrying one request and its response saves (measured: connection per request
/// 0.93× with sk_msg), so under `--msg-redirect-policy adaptive` a pod and port whose recent
/// connections closed after few messages stay on loopback TCP. Every decided connection is
/// tracked in `CONN_MSGS` so its pod and port keep learning, on TCP too.
#[inline(always)]
fn pays_to_redirect(key: &SockKey, hist: HistKey) -> bool {
    let Some(cfg) = config() else {
        return true;
    };
    let brake = cfg.flags & CONFIG_MSG_BRAKE != 0;
    if !brake && cfg.flags & CONFIG_MSG_ADAPTIVE == 0 {
        return true;
    }
    let join = match maps::history(&hist) {
        _ if brake => {
            count(Counter::MsgSetupSkippedMemoryPressure);
            false
        }
        Some(h) => {
            count(Counter::MsgSetupHistoryHit);
            !h.says_short(ctx::now_ns())
        }
        None => {
            count(Counter::MsgSetupHistoryMiss);
            true
        }
    };
    if !join && !brake {
        count(Counter::MsgSetupSkippedShortLived);
    }
    let conn = ConnMsgs {
        hist,
        msgs: 0,
        flags: if join { 0 } else { CONN_TCP },
    };
    let _ = CONN_MSGS.insert(&canonical(key), &conn, 0);
    join
}

/// The proxy's (or, for passthrough, the app's) accepted side of an intercepted connection.
#[inline(always)]
fn on_passive_established(ctx: &SockOpsContext) {
    let Some(mut key) = own_tuple(ctx) else {
        return;
    };
    let Some(flags) = maps::tuple_orig_flags(&key) else {
        // Not the peer of a redirected connect: perhaps a connection from another pod of this
        // node that steer_inbound handed to this pod's proxy.
        pod_to_pod(ctx, &mut key, false);
        return;
    };
    app_nodelay(ctx);
    // ORIG_SKIP_SHORT: the connecting end stayed out (see `pays_to_redirect`), so must this one.
    if redirect_enabled() && flags & (ORIG_NO_SOCKMAP | ORIG_SKIP_SHORT) == 0 {
        add_to_sockhash(ctx, &mut key, Counter::SockhashInsert);
    } else {
        let _ = ctx.set_cb_flags((ctx::ops_cb_flags(ctx) | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
}

/// A tracked socket closed: it leaves the sockhash by itself; drop what is keyed by its tuple.
#[inline(always)]
fn on_state_change(ctx: &SockOpsContext) {
    if ctx::ops_arg1(ctx) != TCP_CLOSE {
        return;
    }
    let Some(mut key) = own_tuple(ctx) else {
        return;
    };
    maps::forget_tuple_orig(&key);
    // The key sk_msg used for this socket's direction (see `msg_to_peer`).
    if let Some(cfg) = config() {
        if NETNS_KEYS.load() != 0
            && is_pod_to_pod(&key.local_ip, &key.remote_ip, &cfg.passthrough_ip6)
        {
            key.netns = POD_TO_POD_NETNS;
            // An active end that closed before its passive end was established.
            let _ = PEER_SEQ.remove(&key);
        }
    }
    // A connection the adaptive policy decided for: what it carried goes into its history.
    maps::close_conn(&canonical(&key), ctx::ops_data_segs(ctx));
    let _ = MSG_FALLBACK.remove(&key);
    count(Counter::SockhashRemove);
}

/// A connection between two enabled pods of this node: both ends go into the sockhash under
/// the node-wide key (`POD_TO_POD_NETNS`), so sk_msg moves the bytes from one pod's socket
/// into the other's without either TCP stack or the veths. Both ends decide alike, from the
/// same maps: the active end (`active`, the client) and the passive one (the server pod's
/// socket, normally its proxy's, which steer_inbound chose) each check that
/// - the kernel lets every program read namespace cookies (>= 5.15; else in-pod keys are
///   node-wide too and could collide with this one),
/// - its own namespace is the one `POD_IPS` gives for its local address (an enabled pod, and
///   never another namespace reusing a pod's address: that keeps the key unique),
/// - the remote address belongs to another enabled pod,
/// - neither pod asked `--no-sockmap`, and the server pod captures the port inbound (a
///   connection that does not go through its proxy is not ours to move).
///
/// A socket of the host, of a pod that is not enabled, or any other is left alone. The
/// handshake has crossed the veths already (a connection a policy drops never gets here).
#[inline(always)]
fn pod_to_pod(ctx: &SockOpsContext, key: &mut SockKey, active: bool) {
    if NETNS_KEYS.load() == 0 {
        return;
    }
    let Some(cfg) = config() else {
        return;
    };
    let wanted = CONFIG_MSG_REDIRECT | CONFIG_POD_TO_POD;
    if cfg.flags & wanted != wanted
        || !is_pod_to_pod(&key.local_ip, &key.remote_ip, &cfg.passthrough_ip6)
    {
        return;
    }
    let owner = pod_of(&key.local_ip);
    let peer = pod_of(&key.remote_ip);
    // Not between two pod addresses of this node: nothing to count.
    if owner == 0 || peer == 0 {
        return;
    }
    if owner != key.netns || peer == owner {
        count(Counter::PodToPodSkipped);
        return;
    }
    let (Some(own_pod), Some(peer_pod)) = (maps::pod_config(owner), maps::pod_config(peer)) else {
        count(Counter::PodToPodSkipped);
        return;
    };
    let (server, port) = if active {
        (peer_pod, key.remote_port)
    } else {
        (own_pod, key.local_port)
    };
    if (own_pod.flags | peer_pod.flags) & POD_NO_SOCKMAP != 0
        || server.flags & POD_INBOUND == 0
        || !policy::inbound_captures(&server, port as u16)
    {
        count(Counter::PodToPodSkipped);
        return;
    }
    key.netns = POD_TO_POD_NETNS;
    // A mirrored tuple does not prove the two sockets are one connection: NAT can give another
    // connection the same tuple (a Service address's DNAT whose source port conntrack remapped
    // to avoid a clash), and a TCP Fast Open child is established at the SYN, its data queued
    // before its client joins. So the active end (always established first) records its
    // sequence numbers, and the passive end joins only if its own mirror them exactly.
    let (snd_nxt, rcv_nxt) = ctx::ops_seq(ctx);
    if active {
        // The adaptive policy, decided here for both ends: without a `PEER_SEQ` entry the
        // passive end stays out too (it finds this decision in `CONN_MSGS`).
        let hist = HistKey {
            netns: owner,
            port: key.remote_port,
            kind: KIND_POD_TO_POD,
        };
        if !pays_to_redirect(key, hist) {
            let _ = ctx.set_cb_flags((ctx::ops_cb_flags(ctx) | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            return;
        }
        if PEER_SEQ
            .insert(&*key, &PeerSeq { snd_nxt, rcv_nxt }, 0)
            .is_err()
        {
            count(Counter::PodToPodSkipped);
            return;
        }
    } else {
        match maps::take_peer_seq(&key.mirror()) {
            Some(peer) if peer.snd_nxt == rcv_nxt && peer.rcv_nxt == snd_nxt => {}
            _ => {
                if !maps::decided_tcp(&canonical(key)) {
                    count(Counter::PodToPodUnproven);
                }
                // Tracked anyway: a failed redirect of its peer leaves entries under its key.
                let _ =
                    ctx.set_cb_flags((ctx::ops_cb_flags(ctx) | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
                return;
            }
        }
    }
    add_to_sockhash(ctx, key, Counter::PodToPodInsert);
}

/// listen() on the inbound port: keep the socket so `steer_inbound` can hand connections to it
/// once the agent has matched it to its pod, and wake the agent to do that.
#[inline(always)]
fn on_listen(ctx: &SockOpsContext) {
    let Some(cfg) = config() else {
        return;
    };
    let port = ctx::ops_local_port(ctx);
    if port != cfg.inbound_port {
        return;
    }
    // Only an enabled, inbound-capturing pod's proxy belongs in the node-wide LISTENERS map
    // and deserves waking the agent: a flood of listeners elsewhere must neither fill it nor
    // cost the agent work. Kernels < 5.15 cannot tell the namespace here; there the agent
    // still only registers listeners of enabled pods (and inserts them itself if missing).
    let netns = netns_key(ctx);
    if netns != 0 {
        match maps::pod_config(netns) {
            Some(pod) if pod.flags & POD_INBOUND != 0 => {}
            _ => {
                count(Counter::ListenerSkippedNotPod);
                return;
            }
        }
    }
    let mut cookie = ctx::socket_cookie(ctx);
    if maps::add_socket(&LISTENERS, &mut cookie, ctx).is_ok() {
        count(Counter::ListenerInsert);
    }
    let event = Event {
        kind: EVENT_LISTENER,
        port,
        cookie,
    };
    let _ = EVENTS.output::<Event>(&event, 0);
}
