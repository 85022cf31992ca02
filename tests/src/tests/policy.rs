//! Per-pod switches with Istio's semantics: excluded/included ports and ranges, both directions.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::{EchoServer, Harness, connect_from, echo_round_trip, ip4};

fn direct(h: &Harness, from: &crate::LabPod, echo: &EchoServer) {
    let stream = connect_from(from, echo.addr).expect("connect");
    assert_eq!(stream.peer_addr().expect("peer"), echo.addr, "went direct");
    assert_eq!(echo_round_trip(stream, b"x").expect("echo"), b"x");
    let _ = h;
}

fn through_sidecar(from: &crate::LabPod, echo: &EchoServer) {
    let stream = connect_from(from, echo.addr).expect("connect");
    assert_eq!(
        stream.peer_addr().expect("peer"),
        SocketAddr::from(([127, 0, 0, 1], 15001)),
        "went to the sidecar"
    );
    assert_eq!(echo_round_trip(stream, b"x").expect("echo"), b"x");
}

#[test]
fn excluded_outbound_ports_and_ranges_bypass_the_sidecar() {
    let mut h = Harness::new("exclout");
    let client = h.pod("client");
    let server = h.pod("server");
    let other = h.pod("other");
    h.start_agent(&[]);
    h.sidecar(&client);
    let port_excluded = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
    let captured = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9001));
    let range_excluded = EchoServer::start(&other, SocketAddr::new(ip4(&other), 9001));
    h.enable(
        &client,
        &[
            "--exclude-outbound-ports",
            "9000",
            "--exclude-outbound-cidrs",
            &format!("{}/32", other.ip),
        ],
    );
    let before = h.counters();
    direct(&h, &client, &port_excluded);
    direct(&h, &client, &range_excluded);
    through_sidecar(&client, &captured);
    let after = h.counters();
    assert_eq!(after.since(&before, "connect_skipped_port"), 1);
    assert_eq!(after.since(&before, "connect_skipped_cidr"), 1);
    assert_eq!(after.since(&before, "connect_redirected"), 1);
}

#[test]
fn include_lists_capture_only_what_they_name() {
    let mut h = Harness::new("inclout");
    let client = h.pod("client");
    let server = h.pod("server");
    let other = h.pod("other");
    h.start_agent(&[]);
    h.sidecar(&client);
    let in_range = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
    let out_of_range = EchoServer::start(&other, SocketAddr::new(ip4(&other), 9000));
    let included_port = EchoServer::start(&other, SocketAddr::new(ip4(&other), 9443));
    // Only the server's /32 is captured, plus port 9443 wherever it goes.
    h.enable(
        &client,
        &[
            "--include-outbound-cidrs",
            &format!("{}/32", server.ip),
            "--include-outbound-ports",
            "9443",
        ],
    );
    let before = h.counters();
    through_sidecar(&client, &in_range);
    direct(&h, &client, &out_of_range);
    through_sidecar(&client, &included_port);
    let after = h.counters();
    assert_eq!(after.since(&before, "connect_redirected"), 2);
    assert_eq!(after.since(&before, "connect_skipped_not_included"), 1);
}

#[test]
fn excluded_and_unlisted_inbound_ports_reach_the_app_directly() {
    let mut h = Harness::new("exclin");
    let client = h.pod("client");
    let server = h.pod("server");
    h.start_agent(&[]);
    h.sidecar(&server);
    let excluded = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
    let captured = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9001));
    h.enable(&server, &["--exclude-inbound-ports", "9000"]);
    h.wait_inbound_ready(&server);
    let before = h.counters();
    for echo in [&excluded, &captured] {
        let s = connect_from(&client, echo.addr).expect("connect");
        assert_eq!(echo_round_trip(s, b"in").expect("echo"), b"in");
    }
    assert_eq!(excluded.seen()[0].peer.ip(), ip4(&client), "direct");
    assert_eq!(
        captured.seen()[0].peer.ip(),
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)),
        "through the sidecar"
    );
    let after = h.counters();
    // Per lookup, not per connection (a late segment counts again): the apps count these.
    assert!(after.since(&before, "inbound_skipped_port") >= 1);
    assert_eq!(excluded.seen().len(), 1);
    assert_eq!(captured.seen().len(), 1);
    after.assert_steered_inbound(&before);

    // includeInboundPorts as a list: only the listed port is captured.
    h.enable(&server, &["--include-inbound-ports", "9000"]);
    let s = connect_from(&client, captured.addr).expect("connect");
    assert_eq!(echo_round_trip(s, b"in").expect("echo"), b"in");
    assert_eq!(
        captured.seen()[1].peer.ip(),
        ip4(&client),
        "9001 no longer listed"
    );
}

#[test]
fn the_sidecars_own_ports_are_never_captured_inbound() {
    let mut h = Harness::new("ownports");
    let client = h.pod("client");
    let server = h.pod("server");
    h.start_agent(&[]);
    h.sidecar(&server);
    h.enable(&server, &[]);
    h.wait_inbound_ready(&server);
    let before = h.counters();
    // Prometheus (15090) and health (15021) answer from the sidecar itself, not via 15006.
    for (port, path) in [(15090, "/stats/prometheus"), (15021, "/healthz/ready")] {
        let resp = client
            .run(|| {
                interceptor_lab::testapp::http_get(
                    SocketAddr::new(ip4(&server), port),
                    path,
                    std::time::Duration::from_secs(5),
                )
            })
            .expect("netns")
            .expect("http");
        assert_eq!(resp.status, 200, "port {port}");
    }
    let after = h.counters();
    assert_eq!(after.since(&before, "inbound_assigned"), 0);
    assert!(after.since(&before, "inbound_skipped_port") >= 2);
}
