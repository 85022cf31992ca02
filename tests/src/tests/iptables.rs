//! iptables mode: istio-iptables' chains in the pod's namespace, on both the nft and the legacy
//! backend — applied and removed exactly, and the same interception the eBPF tests prove
//! (outbound through the sidecar, inbound from 127.0.0.6, exclusions, disable, agent stop).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::{EchoServer, Harness, LabPod, connect_from, echo_round_trip, ip4, iptables_tool};

const OUTBOUND: &str = "interceptor_proxy_connections_total{direction=\"Outbound\"}";
const INBOUND: &str = "interceptor_proxy_connections_total{direction=\"Inbound\"}";
const BACKENDS: [&str; 2] = ["nft", "legacy"];

/// `iptables-<backend>-save -t nat` (or ip6tables) inside the pod, without the comment lines
/// that carry timestamps.
fn nat_table(pod: &LabPod, backend: &str, v6: bool) -> String {
    let tool = format!(
        "{}-{backend}-save",
        if v6 { "ip6tables" } else { "iptables" }
    );
    iptables_tool(pod, &tool, &["-t", "nat"], None)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

fn rules_in(table: &str, chain_prefix: &str) -> usize {
    table
        .lines()
        .filter(|l| l.starts_with("-A ") && l.contains(chain_prefix))
        .count()
}

/// An unrelated rule an operator had in the pod before: it must survive apply and remove.
fn add_foreign_rule(pod: &LabPod, backend: &str) {
    iptables_tool(
        pod,
        &format!("iptables-{backend}"),
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-p",
            "udp",
            "--dport",
            "9",
            "-j",
            "RETURN",
        ],
        None,
    );
}

#[test]
fn apply_and_remove_are_exact_on_both_backends() {
    let mut h = Harness::new("iptexact");
    for backend in BACKENDS {
        let client = h.pod(&format!("c{backend}"));
        let server = h.pod(&format!("s{backend}"));
        add_foreign_rule(&client, backend);
        let before = (
            nat_table(&client, backend, false),
            nat_table(&client, backend, true),
        );

        let out = h.cli(&[
            "iptables",
            "apply",
            "--netns",
            &client.netns,
            "--backend",
            backend,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v4 = nat_table(&client, backend, false);
        let v6 = nat_table(&client, backend, true);
        // istio-iptables' 20 rules per family (2 jumps + 18 in the ISTIO_* chains), the
        // operator's rule untouched.
        assert_eq!(rules_in(&v4, "ISTIO_"), 20, "{backend}: {v4}");
        assert_eq!(rules_in(&v6, "ISTIO_"), 20, "{backend}: {v6}");
        assert!(v4.contains("-A POSTROUTING -p udp -m udp --dport 9 -j RETURN"));
        assert!(v4.contains("-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN"));
        assert!(v6.contains("-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN"));

        // Applying twice is refused rather than doubling the rules.
        let again = h.cli(&[
            "iptables",
            "apply",
            "--netns",
            &client.netns,
            "--backend",
            backend,
        ]);
        assert!(!again.status.success());
        assert!(String::from_utf8_lossy(&again.stderr).contains("already exist"));

        // The rules really intercept: the app's connection reaches its sidecar, which goes on
        // to the server (SO_ORIGINAL_DST answered by conntrack).
        h.sidecar(&client);
        let echo = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
        let stream = connect_from(&client, echo.addr).expect("connect");
        assert_eq!(
            stream.peer_addr().expect("peer"),
            echo.addr,
            "NAT is invisible to the app"
        );
        assert_eq!(echo_round_trip(stream, b"nat").expect("echo"), b"nat");
        assert_eq!(h.proxy_metric(&client, OUTBOUND), 1.0, "{backend}");
        assert_eq!(echo.seen()[0].peer.ip(), ip4(&client));

        let out = h.cli(&["iptables", "remove", "--netns", &client.netns, "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(
            report["backend"], backend,
            "auto finds the backend holding the chains"
        );
        assert_eq!(report["removed"], 40);
        let after = (
            nat_table(&client, backend, false),
            nat_table(&client, backend, true),
        );
        assert_eq!(after, before, "{backend}: removal is exact");
        // Removing again finds nothing and says so.
        let out = h.cli(&["iptables", "remove", "--netns", &client.netns, "--json"]);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(report["removed"], 0);
    }
}

#[test]
fn dry_run_prints_the_rules_without_a_namespace() {
    let h = Harness::new("iptdry");
    let out = h.cli(&[
        "iptables",
        "apply",
        "--dry-run",
        "--exclude-outbound-ports",
        "5432",
        "--include-inbound-ports",
        "9080",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("*nat").count(), 2, "iptables and ip6tables");
    assert!(text.contains("-A ISTIO_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN"));
    assert!(text.contains("-A ISTIO_INBOUND -p tcp -m tcp --dport 9080 -j ISTIO_IN_REDIRECT"));
    assert!(!text.contains("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT"));
}

#[test]
fn pod_to_pod_through_both_sidecars_in_iptables_mode() {
    for backend in BACKENDS {
        let mut h = Harness::new(&format!("iptpod{backend}"));
        let client = h.pod("client");
        let server = h.pod("server");
        h.start_agent(&[]);
        h.sidecar(&client);
        h.sidecar(&server);
        let echo = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
        let mode = ["--mode", "iptables", "--backend", backend];
        h.enable(&client, &mode);
        h.enable(&server, &mode);
        let pods = h.status()["pods"].clone();
        for p in pods.as_array().expect("pods") {
            assert_eq!(p["mode"], "iptables");
            assert_eq!(p["backend"], backend);
        }
        let before = h.counters();

        let stream = connect_from(&client, echo.addr).expect("connect");
        assert_eq!(echo_round_trip(stream, b"both").expect("echo"), b"both");

        assert_eq!(h.proxy_metric(&client, OUTBOUND), 1.0, "{backend}");
        assert_eq!(h.proxy_metric(&server, INBOUND), 1.0, "{backend}");
        let seen = echo.seen();
        assert_eq!(seen[0].peer.ip(), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)));
        // Netfilter did it: the eBPF datapath left these pods alone.
        let after = h.counters();
        assert_eq!(after.since(&before, "connect_redirected"), 0);
        assert_eq!(after.since(&before, "inbound_assigned"), 0);

        // Disable: rules gone, traffic direct again.
        h.disable(&client);
        h.disable(&server);
        for pod in [&client, &server] {
            assert_eq!(rules_in(&nat_table(pod, backend, false), "ISTIO_"), 0);
            assert_eq!(rules_in(&nat_table(pod, backend, true), "ISTIO_"), 0);
        }
        let stream = connect_from(&client, echo.addr).expect("connect");
        assert_eq!(echo_round_trip(stream, b"direct").expect("echo"), b"direct");
        assert_eq!(echo.seen()[1].peer.ip(), ip4(&client));
        assert_eq!(
            h.proxy_metric(&client, OUTBOUND),
            1.0,
            "no new sidecar connection"
        );
    }
}

#[test]
fn exclusions_bypass_the_sidecar_in_iptables_mode() {
    let mut h = Harness::new("iptexcl");
    let client = h.pod("client");
    let server = h.pod("server");
    h.start_agent(&[]);
    h.sidecar(&client);
    h.sidecar(&server);
    let excluded_out = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
    let excluded_in = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9002));
    let captured = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9001));
    h.enable(
        &client,
        &["--mode", "iptables", "--exclude-outbound-ports", "9000"],
    );
    h.enable(
        &server,
        &["--mode", "iptables", "--exclude-inbound-ports", "9002"],
    );
    for echo in [&excluded_out, &excluded_in, &captured] {
        let stream = connect_from(&client, echo.addr).expect("connect");
        assert_eq!(echo_round_trip(stream, b"x").expect("echo"), b"x");
    }
    // Port 9000: neither sidecar (excluded outbound at the client; 9000 inbound is captured at
    // the server, so it does reach the server's sidecar).
    assert_eq!(
        excluded_out.seen()[0].peer.ip(),
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6))
    );
    // Port 9002: the client's sidecar, then straight into the app (inbound excluded).
    assert_eq!(excluded_in.seen()[0].peer.ip(), ip4(&client));
    // Port 9001: both sidecars.
    assert_eq!(
        captured.seen()[0].peer.ip(),
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6))
    );
    assert_eq!(
        h.proxy_metric(&client, OUTBOUND),
        2.0,
        "9002 and 9001, not 9000"
    );
    assert_eq!(
        h.proxy_metric(&server, INBOUND),
        2.0,
        "9000 and 9001, not 9002"
    );
}

#[test]
fn agent_stop_removes_iptables_mode_rules() {
    let mut h = Harness::new("iptstop");
    let pod = h.pod("pod");
    h.start_agent(&[]);
    h.enable(&pod, &["--mode", "iptables", "--backend", "nft"]);
    assert_eq!(rules_in(&nat_table(&pod, "nft", false), "ISTIO_"), 20);
    assert!(h.stop_agent());
    assert_eq!(rules_in(&nat_table(&pod, "nft", false), "ISTIO_"), 0);
    assert_eq!(rules_in(&nat_table(&pod, "nft", true), "ISTIO_"), 0);
    assert!(!h.pin_root.exists());
}

#[test]
fn switching_a_pod_between_modes_leaves_no_trace_of_the_old_one() {
    let mut h = Harness::new("iptswitch");
    let client = h.pod("client");
    let server = h.pod("server");
    h.start_agent(&[]);
    h.sidecar(&client);
    let echo = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
    h.enable(&client, &["--mode", "iptables"]);
    h.enable(&client, &["--mode", "ebpf"]);
    assert_eq!(rules_in(&nat_table(&client, "nft", false), "ISTIO_"), 0);
    let before = h.counters();
    let stream = connect_from(&client, echo.addr).expect("connect");
    assert_eq!(echo_round_trip(stream, b"e").expect("echo"), b"e");
    assert_eq!(h.counters().since(&before, "connect_redirected"), 1);

    h.enable(&client, &["--mode", "iptables"]);
    let pods = h.status()["pods"].clone();
    assert_eq!(pods[0]["mode"], "iptables");
    let before = h.counters();
    let stream = connect_from(&client, echo.addr).expect("connect");
    assert_eq!(echo_round_trip(stream, b"i").expect("echo"), b"i");
    assert_eq!(
        h.counters().since(&before, "connect_redirected"),
        0,
        "not eBPF any more"
    );
    assert_eq!(
        h.proxy_metric(&client, OUTBOUND),
        2.0,
        "one per mode, both via the sidecar"
    );
}
