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

/// The app side's 4-tuple keys the sockhash and the original-destination map, so it must be
/// unique on the node: the pod's address is bound as its source. A socket that already has a
/// port (`bind(0.0.0.0:0)`) cannot get one; it is left alone rather than redirected with a
/// tuple another pod could share. A socket bound to its pod address is fine.
#[test]
fn a_socket_whose_source_cannot_be_made_unique_is_left_alone() {
    use socket2::{Domain, Socket, Type};

    let mut h = Harness::new("prebound");
    let client = h.pod("client");
    let server = h.pod("server");
    h.start_agent(&[]);
    h.sidecar(&client);
    let echo = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
    h.enable(&client, &[]);
    let connect_bound_to = |source: SocketAddr| {
        client
            .run(|| {
                let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
                s.bind(&source.into())?;
                s.connect_timeout(&echo.addr.into(), std::time::Duration::from_secs(5))?;
                Ok::<_, std::io::Error>(std::net::TcpStream::from(s))
            })
            .expect("netns")
            .expect("connect")
    };
    for (source, redirected) in [
        (SocketAddr::from(([0, 0, 0, 0], 0)), false),
        (SocketAddr::new(ip4(&client), 0), true),
    ] {
        let before = h.counters();
        let stream = connect_bound_to(source);
        let peer = stream.peer_addr().expect("peer");
        assert_eq!(echo_round_trip(stream, b"bound").expect("echo"), b"bound");
        let after = h.counters();
        if redirected {
            assert_eq!(peer, SocketAddr::from(([127, 0, 0, 1], 15001)), "{source}");
            assert_eq!(after.since(&before, "connect_redirected"), 1, "{source}");
        } else {
            assert_eq!(peer, echo.addr, "{source}: went direct");
            assert_eq!(after.since(&before, "connect_redirected"), 0, "{source}");
            assert_eq!(
                after.since(&before, "connect_skipped_source"),
                1,
                "{source}"
            );
        }
    }
}
