//! Restarts, upgrades and uninstall under load: two meshed pods (sidecars in both, the client's
//! outbound and the server's inbound captured) carry a bounded stream of requests — one
//! keep-alive connection and a new connection per request — while the agent is stopped,
//! killed, restarted, replaced by a build with different BPF code or of the next ABI, and
//! finally uninstalled.
//! Every request is counted; none may fail, and every connection must reach the app from its
//! sidecar (127.0.0.6).

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use interceptor_lab::lab::LabPod;
use serde_json::Value;

use crate::{EchoServer, Harness, connect_from, echo_round_trip, ip4, wait_until};

/// Upper bound of requests per load run (the loop also stops when the test says so).
const MAX_REQUESTS: u64 = 200_000;
const PASSTHROUGH: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6));

/// What the load saw.
#[derive(Default)]
struct Load {
    stop: AtomicBool,
    per_connection: AtomicU64,
    keep_alive: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Load {
    fn ok(&self) -> u64 {
        self.per_connection.load(Ordering::Relaxed) + self.keep_alive.load(Ordering::Relaxed)
    }

    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut errors = self.errors.lock().expect("lock");
        if errors.len() < 10 {
            errors.push(what);
        }
    }

    /// Waits until `n` more requests of each kind succeeded (traffic overlaps every phase).
    fn wait_progress(&self, n: u64) {
        let (pc, ka) = (
            self.per_connection.load(Ordering::Relaxed),
            self.keep_alive.load(Ordering::Relaxed),
        );
        wait_until(Duration::from_secs(60), || {
            assert_eq!(
                self.failed.load(Ordering::Relaxed),
                0,
                "failed requests: {:?}",
                self.errors.lock().expect("lock")
            );
            self.per_connection.load(Ordering::Relaxed) >= pc + n
                && self.keep_alive.load(Ordering::Relaxed) >= ka + n
        });
    }

    /// Alternates a request on the keep-alive connection and one on a new connection until
    /// stopped or `MAX_REQUESTS`.
    fn run(&self, client: &LabPod, addr: SocketAddr) {
        let mut kept = connect_from(client, addr).expect("keep-alive connect");
        let mut i = 0u64;
        while !self.stop.load(Ordering::Relaxed) && self.ok() < MAX_REQUESTS {
            i += 1;
            let body = format!("request {i}\n").into_bytes();
            match round_trip(&mut kept, &body) {
                Ok(()) => {
                    self.keep_alive.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    self.fail(format!("keep-alive request {i}: {e}"));
                    // One broken connection must not hide later failures: reconnect.
                    match connect_from(client, addr) {
                        Ok(s) => kept = s,
                        Err(e) => self.fail(format!("keep-alive reconnect: {e}")),
                    }
                }
            }
            let result = connect_from(client, addr).and_then(|s| echo_round_trip(s, &body));
            match result {
                Ok(back) if back == body => {
                    self.per_connection.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => self.fail(format!("request {i}: wrong echo")),
                Err(e) => self.fail(format!("request {i}: {e}")),
            }
        }
    }
}

/// Stops the load when dropped, so a failing assertion does not leave the scope waiting for a
/// load thread that runs on.
struct StopOnDrop<'a>(&'a Load);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::Relaxed);
    }
}

/// One request/response on a kept connection: the echo must come back whole.
fn round_trip(s: &mut TcpStream, body: &[u8]) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(body)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut back = vec![0u8; body.len()];
    let mut got = 0;
    while got < body.len() {
        if Instant::now() > deadline {
            return Err(std::io::Error::new(ErrorKind::TimedOut, "echo timed out"));
        }
        match s.read(&mut back[got..]) {
            Ok(0) => return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "closed")),
            Ok(n) => got += n,
            // A socket in a sockmap may wake without data (see `echo_round_trip`).
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => return Err(e),
        }
    }
    if back != body {
        return Err(std::io::Error::other("wrong echo"));
    }
    Ok(())
}

/// Two meshed pods with a sidecar each and an echo app in the server pod, agent running.
fn meshed(h: &mut Harness, agent_args: &[&str]) -> (LabPod, EchoServer) {
    let client = h.pod("client");
    let server = h.pod("server");
    h.start_agent(agent_args);
    h.sidecar(&client);
    h.sidecar(&server);
    let echo = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
    h.enable(&client, &[]);
    h.enable(&server, &[]);
    h.wait_inbound_ready(&server);
    (client, echo)
}

/// The load's verdict: nothing failed and the app saw every connection from its sidecar.
fn assert_clean(load: &Load, echo: &EchoServer) {
    assert_clean_besides(load, echo, 0);
}

/// As `assert_clean`, with `extra` connections the test made to the app besides the load's.
fn assert_clean_besides(load: &Load, echo: &EchoServer, extra: u64) {
    let failed = load.failed.load(Ordering::Relaxed);
    assert_eq!(
        failed,
        0,
        "failed requests: {:?}",
        load.errors.lock().expect("lock")
    );
    let seen = echo.seen();
    let per_connection = load.per_connection.load(Ordering::Relaxed);
    // The kept connection plus one per request.
    assert_eq!(seen.len() as u64, per_connection + 1 + extra);
    let direct: Vec<_> = seen.iter().filter(|s| s.peer.ip() != PASSTHROUGH).collect();
    assert!(
        direct.is_empty(),
        "{} of {} connections reached the app not from its sidecar, e.g. {:?}",
        direct.len(),
        seen.len(),
        direct.first()
    );
    eprintln!(
        "load: {} requests ({} keep-alive, {per_connection} on new connections), 0 failed, {} \
         connections all from 127.0.0.6",
        load.ok(),
        load.keep_alive.load(Ordering::Relaxed),
        seen.len()
    );
}

fn program<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["programs"]
        .as_array()
        .expect("programs")
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no program {name} in status"))
}

#[test]
fn twenty_restarts_under_load_fail_no_request() {
    // Once skipped below 5.15: in the 5.10 TCG guest's full suite one SIGTERM round's agent
    // did not exit with success. It runs everywhere again since the full 5.10 suite passed it
    // (2026-12-07); a failure here is that bug back.
    let mut h = Harness::new("restarts");
    let (client, echo) = meshed(&mut h, &["--keep-pinned"]);
    let load = Load::default();
    thread::scope(|s| {
        s.spawn(|| load.run(&client, echo.addr));
        let _stop = StopOnDrop(&load);
        load.wait_progress(5);
        for round in 0..20 {
            if round % 2 == 0 {
                // Under the full suite in the 5.10 TCG guest a stop once took longer than the
                // usual 20 s bound (the test alone passes there): a wider bound, still a bound.
                assert!(
                    h.stop_agent_within(Duration::from_secs(90)),
                    "agent exits cleanly on SIGTERM (round {round})"
                );
            } else {
                let pid = h.agent_mut().pid().expect("agent pid");
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .expect("kill -9 the agent");
                h.stop_agent();
            }
            // Without an agent the pinned datapath alone carries the traffic.
            load.wait_progress(3);
            h.start_agent(&["--keep-pinned"]);
            load.wait_progress(3);
        }
        load.stop.store(true, Ordering::Relaxed);
    });
    assert_clean(&load, &echo);
    // The same build found its own code attached: nothing swapped.
    let report = &h.status()["datapath"];
    assert_eq!(report["how"], "upgraded", "{report}");
    assert_eq!(report["replaced"], serde_json::json!([]), "{report}");
}

/// Every pod's pinned sk_lookup link under this instance's pin root.
fn pod_links(h: &Harness) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(h.pin_root.join("pods"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path().join("sk_lookup"))
                .filter(|p| p.exists())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn upgrade_under_load_swaps_the_code_then_uninstall_leaves_nothing() {
    let probe = interceptor_lab::bins::upgrade_probe().expect("the upgrade-probe agent");
    let mut h = Harness::new("upgrade");
    let (client, echo) = meshed(&mut h, &["--keep-pinned"]);
    // A third pod, deleted while no agent runs: its sk_lookup link stays pinned, detached.
    let gone = h.pod("gone");
    h.enable(&gone, &[]);
    let links_before = pod_links(&h);
    assert_eq!(links_before.len(), 3, "{links_before:?}");
    let before = h.status();
    assert_eq!(before["datapath"]["how"], "loaded");
    let old_tag = program(&before, "track_sockets")["tag"].clone();
    assert!(old_tag.is_string(), "status shows the sockops tag");
    assert_eq!(before["counters"]["upgrade_probe"], 0);

    let load = Load::default();
    thread::scope(|s| {
        s.spawn(|| load.run(&client, echo.addr));
        let _stop = StopOnDrop(&load);
        load.wait_progress(5);
        let kept_before = load.keep_alive.load(Ordering::Relaxed);
        // A rollout: the old agent stops (keeping the datapath), the new build starts.
        assert!(h.stop_agent(), "old agent exits cleanly");
        h.bin = probe.clone();
        h.start_agent(&["--keep-pinned"]);
        let after = h.status();
        // What runs first: the new sockops code is the one linked at the cgroup root.
        let sockops = program(&after, "track_sockets");
        assert_ne!(sockops["tag"], old_tag, "the new sockops is pinned");
        assert_eq!(sockops["links"], 1, "the new sockops is the one attached");
        let report = &after["datapath"];
        assert_eq!(report["how"], "upgraded", "{report}");
        let replaced: Vec<&str> = report["replaced"]
            .as_array()
            .expect("replaced")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            replaced.len() == 1 && replaced[0].starts_with("track_sockets "),
            "only sockops differs in the probe build: {replaced:?}"
        );
        assert_eq!(report["not_applied"], serde_json::json!([]));
        // New connections run the new code; the established keep-alive one still works.
        load.wait_progress(5);
        assert!(load.keep_alive.load(Ordering::Relaxed) > kept_before);
        wait_until(Duration::from_secs(20), || h.counter("upgrade_probe") > 0);
        eprintln!(
            "upgrade: {replaced:?} in {} µs",
            report["micros"].as_u64().unwrap_or_default()
        );
        load.stop.store(true, Ordering::Relaxed);
    });
    assert_clean(&load, &echo);

    let ids: Vec<u32> = h.status()["programs"]
        .as_array()
        .expect("programs")
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .map(|id| id as u32)
        .collect();
    assert_eq!(ids.len(), 10);
    let old_sockops = before["programs"]
        .as_array()
        .expect("programs")
        .iter()
        .find(|p| p["name"] == "track_sockets")
        .and_then(|p| p["id"].as_u64())
        .expect("old sockops id") as u32;
    assert!(h.stop_agent(), "agent exits cleanly");
    let out = h.cli(&["uninstall"]);
    assert!(
        out.status.success(),
        "uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!h.pin_root.exists(), "no pins left");
    // The kernel frees programs once their last link and pin are gone (deferred work).
    wait_until(Duration::from_secs(20), || {
        ids.iter()
            .chain([&old_sockops])
            .all(|&id| !interceptor::bpf::program_loaded(id))
    });
    for id in ids {
        assert_eq!(
            interceptor::bpf::links_of(id),
            0,
            "program {id} still linked"
        );
    }
}

/// Every program of the family in `status`, by name: (id, tag, links).
fn programs(status: &Value) -> Vec<(String, u32, Value, u64)> {
    status["programs"]
        .as_array()
        .expect("programs")
        .iter()
        .filter_map(|p| {
            let id = p["id"].as_u64()? as u32;
            let name = p["name"].as_str()?.to_owned();
            Some((
                name,
                id,
                p["tag"].clone(),
                p["links"].as_u64().unwrap_or_default(),
            ))
        })
        .collect()
}

/// `pod list --json`, less the pod `except`, by name.
fn pod_list(h: &Harness, except: &str) -> Vec<Value> {
    let out = h.cli(&["pod", "list", "--json"]);
    assert!(out.status.success(), "pod list: {out:?}");
    let list: Value = serde_json::from_slice(&out.stdout).expect("pod list JSON");
    let mut pods: Vec<Value> = list
        .as_array()
        .expect("pods")
        .iter()
        .filter(|p| p["name"] != except)
        .cloned()
        .collect();
    pods.sort_by_key(|p| p["name"].as_str().unwrap_or_default().to_owned());
    pods
}

fn map_capacity(status: &Value, name: &str) -> u64 {
    status["maps"]
        .as_array()
        .expect("maps")
        .iter()
        .find(|m| m["name"] == name)
        .and_then(|m| m["capacity"].as_u64())
        .unwrap_or_else(|| panic!("no map {name} in status"))
}

/// A pod whose outbound "proxy" is the test's own listener, with one app connection to `dst`
/// accepted there: (app socket, accepted socket). The accepted socket's original destination
/// lives in `TUPLE_ORIG` for as long as the connection does.
fn held_connection(h: &Harness, pod: &LabPod, dst: SocketAddr) -> (TcpStream, TcpStream) {
    let listener = pod
        .run(|| TcpListener::bind("127.0.0.1:15001"))
        .expect("netns")
        .expect("bind the pod's outbound port");
    h.enable(pod, &["--include-inbound-ports", ""]);
    let app = connect_from(pod, dst).expect("connect");
    let (accepted, _) = listener.accept().expect("accept");
    let asked = socket2::SockRef::from(&accepted)
        .original_dst()
        .expect("SO_ORIGINAL_DST");
    assert_eq!(asked.as_socket(), Some(dst));
    (app, accepted)
}

#[test]
fn abi_change_under_load_migrates_the_maps_then_uninstall_leaves_nothing() {
    let probe = interceptor_lab::bins::abi_probe().expect("the abi-probe agent");
    let mut h = Harness::new("abi");
    let (client, echo) = meshed(&mut h, &["--keep-pinned"]);
    // A third pod, deleted while no agent runs: its sk_lookup link stays pinned, detached.
    let gone = h.pod("gone");
    h.enable(&gone, &[]);
    // A connection accepted before the upgrade, asked for its destination after it.
    let early = h.pod("early");
    let (app, accepted) = held_connection(&h, &early, echo.addr);
    // A pod enabled only after the upgrade.
    let late = h.pod("late");
    let links_before = pod_links(&h);
    assert_eq!(links_before.len(), 3, "{links_before:?}");
    let before = h.status();
    assert_eq!(before["datapath"]["how"], "loaded");
    assert!(
        before["counters"].get("abi_probe").is_none(),
        "the release build has no abi_probe slot"
    );
    let old = programs(&before);
    assert_eq!(old.len(), 10, "{old:?}");
    let old_counters = map_capacity(&before, "COUNTERS");
    let pods_before = pod_list(&h, &gone.netns);

    let load = Load::default();
    let mut report = Value::Null;
    thread::scope(|s| {
        s.spawn(|| load.run(&client, echo.addr));
        let _stop = StopOnDrop(&load);
        load.wait_progress(5);
        let kept_before = load.keep_alive.load(Ordering::Relaxed);
        // A rollout to a build of the next ABI: the old agent stops (keeping the datapath),
        // the new one starts. Before migration existed it refused here (ABI mismatch).
        // The 90 s bound of the restart test: a slow (TCG) guest under load takes a while.
        assert!(
            h.stop_agent_within(Duration::from_secs(90)),
            "old agent exits cleanly"
        );
        let counted = h.counter("connect_redirected");
        interceptor_lab::lab::ip(&["netns", "del", &gone.netns]).expect("netns del");
        // The kernel detaches the link once the namespace is freed (deferred work); before,
        // the swap on it would succeed and the deleted pod would test nothing.
        wait_until(Duration::from_secs(30), || {
            links_before
                .iter()
                .any(|p| interceptor::bpf::netns_link_attached(p).is_ok_and(|attached| !attached))
        });
        h.bin = probe.clone();
        h.start_agent(&["--keep-pinned"]);
        let after = h.status();
        report = after["datapath"].clone();
        assert_eq!(report["how"], "migrated", "{report}");
        assert_eq!(report["migrated_from"], 7, "{report}");
        let maps: Vec<&str> = report["maps"]
            .as_array()
            .expect("maps")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        // The probe build declares COUNTERS, every registry map and every connection map
        // changed: the counters and the connection maps are converted (the latter only once
        // every program is swapped), the registry's rebuilt from its four pods (the deleted one included: the
        // agent's first pass collects it), ABI rewritten, the rest kept as they are.
        for line in &maps {
            let name = line.split(' ').next().unwrap_or_default();
            let expected = match name {
                "COUNTERS" => "converted",
                // Not "not carried over (...)": a failed catch-up must fail here.
                "COOKIE_ORIG" | "TUPLE_ORIG" | "DNS_ORIG"
                    if line.starts_with(&format!("{name} carried over after the swap (")) =>
                {
                    "entries the old programs wrote"
                }
                // Not copied before the swap: read through the *_PREV maps meanwhile.
                "COOKIE_ORIG" | "TUPLE_ORIG" | "DNS_ORIG" => "new (the old one is read through",
                "POD_CONFIG" | "POD_IPS" | "POD_PORTS" | "CIDR_EXCLUDE" | "CIDR_INCLUDE"
                | "POD_INFO" | "POD_LISTENER" | "POD_LISTENER6" | "LISTENERS" => {
                    "rebuilt from the pod registry (4 pods)"
                }
                "ABI" => "rebuilt",
                _ => "kept",
            };
            assert!(line.contains(expected), "{line}: {maps:?}");
        }
        // A line per pinned map, and one per connection map's catch-up.
        assert_eq!(maps.len(), 25, "{maps:?}");
        assert!(
            maps.iter()
                .any(|l| l.starts_with("TUPLE_ORIG carried over") && !l.contains("(0 entries")),
            "the held connection's entry was carried over: {maps:?}"
        );
        assert_eq!(map_capacity(&after, "COUNTERS"), old_counters + 1);
        // Every pod rebuilt into the fresh registry maps as it was: same ids, addresses,
        // settings and inbound listeners (the deleted pod aside: the first pass collects it).
        assert_eq!(pod_list(&h, &gone.netns), pods_before);
        // The old connection maps, read through their *_PREV names, are shown (emptied by the
        // catch-up of what it carried over).
        for prev in ["COOKIE_PREV", "TUPLE_PREV"] {
            assert!(map_capacity(&after, prev) > 1, "{prev} is the old map");
        }
        let human = String::from_utf8(h.cli(&["status"]).stdout).expect("utf-8");
        assert!(
            human.contains("started     migrated from ABI 7")
                && human.contains("COUNTERS converted"),
            "{human}"
        );
        // Converted: what the old programs counted is in the new map.
        assert!(h.counter("connect_redirected") >= counted);
        assert_eq!(report["not_applied"], serde_json::json!([]), "{report}");
        // Every program was swapped (they use the new COUNTERS), and the new ones are linked.
        let new = programs(&after);
        assert_eq!(new.len(), old.len());
        assert_eq!(
            report["replaced"].as_array().map(Vec::len),
            Some(old.len()),
            "{report}"
        );
        for ((name, old_id, old_tag, old_links), (new_name, new_id, new_tag, links)) in
            old.iter().zip(&new)
        {
            assert_eq!(name, new_name);
            assert_ne!(old_id, new_id, "{name} was swapped");
            // Less the deleted pod's detached sk_lookup link, whose pin went.
            let expected = if name == "steer_inbound" {
                old_links - 1
            } else {
                *old_links
            };
            assert_eq!(*links, expected, "{name} is linked where the old one was");
            if name == "track_sockets" {
                assert_ne!(
                    old_tag, new_tag,
                    "the probe's sockops code is the one pinned"
                );
            }
        }
        assert!(
            !h.pin_root.join("maps_next").exists(),
            "the staging pins took the old ones' place"
        );
        // The deleted pod's detached link did not fail the migration; its pin is dropped.
        let links_after = pod_links(&h);
        assert_eq!(links_after.len(), 2, "{links_after:?}");
        assert!(
            links_after
                .iter()
                .all(|p| interceptor::bpf::netns_link_attached(p).unwrap_or(false)),
            "{links_after:?}"
        );
        // New connections run the new code and count in the new map; the keep-alive
        // connection established before goes on (its sockets stay with the old sk_msg).
        load.wait_progress(5);
        assert!(load.keep_alive.load(Ordering::Relaxed) > kept_before);
        wait_until(Duration::from_secs(20), || h.counter("abi_probe") > 0);
        // The connection accepted before the upgrade is answered by the new getsockopt, from
        // TUPLE_ORIG as carried over after the swap.
        let asked = socket2::SockRef::from(&accepted)
            .original_dst()
            .expect("SO_ORIGINAL_DST after the migration");
        assert_eq!(asked.as_socket(), Some(echo.addr));
        // A pod enabled after the migration: its outbound to its sidecar, the server's
        // inbound to the app from the server's sidecar (checked with the load's connections).
        h.sidecar(&late);
        h.enable(&late, &[]);
        let s = connect_from(&late, echo.addr).expect("connect from the late pod");
        assert_eq!(
            s.peer_addr().expect("peer"),
            SocketAddr::from(([127, 0, 0, 1], 15001))
        );
        assert_eq!(echo_round_trip(s, b"late").expect("echo"), b"late");
        load.wait_progress(5);
        load.stop.store(true, Ordering::Relaxed);
    });
    // The late pod's connection besides the load's.
    assert_clean_besides(&load, &echo, 1);
    // Its sockets hold the old sk_msg (they joined the old sockhash), and so the old programs.
    drop((app, accepted));
    eprintln!(
        "migration from ABI 7 in {} µs (programs swapped in {} µs): {}",
        report["micros"].as_u64().unwrap_or_default(),
        report["swap_micros"].as_u64().unwrap_or_default(),
        report["maps"]
    );

    let ids: Vec<u32> = programs(&h.status()).iter().map(|p| p.1).collect();
    assert!(h.stop_agent(), "agent exits cleanly");
    let out = h.cli(&["uninstall"]);
    assert!(
        out.status.success(),
        "uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!h.pin_root.exists(), "no pins left");
    // Old and new programs (and so the old maps they held) are freed once their last link,
    // pin and socket are gone (deferred work).
    let all: Vec<u32> = ids.iter().copied().chain(old.iter().map(|p| p.1)).collect();
    wait_until(Duration::from_secs(20), || {
        all.iter().all(|&id| !interceptor::bpf::program_loaded(id))
    });
    for id in all {
        assert_eq!(
            interceptor::bpf::links_of(id),
            0,
            "program {id} still linked"
        );
    }
}

/// Runs `bin` as an agent of `h`'s instance, bounded (a wrongly started agent fails the test
/// instead of hanging it), with `env` and `args`.
fn run_agent(h: &Harness, env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    h.command_via(&["timeout", "60"], env)
        .arg("agent")
        .args(args)
        .output()
        .expect("running the agent")
}

#[test]
fn a_migration_is_refused_while_the_old_agent_runs_even_with_replace() {
    let probe = interceptor_lab::bins::abi_probe().expect("the abi-probe agent");
    let mut h = Harness::new("abibusy");
    let (client, echo) = meshed(&mut h, &["--keep-pinned"]);
    let old_pid = h.agent_mut().pid().expect("agent pid");
    let release = std::mem::replace(&mut h.bin, probe);
    // The old agent still writes the old maps: moving them under it would lose its writes,
    // and --replace would take its datapath away. Both refused, naming it.
    for args in [&["--keep-pinned"][..], &["--keep-pinned", "--replace"]] {
        let out = run_agent(&h, &[], args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(
            stderr.contains("stop the old agent first") && stderr.contains(&old_pid.to_string()),
            "{args:?}: {stderr}"
        );
    }
    assert!(!h.pin_root.join("maps_next").exists(), "nothing staged");
    h.bin = release;
    assert_eq!(h.status()["datapath"]["how"], "loaded", "untouched");
    let s = connect_from(&client, echo.addr).expect("connect");
    assert_eq!(echo_round_trip(s, b"still").expect("echo"), b"still");
    assert!(echo.seen().iter().all(|s| s.peer.ip() == PASSTHROUGH));
}

/// A rolling update with `maxSurge: 1, maxUnavailable: 0` to a release of a newer ABI: the new
/// agent starts while the old one still runs, and the old pod is stopped only once the new one
/// is ready. Without `--wait-for-old-agent` the new agent exits (the migration is refused under
/// a running agent), restarts, exits again, and the rollout never finishes. With it, the new
/// agent stands by, ready, touching nothing, and migrates once the old agent has stopped —
/// under load, with no failed request.
#[test]
fn a_surge_rollout_to_a_newer_abi_stands_by_then_migrates_without_a_failed_request() {
    let probe = interceptor_lab::bins::abi_probe().expect("the abi-probe agent");
    let mut h = Harness::new("abisurge");
    let (client, echo) = meshed(&mut h, &["--keep-pinned"]);
    let old_pid = h.agent_mut().pid().expect("agent pid");
    let load = Load::default();
    thread::scope(|s| {
        s.spawn(|| load.run(&client, echo.addr));
        let _stop = StopOnDrop(&load);
        load.wait_progress(5);
        let release = std::mem::replace(&mut h.bin, probe.clone());
        h.spawn_agent(&["--keep-pinned", "--wait-for-old-agent"])
            .wait_for_line("standing by", Duration::from_secs(60))
            .expect("the new agent stands by");
        h.bin = release;
        // Standing by touches nothing: the old datapath serves on.
        load.wait_progress(5);
        let during = h.status();
        assert_eq!(
            during["datapath"]["how"], "loaded",
            "{}",
            during["datapath"]
        );
        assert!(!h.pin_root.join("maps_next").exists(), "nothing staged");
        // The rollout stops the old pod once the new one is ready.
        assert!(h.stop_agent_at(0), "old agent {old_pid} exits cleanly");
        h.agent_mut()
            .wait_for_line("agent ready", Duration::from_secs(90))
            .expect("the new agent migrates and is ready");
        // The datapath is of the probe's ABI now: its CLI reads it from here on.
        h.bin = probe.clone();
        let after = h.status();
        assert_eq!(
            after["datapath"]["how"], "migrated",
            "{}",
            after["datapath"]
        );
        load.wait_progress(5);
        load.stop.store(true, Ordering::Relaxed);
    });
    assert_clean(&load, &echo);
    assert!(h.stop_agent(), "agent exits cleanly");
    let out = h.cli(&["uninstall"]);
    assert!(
        out.status.success(),
        "uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_migration_stopped_after_its_first_swap_is_finished_by_the_next_agent() {
    let probe = interceptor_lab::bins::abi_probe().expect("the abi-probe agent");
    let mut h = Harness::new("abihalf");
    let (client, echo) = meshed(&mut h, &["--keep-pinned"]);
    let load = Load::default();
    thread::scope(|s| {
        s.spawn(|| load.run(&client, echo.addr));
        let _stop = StopOnDrop(&load);
        load.wait_progress(5);
        assert!(
            h.stop_agent_within(Duration::from_secs(90)),
            "old agent exits cleanly"
        );
        h.bin = probe.clone();
        // The probe build's hook: the agent dies right after swapping its first program (the
        // new sk_msg on the old sockhash), with the new maps staged but never committed.
        let out = run_agent(
            &h,
            &[("INTERCEPTOR_TEST_EXIT_AFTER_FIRST_SWAP", "1")],
            &["--keep-pinned"],
        );
        assert_eq!(
            out.status.code(),
            Some(3),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(h.pin_root.join("maps_next").exists(), "left mid-migration");
        load.wait_progress(3);
        // The next start finds ABI 7 still pinned and migrates again, over what was left.
        h.start_agent(&["--keep-pinned"]);
        let report = h.status()["datapath"].clone();
        assert_eq!(report["how"], "migrated", "{report}");
        assert_eq!(report["migrated_from"], 7, "{report}");
        assert_eq!(
            report["replaced"].as_array().map(Vec::len),
            Some(10),
            "{report}"
        );
        assert!(!h.pin_root.join("maps_next").exists(), "committed");
        load.wait_progress(5);
        wait_until(Duration::from_secs(20), || h.counter("abi_probe") > 0);
        load.stop.store(true, Ordering::Relaxed);
    });
    assert_clean(&load, &echo);
}

/// A `pod` command that opened the maps, then waited for the registry lock while an upgrade
/// migrated them (the migration holds that lock from staging to commit), must not write the
/// replaced maps: no program reads them any more, so the pod it "enabled" would not be
/// intercepted. It reopens them, and refuses when their ABI is not its own.
#[test]
fn a_pod_command_that_waited_through_a_migration_does_not_write_the_old_maps() {
    use interceptor::{
        bpf::{Maps, Pins},
        registry::Registry,
    };
    let probe = interceptor_lab::bins::abi_probe().expect("the abi-probe agent");
    let mut h = Harness::new("abistale");
    let (client, echo) = meshed(&mut h, &["--keep-pinned"]);
    let pins = Pins::new(&h.pin_root);
    // Opened before the upgrade, as a command that then blocks on the lock.
    let mut waiting = Maps::open(&pins).expect("opening the ABI 7 maps");
    assert!(h.stop_agent(), "old agent exits cleanly");
    h.bin = probe;
    h.start_agent(&["--keep-pinned"]);
    assert_eq!(h.status()["datapath"]["how"], "migrated");
    // The lock is free again: the waiting command takes it.
    let err = match Registry::lock(&pins, &mut waiting) {
        Ok(_) => panic!("the registry was opened on the replaced maps"),
        Err(err) => err.to_string(),
    };
    assert!(
        err.contains("replaced") && err.contains("ABI 8"),
        "refused, saying why: {err}"
    );
    let s = connect_from(&client, echo.addr).expect("connect");
    assert_eq!(echo_round_trip(s, b"after").expect("echo"), b"after");
}

#[test]
fn a_downgrade_across_the_abi_is_refused_and_the_datapath_runs_on() {
    let probe = interceptor_lab::bins::abi_probe().expect("the abi-probe agent");
    let mut h = Harness::new("downgrade");
    let release = std::mem::replace(&mut h.bin, probe);
    let (client, echo) = meshed(&mut h, &["--keep-pinned"]);
    assert!(h.stop_agent(), "the ABI 8 agent exits cleanly");
    // An agent of the older ABI cannot read ABI 8's maps: it refuses, saying what to do (a
    // bound, so an agent that wrongly starts fails the test instead of hanging it).
    h.bin = release;
    let out = h
        .command_via(&["timeout", "30"], &[])
        .args(["agent", "--keep-pinned"])
        .output()
        .expect("running the older agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the older agent refused: {stderr}");
    assert!(
        stderr.contains("ABI 8") && stderr.contains("downgrade") && stderr.contains("uninstall"),
        "{stderr}"
    );
    // Nothing changed: the pods are still intercepted by the ABI 8 datapath.
    let s = connect_from(&client, echo.addr).expect("connect");
    assert_eq!(echo_round_trip(s, b"after").expect("echo"), b"after");
    let seen = echo.seen();
    assert!(!seen.is_empty() && seen.iter().all(|s| s.peer.ip() == PASSTHROUGH));
    let out = h.cli(&["uninstall"]);
    assert!(
        out.status.success(),
        "uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!h.pin_root.exists(), "no pins left");
}

#[test]
fn a_newer_agents_settings_are_applied_or_reported() {
    let mut h = Harness::new("settings");
    let (client, echo) = meshed(&mut h, &["--keep-pinned"]);
    let before = h.counters();
    let s = connect_from(&client, echo.addr).expect("connect");
    assert_eq!(echo_round_trip(s, b"1").expect("echo"), b"1");
    assert!(
        h.counters().since(&before, "sockhash_insert") > 0,
        "msg redirect on: the connection's sockets joined the sockhash"
    );
    assert!(h.stop_agent(), "agent exits cleanly");

    // A global setting (the CONFIG map) is applied; another cgroup cannot be, and says so.
    let cgroup = client.cgroup.clone().expect("the pod's cgroup");
    let cgroup = cgroup.to_str().expect("utf-8 path");
    h.start_agent(&["--keep-pinned", "--no-msg-redirect", "--cgroup", cgroup]);
    let report = &h.status()["datapath"];
    assert_eq!(report["how"], "upgraded", "{report}");
    let not_applied = report["not_applied"].as_array().expect("not_applied");
    assert!(
        not_applied.len() == 1
            && not_applied[0]
                .as_str()
                .is_some_and(|w| w.contains("--cgroup")),
        "{report}"
    );
    let human = String::from_utf8(h.cli(&["status"]).stdout).expect("utf-8");
    assert!(human.contains("NOT APPLIED --cgroup"), "{human}");

    let before = h.counters();
    let s = connect_from(&client, echo.addr).expect("connect");
    assert_eq!(echo_round_trip(s, b"2").expect("echo"), b"2");
    let after = h.counters();
    // Off: sockops leaves new connections out of the sockhash, so nothing is redirected.
    assert_eq!(
        after.since(&before, "sockhash_insert"),
        0,
        "--no-msg-redirect reached the datapath"
    );
    assert_eq!(after.since(&before, "msg_redirected"), 0);
}
