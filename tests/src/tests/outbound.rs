//! Outbound: connect4 sends an enabled pod's connections to its sidecar; the sidecar recovers the
//! destination with SO_ORIGINAL_DST and its own connection is not intercepted again.

use std::net::SocketAddr;

use crate::{EchoServer, Harness, connect_from, echo_round_trip, ip4};

const OUTBOUND: &str = "interceptor_proxy_connections_total{direction=\"Outbound\"}";

#[test]
fn very_first_connection_after_enable_goes_through_the_sidecar() {
    let mut h = Harness::new("outbound");
    let client = h.pod("client");
    let server = h.pod("server");
    h.start_agent(&[]);
    h.sidecar(&client);
    let echo = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
    h.enable(&client, &[]);
    let before = h.counters();

    // The first connection of the pod after `pod enable` returned: no warm-up, no probing.
    let stream = connect_from(&client, echo.addr).expect("connect");
    let local = stream.local_addr().expect("local");
    let peer = stream.peer_addr().expect("peer");
    assert_eq!(echo_round_trip(stream, b"first").expect("echo"), b"first");

    // The app's socket really went to its sidecar, bound to its pod address (as with iptables).
    assert_eq!(peer, SocketAddr::from(([127, 0, 0, 1], 15001)));
    assert_eq!(local.ip(), ip4(&client));
    let after = h.counters();
    assert_eq!(after.since(&before, "connect_redirected"), 1);
    assert_eq!(after.since(&before, "orig_dst_answered"), 1);
    assert_eq!(h.proxy_metric(&client, OUTBOUND), 1.0);
    // The sidecar reached the real destination: the server saw one connection from the pod.
    let seen = echo.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].peer.ip(), ip4(&client));
    assert_eq!(seen[0].local, echo.addr);
}

#[test]
fn the_sidecars_own_connection_is_not_intercepted_again() {
    let mut h = Harness::new("noloop");
    let client = h.pod("client");
    let server = h.pod("server");
    h.start_agent(&[]);
    h.sidecar(&client);
    let echo = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
    h.enable(&client, &[]);
    let before = h.counters();
    for i in 0..5u8 {
        let stream = connect_from(&client, echo.addr).expect("connect");
        assert_eq!(echo_round_trip(stream, &[i; 10]).expect("echo"), [i; 10]);
    }
    let after = h.counters();
    // Five app connects redirected, five sidecar connects (UID 1337) left alone: no loop.
    assert_eq!(after.since(&before, "connect_redirected"), 5);
    assert_eq!(after.since(&before, "connect_skipped_proxy"), 5);
    assert_eq!(h.proxy_metric(&client, OUTBOUND), 5.0);
    assert_eq!(echo.seen().len(), 5);
}

#[test]
fn loopback_and_own_address_stay_inside_the_pod() {
    let mut h = Harness::new("podlocal");
    let client = h.pod("client");
    h.start_agent(&[]);
    h.sidecar(&client);
    let on_lo = EchoServer::start(&client, SocketAddr::from(([127, 0, 0, 1], 9100)));
    let on_pod_ip = EchoServer::start(&client, SocketAddr::new(ip4(&client), 9101));
    h.enable(&client, &[]);
    let before = h.counters();
    for echo in [&on_lo, &on_pod_ip] {
        let stream = connect_from(&client, echo.addr).expect("connect");
        assert_eq!(stream.peer_addr().expect("peer"), echo.addr);
        assert_eq!(echo_round_trip(stream, b"local").expect("echo"), b"local");
    }
    let after = h.counters();
    assert_eq!(after.since(&before, "connect_redirected"), 0);
    assert_eq!(after.since(&before, "connect_skipped_loopback"), 1);
    assert_eq!(after.since(&before, "connect_skipped_pod_local"), 1);
}

// Sockets bound before connect (`bind(0.0.0.0:0)`, a fixed port, the pod address, `::`) are
// covered in `bypass.rs`: they go through the sidecar too.
