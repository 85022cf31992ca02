//! The datapath's life: pod disable, agent stop, a second agent, --keep-pinned, proxies that
//! predate the agent, and pods whose namespace goes away.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use crate::{EchoServer, Harness, connect_from, echo_round_trip, ip4, wait_until};

fn program_ids(h: &Harness) -> Vec<u64> {
    h.status()["programs"]
        .as_array()
        .expect("programs")
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

fn loaded(id: u64) -> bool {
    std::process::Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn pod_disable_restores_direct_traffic_and_removes_its_state() {
    let mut h = Harness::new("disable");
    let client = h.pod("client");
    let server = h.pod("server");
    h.start_agent(&[]);
    h.sidecar(&client);
    h.sidecar(&server);
    let echo = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
    h.enable(&client, &[]);
    h.enable(&server, &[]);
    h.wait_inbound_ready(&server);
    let s = connect_from(&client, echo.addr).expect("connect");
    assert_eq!(echo_round_trip(s, b"1").expect("echo"), b"1");
    assert_eq!(
        echo.seen()[0].peer.ip(),
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6))
    );

    h.disable(&client);
    h.disable(&server);
    let before = h.counters();
    let s = connect_from(&client, echo.addr).expect("connect");
    assert_eq!(s.peer_addr().expect("peer"), echo.addr);
    assert_eq!(echo_round_trip(s, b"2").expect("echo"), b"2");
    assert_eq!(echo.seen()[1].peer.ip(), ip4(&client));
    let after = h.counters();
    assert_eq!(after.since(&before, "connect_redirected"), 0);
    assert_eq!(after.since(&before, "inbound_assigned"), 0);
    assert_eq!(h.status()["pods"].as_array().expect("pods").len(), 0);
    let pods_dir = h.pin_root.join("pods");
    assert_eq!(std::fs::read_dir(&pods_dir).expect("pods dir").count(), 0);

    // Enabled again with the same sidecars still running: inbound goes through the server's
    // sidecar again (its listener stayed in LISTENERS; sockops adds one only at listen()).
    h.enable(&client, &[]);
    h.enable(&server, &[]);
    h.wait_inbound_ready(&server);
    let s = connect_from(&client, echo.addr).expect("connect");
    assert_eq!(echo_round_trip(s, b"3").expect("echo"), b"3");
    assert_eq!(
        echo.seen()[2].peer.ip(),
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)),
        "re-enabled inbound through the sidecar"
    );
}

#[test]
fn agent_stop_detaches_and_unpins_everything() {
    let mut h = Harness::new("stop");
    let client = h.pod("client");
    let server = h.pod("server");
    h.start_agent(&[]);
    h.sidecar(&client);
    let echo = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
    h.enable(&client, &[]);
    h.enable(&server, &["--include-inbound-ports", "9999"]);
    let ids = program_ids(&h);
    assert_eq!(
        ids.len(),
        10,
        "all ten programs loaded (DNS capture's four sendmsg/recvmsg included)"
    );
    assert!(ids.iter().all(|id| loaded(*id)));
    assert!(h.stop_agent(), "agent exits cleanly on SIGTERM");

    assert!(
        !h.pin_root.exists(),
        "{} still pinned",
        h.pin_root.display()
    );
    wait_until(Duration::from_secs(30), || {
        ids.iter().all(|id| !loaded(*id))
    });
    // Unloaded means detached everywhere: a cgroup or netns attachment holds its program.
    // Traffic is direct again.
    let s = connect_from(&client, echo.addr).expect("connect");
    assert_eq!(s.peer_addr().expect("peer"), echo.addr);
    assert_eq!(echo_round_trip(s, b"direct").expect("echo"), b"direct");
}

#[test]
fn a_second_agent_adopts_the_pinned_datapath() {
    let mut h = Harness::new("adopt");
    let client = h.pod("client");
    let server = h.pod("server");
    h.start_agent(&[]);
    h.sidecar(&client);
    let echo = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
    h.enable(&client, &[]);
    let ids = program_ids(&h);
    // A second agent on the same node: it reuses what is pinned instead of attaching again.
    h.start_agent(&[]);
    assert_eq!(program_ids(&h), ids);
    assert_eq!(h.status()["agents"].as_array().expect("agents").len(), 2);
    // Still one attachment of each cgroup program (DNS capture's four included), not two.
    let status = h.status();
    let linked: Vec<_> = status["programs"]
        .as_array()
        .expect("programs")
        .iter()
        .filter(|p| p["linked"] == true)
        .collect();
    assert_eq!(linked.len(), 8, "{linked:?}");
    for p in linked {
        assert_eq!(p["links"], 1, "{} attached once: {p}", p["name"]);
    }
    // The first agent goes (as in a rolling update): interception carries on.
    let first = h.stop_agent_at(0);
    assert!(first);
    assert!(h.pin_root.exists());
    let before = h.counters();
    let s = connect_from(&client, echo.addr).expect("connect");
    assert_eq!(echo_round_trip(s, b"still").expect("echo"), b"still");
    assert_eq!(h.counters().since(&before, "connect_redirected"), 1);
    // The last one out cleans up.
    assert!(h.stop_agent());
    assert!(!h.pin_root.exists());
}

/// `interceptor uninstall`: what a DaemonSet's deletion does, by hand on a node. It refuses
/// while an agent runs (that agent would re-attach), then removes programs, links, pins and the
/// chains of iptables-mode pods; afterwards nothing is intercepted.
#[test]
fn uninstall_removes_everything_and_refuses_while_an_agent_runs() {
    let mut h = Harness::new("uninst");
    let ebpf_pod = h.pod("ebpfpod");
    let ipt_pod = h.pod("iptpod");
    let server = h.pod("server");
    h.start_agent(&["--keep-pinned"]);
    h.sidecar(&ebpf_pod);
    h.sidecar(&ipt_pod);
    let echo = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
    h.enable(&ebpf_pod, &[]);
    h.enable(&ipt_pod, &["--mode", "iptables"]);
    assert!(
        crate::iptables_tool(&ipt_pod, "iptables-save", &["-t", "nat"], None).contains("ISTIO_")
    );

    let refused = h.cli(&["uninstall"]);
    assert!(
        !refused.status.success(),
        "uninstall ran beside a live agent"
    );
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("stop them first"), "{err}");
    assert!(h.pin_root.exists());

    assert!(h.stop_agent());
    assert!(h.pin_root.exists(), "--keep-pinned kept the datapath");
    let out = h.cli(&["uninstall", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["removed"], true);
    assert_eq!(report["iptables_pods"], 1);
    assert!(!h.pin_root.exists(), "pins removed");
    assert!(
        !crate::iptables_tool(&ipt_pod, "iptables-save", &["-t", "nat"], None).contains("ISTIO_"),
        "the iptables-mode pod's chains are gone"
    );
    for pod in [&ebpf_pod, &ipt_pod] {
        let s = connect_from(pod, echo.addr).expect("connect");
        assert_eq!(
            s.peer_addr().expect("peer"),
            echo.addr,
            "{} goes direct",
            pod.name
        );
        assert_eq!(echo_round_trip(s, b"bye").expect("echo"), b"bye");
    }
    // Idempotent: a second run finds nothing and says so.
    let again = h.cli(&["uninstall"]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to remove"));
}

#[test]
fn keep_pinned_leaves_interception_running_without_an_agent() {
    let mut h = Harness::new("keep");
    let client = h.pod("client");
    let server = h.pod("server");
    h.start_agent(&["--keep-pinned"]);
    h.sidecar(&client);
    let echo = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
    h.enable(&client, &[]);
    assert!(h.stop_agent());
    assert!(h.pin_root.join("links").exists());
    // No agent runs, the pod is still intercepted (its state was pinned).
    let before = h.counters();
    let s = connect_from(&client, echo.addr).expect("connect");
    assert_eq!(
        s.peer_addr().expect("peer"),
        SocketAddr::from(([127, 0, 0, 1], 15001))
    );
    assert_eq!(echo_round_trip(s, b"kept").expect("echo"), b"kept");
    assert_eq!(h.counters().since(&before, "connect_redirected"), 1);
    // A new agent adopts it; stopping that one normally removes everything.
    h.start_agent(&[]);
    assert_eq!(h.status()["pods"].as_array().expect("pods").len(), 1);
    assert!(h.stop_agent());
    assert!(!h.pin_root.exists());
}

#[test]
fn a_sidecar_started_before_the_agent_gets_its_inbound_traffic() {
    let mut h = Harness::new("early");
    let client = h.pod("client");
    let server = h.pod("server");
    // The proxy listens before any program is attached: sockops never saw its listen().
    h.sidecar(&server);
    h.start_agent(&[]);
    let echo = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
    h.enable(&server, &[]);
    h.wait_inbound_ready(&server);
    let s = connect_from(&client, echo.addr).expect("connect");
    assert_eq!(echo_round_trip(s, b"early").expect("echo"), b"early");
    assert_eq!(
        echo.seen()[0].peer.ip(),
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6))
    );
}

#[test]
fn a_pod_whose_namespace_is_gone_is_removed() {
    let mut h = Harness::new("gone");
    let pod = h.pod("ephemeral");
    let keep = h.pod("keep");
    h.start_agent(&[]);
    h.enable(&pod, &["--include-inbound-ports", ""]);
    h.enable(&keep, &["--include-inbound-ports", ""]);
    assert_eq!(h.status()["pods"].as_array().expect("pods").len(), 2);
    interceptor_lab::lab::ip(&["netns", "del", &pod.netns]).expect("netns del");
    wait_until(Duration::from_secs(30), || {
        h.status()["pods"].as_array().is_some_and(|p| p.len() == 1)
    });
    assert_eq!(h.status()["pods"][0]["name"], keep.netns.as_str());
    assert!(!Path::new(&format!("/run/netns/{}", pod.netns)).exists());
}

/// nsfs hands a dead namespace's inode number to the next namespace created (the lowest free
/// number), so a pod recorded by (device, inode) alone is "found" again in a newcomer: it is
/// never collected, and the newcomer would be treated as its update. The netns cookie (never
/// reused) tells them apart. A running agent holds its pods' namespaces open
/// (`discovery/held.rs`), so the number cannot come free under it: the pod dies while no agent
/// runs (a restart), and the next agent's first look must not take the newcomer for it.
#[test]
fn a_new_namespace_with_a_dead_pods_inode_number_is_not_that_pod() {
    use std::os::unix::fs::MetadataExt as _;
    let _churn = crate::namespace_churn();
    let mut h = Harness::new("inoreuse");
    let pod = h.pod("dead");
    h.start_agent(&["--keep-pinned"]);
    h.enable(&pod, &["--include-inbound-ports", ""]);
    let cookie_known = h.status()["features"]["in_use"]
        .as_array()
        .is_some_and(|f| {
            f.iter()
                .any(|s| s.as_str().is_some_and(|s| s.contains("SO_NETNS_COOKIE")))
        });
    let ino = |name: &str| {
        std::fs::metadata(format!("/run/netns/{name}"))
            .map(|m| m.ino())
            .ok()
    };
    let old = ino(&pod.netns).expect("pod netns");
    assert!(h.stop_agent(), "the agent stops");
    interceptor_lab::lab::ip(&["netns", "del", &pod.netns]).expect("netns del");
    // The number comes free once the kernel's deferred namespace cleanup has run. Parallel
    // tests create namespaces too and may take it first: bounded tries, each failed
    // candidate given back.
    let mut made = Vec::new();
    let mut reused = None;
    for i in 0..30 {
        std::thread::sleep(Duration::from_millis(100));
        let name = format!("{}-n{i}", pod.netns);
        interceptor_lab::lab::ip(&["netns", "add", &name]).expect("netns add");
        if ino(&name) == Some(old) {
            made.push(name.clone());
            reused = Some(name);
            break;
        }
        let _ = interceptor_lab::lab::ip(&["netns", "del", &name]);
    }
    let cleanup = |made: &[String]| {
        for name in made {
            let _ = interceptor_lab::lab::ip(&["netns", "del", name]);
        }
    };
    let Some(newcomer) = reused else {
        cleanup(&made);
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "interceptor-e2e: skipped a_new_namespace_with_a_dead_pods_inode_number_is_not_that_pod: \
             no namespace got the freed inode number (parallel tests took it)"
        );
        return;
    };
    if !cookie_known {
        cleanup(&made);
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "interceptor-e2e: skipped a_new_namespace_with_a_dead_pods_inode_number_is_not_that_pod: \
             SO_NETNS_COOKIE (Linux >= 5.14)"
        );
        return;
    }
    // A process in the newcomer: what a /proc scan for the dead pod's (dev, inode) finds.
    let mut sleeper = std::process::Command::new("ip")
        .args(["netns", "exec", &newcomer, "sleep", "30"])
        .spawn()
        .expect("sleep in the new namespace");
    wait_until(Duration::from_secs(30), || {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                std::fs::metadata(e.path().join("ns/net")).is_ok_and(|m| m.ino() == old)
                    && std::fs::read_to_string(e.path().join("comm"))
                        .is_ok_and(|c| c.trim() == "sleep")
            })
    });
    // The next agent's pass collects the dead pod instead of finding it in the newcomer.
    h.start_agent(&["--keep-pinned"]);
    let collected = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        h.status()["pods"].as_array().is_some_and(|p| p.is_empty())
    });
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    cleanup(&made);
    assert!(
        collected,
        "the dead pod is still listed: {}",
        h.status()["pods"]
    );
}

/// An update that cannot be applied whole (here POD_PORTS overflows) leaves the running pod as
/// it was, still intercepted with its previous settings, and says why.
#[test]
fn a_failed_update_keeps_the_pod_as_it_was() {
    let mut h = Harness::new("update");
    let client = h.pod("client");
    let server = h.pod("server");
    h.start_agent(&[]);
    h.sidecar(&client);
    let echo = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
    h.enable(&client, &["--exclude-outbound-ports", "5432"]);
    let spec_before = h.status()["pods"][0]["spec"].clone();

    // 66000 port entries, more than a pod may hold in POD_PORTS (`size::PER_POD_PORTS`), in
    // arguments below the kernel's 128 KiB per-argument limit.
    let list = |ports: std::ops::RangeInclusive<u32>| {
        ports.map(|p| p.to_string()).collect::<Vec<_>>().join(",")
    };
    let (low, high) = (list(1..=22500), list(22501..=43500));
    let out = h.cli(&[
        "pod",
        "enable",
        "--netns",
        &client.netns,
        "--exclude-inbound-ports",
        &low,
        "--exclude-outbound-ports",
        &low,
        "--include-outbound-ports",
        &high,
    ]);
    assert!(
        !out.status.success(),
        "an update past the map's size was accepted"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("POD_PORTS"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let pods = h.status()["pods"].clone();
    assert_eq!(pods.as_array().expect("pods").len(), 1, "still enabled");
    assert_eq!(pods[0]["spec"], spec_before, "previous settings restored");
    let before = h.counters();
    let stream = connect_from(&client, echo.addr).expect("connect");
    assert_eq!(echo_round_trip(stream, b"kept").expect("echo"), b"kept");
    assert_eq!(h.counters().since(&before, "connect_redirected"), 1);
}

/// A run that crashed (its agent killed, its process gone) leaves pins behind that keep
/// programs attached to the cgroup root; the next run's sweep removes them.
#[test]
fn a_crashed_runs_datapath_is_swept() {
    // The instance is named after an owner process we end when the "crash" is complete, so
    // no other test's sweep can take it early.
    let mut owner = std::process::Command::new("sleep")
        .arg("120")
        .spawn()
        .expect("spawn");
    let root = std::path::PathBuf::from(format!("/sys/fs/bpf/icpt-test-crash-{}-0", owner.id()));
    let mut agent = std::process::Command::new(crate::binary())
        .arg("--pin-root")
        .arg(&root)
        .args(["agent", "--reconcile-seconds", "0.2"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("agent");
    {
        use std::io::BufRead as _;
        let mut lines = std::io::BufReader::new(agent.stdout.take().expect("stdout")).lines();
        assert!(lines.any(|l| l.is_ok_and(|l| l.contains("agent ready"))));
    }
    let status = std::process::Command::new(crate::binary())
        .arg("--pin-root")
        .arg(&root)
        .args(["status", "--json"])
        .output()
        .expect("status");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
    let id = status["programs"][0]["id"]
        .as_u64()
        .expect("connect4 loaded") as u32;
    agent.kill().expect("SIGKILL");
    agent.wait().expect("wait");
    assert!(root.exists(), "a killed agent cannot unpin");
    assert!(interceptor::bpf::links_of(id) > 0, "still attached");

    owner.kill().expect("kill");
    owner.wait().expect("wait");
    interceptor_lab::lab::sweep_stale();
    assert!(!root.exists(), "{} not swept", root.display());
    wait_until(Duration::from_secs(30), || {
        interceptor::bpf::links_of(id) == 0
    });
}
