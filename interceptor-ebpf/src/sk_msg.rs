//! `sk_msg` on the `SOCKS` sockhash: every message an intercepted socket sends goes straight
//! into its peer's receive queue (`bpf_msg_redirect_hash` with `BPF_F_INGRESS`), skipping the
//! TCP/IP stack and netfilter. A same-node pod→pod socket (see sockops.rs) is keyed node-wide.

use aya_ebpf::{
    bindings::{sk_action, BPF_F_INGRESS},
    macros::sk_msg,
    programs::SkMsgContext,
};
use interceptor_common::{
    config::{CONFIG_MSG_ADAPTIVE, CONFIG_MSG_REDIRECT},
    counters::Counter,
    history::canonical,
    sockmap::{is_pod_to_pod, SockKey, POD_TO_POD_NETNS},
};

use crate::{
    ctx,
    maps::{self, config, count, netns_key, MSG_FALLBACK, NETNS_KEYS, SOCKS},
};

#[sk_msg]
pub fn msg_to_peer(ctx: SkMsgContext) -> u32 {
    redirect(&ctx);
    // Never drop: when the redirect does not happen the message goes over TCP as usual.
    sk_action::SK_PASS
}

#[inline(always)]
fn redirect(ctx: &SkMsgContext) {
    let Some(cfg) = config() else {
        count(Counter::MsgRedirectDisabled);
        return;
    };
    if cfg.flags & CONFIG_MSG_REDIRECT == 0 {
        count(Counter::MsgRedirectDisabled);
        return;
    }
    let (local_ip, remote_ip, local_port, remote_port) = ctx::msg_tuple(ctx);
    // The same choice sockops made when it inserted the socket, from the tuple alone.
    let pod_to_pod =
        NETNS_KEYS.load() != 0 && is_pod_to_pod(&local_ip, &remote_ip, &cfg.passthrough_ip6);
    let key = SockKey {
        local_ip,
        remote_ip,
        local_port,
        remote_port,
        netns: if pod_to_pod {
            POD_TO_POD_NETNS
        } else {
            netns_key(ctx)
        },
    };
    // The adaptive policy learns how many messages this pod and port's connections carry.
    if cfg.flags & CONFIG_MSG_ADAPTIVE != 0 {
        maps::count_conn_msg(&canonical(&key));
    }
    // Once a direction sent over TCP, redirected bytes could overtake bytes still in flight:
    // the receiver reads its redirect queue first. Stay on TCP for good.
    if maps::fell_back(&key) {
        count(Counter::MsgFallbackPass);
        return;
    }
    let mut peer = key.mirror();
    if SOCKS.redirect_msg(ctx, &mut peer, BPF_F_INGRESS as u64) == sk_action::SK_PASS as i64 {
        count(Counter::MsgRedirected);
        if pod_to_pod {
            count(Counter::MsgRedirectedPodToPod);
        }
    } else {
        // The peer is not in the sockhash (yet): typically the app wrote before the peer's
        // end of the handshake was processed. This message takes TCP, and so must the rest.
        let _ = MSG_FALLBACK.insert(&key, &1, 0);
        count(Counter::MsgRedirectFailed);
        if pod_to_pod {
            count(Counter::MsgRedirectFailedPodToPod);
        }
        // Half TCP, half redirect is slower than either (measured: every TCP segment is
        // acknowledged by a bare ACK, never piggybacked, and both stacks run per request), so
        // the reverse direction leaves the redirect too. That one is order-safe: its reader
        // drains the redirect queue before it reads TCP bytes.
        if MSG_FALLBACK.insert(&peer, &1, 0).is_ok() {
            count(Counter::MsgFallbackReverse);
        }
    }
}
