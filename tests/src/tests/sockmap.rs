//! The app↔proxy hop: sockops puts both ends in the sockhash, sk_msg moves the bytes from one
//! socket into the other. Payload intact (order too), large transfers, entries gone on close.

use std::{
    io::{Read, Write},
    net::SocketAddr,
    time::Duration,
};

use crate::{EchoServer, Harness, connect_from, echo_round_trip, ip4, payload, wait_until};

#[test]
fn large_transfer_is_carried_by_sk_msg_intact() {
    let mut h = Harness::new("skmsg");
    let client = h.pod("client");
    let server = h.pod("server");
    h.start_agent(&[]);
    h.sidecar(&client);
    let echo = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
    h.enable(&client, &[]);
    let before = h.counters();
    let data = payload(16 << 20);
    let stream = connect_from(&client, echo.addr).expect("connect");
    let back = echo_round_trip(stream, &data).expect("echo");
    assert_eq!(back.len(), data.len());
    assert!(back == data, "payload corrupted or reordered");
    let after = h.counters();
    assert!(after.since(&before, "msg_redirected") > 0);
    assert_eq!(
        after.since(&before, "sockhash_insert"),
        2,
        "app and sidecar sockets"
    );
}

#[test]
fn many_small_round_trips_keep_their_order() {
    let mut h = Harness::new("pingpong");
    let client = h.pod("client");
    let server = h.pod("server");
    h.start_agent(&[]);
    h.sidecar(&client);
    let echo = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
    h.enable(&client, &[]);
    let before = h.counters();
    let mut stream = connect_from(&client, echo.addr).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    for i in 0..2000u32 {
        let msg = [i.to_be_bytes(), (!i).to_be_bytes()].concat();
        stream.write_all(&msg).expect("write");
        let mut back = [0u8; 8];
        stream.read_exact(&mut back).expect("read");
        assert_eq!(back.as_slice(), msg.as_slice(), "round trip {i}");
    }
    let after = h.counters();
    // Every app write and every sidecar write toward the app crosses the sockhash.
    assert!(after.since(&before, "msg_redirected") >= 4000);
}

#[test]
fn sockhash_entries_go_back_to_zero_when_connections_close() {
    let mut h = Harness::new("sockclose");
    let client = h.pod("client");
    let server = h.pod("server");
    h.start_agent(&[]);
    h.sidecar(&client);
    let echo = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
    h.enable(&client, &[]);
    assert_eq!(h.status()["sockhash_entries"], 0);
    let streams: Vec<_> = (0..3)
        .map(|_| connect_from(&client, echo.addr).expect("connect"))
        .collect();
    // Both ends of each app↔sidecar connection, nothing else (the upstream hop is not local).
    wait_until(Duration::from_secs(5), || {
        h.status()["sockhash_entries"] == 6
    });
    for s in streams {
        assert_eq!(echo_round_trip(s, b"bye").expect("echo"), b"bye");
    }
    wait_until(Duration::from_secs(10), || {
        h.status()["sockhash_entries"] == 0
    });
    assert!(h.counter("sockhash_remove") >= 6);
}

#[test]
fn with_sk_msg_off_the_hop_still_works_over_tcp() {
    let mut h = Harness::new("nomsg");
    let client = h.pod("client");
    let server = h.pod("server");
    h.start_agent(&["--no-msg-redirect"]);
    h.sidecar(&client);
    let echo = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
    h.enable(&client, &[]);
    let before = h.counters();
    let data = payload(1 << 20);
    let back =
        echo_round_trip(connect_from(&client, echo.addr).expect("connect"), &data).expect("echo");
    assert!(back == data);
    let after = h.counters();
    assert_eq!(after.since(&before, "connect_redirected"), 1);
    assert_eq!(after.since(&before, "msg_redirected"), 0);
    assert_eq!(after.since(&before, "sockhash_insert"), 0);
}

/// Known kernel behaviour (every kernel with sockmap, 5.10 to 6.18): a read blocked on a socket
/// in a sockmap returns EAGAIN when woken without data, e.g. by the state change that follows
/// another thread's `shutdown(SHUT_WR)` on the same socket (tcp_bpf_recvmsg waits once and does
/// not retry). What must hold is that nothing is lost: reading again yields the data and EOF.
/// Pods whose apps cannot retry use `--no-sockmap`, tested below.
#[test]
fn a_reader_woken_by_a_half_close_loses_no_data() {
    let mut h = Harness::new("halfclose");
    let client = h.pod("client");
    let server = h.pod("server");
    h.start_agent(&[]);
    h.sidecar(&client);
    let echo = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
    h.enable(&client, &[]);
    for round in 0..5 {
        let mut reader = connect_from(&client, echo.addr).expect("connect");
        reader
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut writer = reader.try_clone().expect("clone");
        let reader_tid = nix::unistd::gettid().as_raw();
        let other = std::thread::spawn(move || {
            crate::wait_blocked(reader_tid);
            writer.write_all(b"half-close")?;
            writer.shutdown(std::net::Shutdown::Write)
        });
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        let mut eagain = 0;
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && eagain < 10 => eagain += 1,
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        other.join().expect("thread").expect("write");
        assert_eq!(got, b"half-close", "round {round}");
    }
}

#[test]
fn no_sockmap_pods_keep_plain_tcp_semantics() {
    let mut h = Harness::new("nosockmap");
    let client = h.pod("client");
    let server = h.pod("server");
    h.start_agent(&[]);
    h.sidecar(&client);
    let echo = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
    h.enable(&client, &["--no-sockmap"]);
    let before = h.counters();
    let mut reader = connect_from(&client, echo.addr).expect("connect");
    reader
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut writer = reader.try_clone().expect("clone");
    let reader_tid = nix::unistd::gettid().as_raw();
    let other = std::thread::spawn(move || {
        crate::wait_blocked(reader_tid);
        writer.write_all(b"plain")?;
        writer.shutdown(std::net::Shutdown::Write)
    });
    // A blocking read_to_end, as a threaded app does it: no EAGAIN on plain TCP.
    let mut got = Vec::new();
    reader.read_to_end(&mut got).expect("read_to_end");
    other.join().expect("thread").expect("write");
    assert_eq!(got, b"plain");
    let after = h.counters();
    assert_eq!(
        after.since(&before, "connect_redirected"),
        1,
        "still intercepted"
    );
    assert_eq!(after.since(&before, "sockhash_insert"), 0);
}
