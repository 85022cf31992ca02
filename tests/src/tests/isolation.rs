//! Pods that are not enabled and host processes are never touched.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
};

use crate::{EchoServer, Harness, connect_from, echo_round_trip, ip4};

#[test]
fn a_pod_that_is_not_enabled_is_untouched() {
    let mut h = Harness::new("notenabled");
    let meshed = h.pod("meshed");
    let plain = h.pod("plain");
    let server = h.pod("server");
    h.start_agent(&[]);
    h.sidecar(&meshed);
    h.sidecar(&plain);
    let echo = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
    h.enable(&meshed, &[]);
    let before = h.counters();
    let s = connect_from(&plain, echo.addr).expect("connect");
    assert_eq!(s.peer_addr().expect("peer"), echo.addr);
    assert_eq!(echo_round_trip(s, b"plain").expect("echo"), b"plain");
    assert_eq!(echo.seen()[0].peer.ip(), ip4(&plain));
    let after = h.counters();
    assert_eq!(after.since(&before, "connect_redirected"), 0);
    assert_eq!(after.since(&before, "sockhash_insert"), 0);
}

#[test]
fn host_processes_are_untouched() {
    let mut h = Harness::new("host");
    let pod = h.pod("meshed");
    h.start_agent(&[]);
    h.sidecar(&pod);
    h.enable(&pod, &[]);
    let before = h.counters();
    // This test process lives in the host's network namespace.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let client = TcpStream::connect(addr).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    assert_eq!(client.peer_addr().expect("peer"), addr);
    // No original destination is made up for a host socket.
    assert!(socket2::SockRef::from(&server).original_dst().is_err());
    let _ = client.as_raw_fd();
    let after = h.counters();
    assert_eq!(after.since(&before, "connect_redirected"), 0);
    assert_eq!(after.since(&before, "orig_dst_answered"), 0);
    assert_eq!(after.since(&before, "orig_dst_local"), 0);
}
