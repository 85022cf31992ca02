//! Inbound: sk_lookup on the pod's network namespace hands connections to the sidecar's 15006;
//! the sidecar goes on to the original destination from 127.0.0.6 (Istio >= 1.10 semantics).

use std::{
    io::Read,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use crate::{EchoServer, Harness, connect_from, echo_round_trip, ip4};

const INBOUND: &str = "interceptor_proxy_connections_total{direction=\"Inbound\"}";

#[test]
fn inbound_lands_on_the_sidecar_and_reaches_an_app_bound_to_its_pod_ip() {
    let mut h = Harness::new("inbound");
    let client = h.pod("client");
    let server = h.pod("server");
    h.start_agent(&[]);
    h.sidecar(&server);
    let echo = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
    h.enable(&server, &[]);
    h.wait_inbound_ready(&server);
    let before = h.counters();

    // The client pod is not meshed: only the server's inbound capture is involved.
    let stream = connect_from(&client, echo.addr).expect("connect");
    assert_eq!(echo_round_trip(stream, b"in").expect("echo"), b"in");

    let after = h.counters();
    after.assert_steered_inbound(&before);
    // The sidecar's SO_ORIGINAL_DST: the pod address and port the client asked for.
    assert_eq!(after.since(&before, "orig_dst_local"), 1);
    assert_eq!(after.since(&before, "connect_passthrough"), 1);
    assert_eq!(h.proxy_metric(&server, INBOUND), 1.0);
    let seen = echo.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].peer.ip(), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)));
    assert_eq!(seen[0].local, echo.addr);
}

#[test]
fn an_app_bound_only_to_loopback_is_not_exposed() {
    let mut h = Harness::new("private");
    let client = h.pod("client");
    let server = h.pod("server");
    h.start_agent(&[]);
    h.sidecar(&server);
    let private = EchoServer::start(&server, SocketAddr::from(([127, 0, 0, 1], 9001)));
    h.enable(&server, &[]);
    h.wait_inbound_ready(&server);
    let before = h.counters();

    // From outside, the pod's address on that port: the sidecar takes it but finds no app.
    let outside = SocketAddr::new(ip4(&server), 9001);
    let mut stream = connect_from(&client, outside).expect("the sidecar accepts");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = [0u8; 1];
    let got = stream.read(&mut buf);
    assert!(
        matches!(got, Ok(0) | Err(_)),
        "no app should answer: {got:?}"
    );
    assert!(private.seen().is_empty());
    h.counters().assert_steered_inbound(&before);

    // Inside the pod, the app is reachable on loopback as before.
    let inside = connect_from(&server, private.addr).expect("connect");
    assert_eq!(echo_round_trip(inside, b"lo").expect("echo"), b"lo");
}

#[test]
fn inbound_is_refused_while_no_sidecar_listens() {
    let mut h = Harness::new("nolistener");
    let client = h.pod("client");
    let server = h.pod("server");
    h.start_agent(&[]);
    let echo = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
    h.enable(&server, &[]);
    let before = h.counters();
    // Like a REDIRECT to a closed 15006: refused, never a silent bypass of the proxy.
    assert!(connect_from(&client, echo.addr).is_err());
    assert!(echo.seen().is_empty());
    assert!(h.counters().since(&before, "inbound_no_listener") >= 1);
    // Once the sidecar starts, the agent registers it and inbound works.
    h.sidecar(&server);
    h.wait_inbound_ready(&server);
    let stream = connect_from(&client, echo.addr).expect("connect");
    assert_eq!(echo_round_trip(stream, b"ok").expect("echo"), b"ok");
    assert_eq!(
        echo.seen()[0].peer.ip(),
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6))
    );
}

#[test]
fn pod_to_pod_through_both_sidecars() {
    let mut h = Harness::new("both");
    let client = h.pod("client");
    let server = h.pod("server");
    h.start_agent(&[]);
    h.sidecar(&client);
    h.sidecar(&server);
    let echo = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
    h.enable(&client, &[]);
    h.enable(&server, &[]);
    h.wait_inbound_ready(&server);
    let before = h.counters();
    let stream = connect_from(&client, echo.addr).expect("connect");
    assert_eq!(echo_round_trip(stream, b"mesh").expect("echo"), b"mesh");
    let after = h.counters();
    assert_eq!(after.since(&before, "connect_redirected"), 1);
    after.assert_steered_inbound(&before);
    assert_eq!(after.since(&before, "connect_passthrough"), 1);
    // app↔client sidecar and server sidecar↔app: four sockets in the sockhash.
    assert_eq!(after.since(&before, "sockhash_insert"), 4);
    assert_eq!(
        echo.seen()[0].peer.ip(),
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6))
    );
}
