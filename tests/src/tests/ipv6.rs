//! IPv6 pods (fd00:198:18::/48): connect6 and sk_lookup handle them like IPv4, with Istio's ::6
//! as the inbound passthrough source.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::{EchoServer, Harness, connect_from, echo_round_trip, payload};

#[test]
fn ipv6_pod_to_pod_through_both_sidecars() {
    let mut h = Harness::new("ipv6");
    let client = h.pod("client");
    let server = h.pod("server");
    h.start_agent(&[]);
    h.sidecar(&client);
    h.sidecar(&server);
    let echo = EchoServer::start(&server, SocketAddr::new(IpAddr::V6(server.ip6), 9000));
    h.enable(&client, &[]);
    h.enable(&server, &[]);
    h.wait_inbound_ready(&server);
    let before = h.counters();
    let s = connect_from(&client, echo.addr).expect("connect");
    assert_eq!(
        s.peer_addr().expect("peer"),
        SocketAddr::from((Ipv6Addr::LOCALHOST, 15001))
    );
    assert_eq!(s.local_addr().expect("local").ip(), IpAddr::V6(client.ip6));
    let data = payload(1 << 20);
    assert!(echo_round_trip(s, &data).expect("echo") == data);
    let after = h.counters();
    assert_eq!(after.since(&before, "connect_redirected"), 1);
    assert_eq!(after.since(&before, "orig_dst_answered"), 1);
    after.assert_steered_inbound(&before);
    assert_eq!(after.since(&before, "connect_passthrough"), 1);
    assert!(after.since(&before, "msg_redirected") > 0);
    assert_eq!(echo.seen().len(), 1);
    assert_eq!(
        echo.seen()[0].peer.ip(),
        IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6))
    );
    // The sidecar→sidecar hop between the two pods' IPv6 addresses is short-circuited too
    // where the kernel can (the ::6 passthrough hop keeps its in-pod key).
    if interceptor::bpf::features::Features::probe().pod_to_pod() {
        assert_eq!(after.since(&before, "pod_to_pod_insert"), 2);
        if after.since(&before, "msg_redirected_pod_to_pod") == 0 {
            // Sidecar A's first write beat sidecar B's accept into the sockhash (a loaded
            // guest): that hop stays on TCP, counted. A second connection must make it.
            assert!(after.since(&before, "msg_redirect_failed_pod_to_pod") > 0);
            let again = h.counters();
            let s = connect_from(&client, echo.addr).expect("connect");
            assert!(echo_round_trip(s, &data).expect("echo") == data);
            assert!(h.counters().since(&again, "msg_redirected_pod_to_pod") > 0);
        }
    }
    assert_eq!(after.since(&before, "sockhash_insert"), 4);
}
