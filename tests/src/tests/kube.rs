//! `interceptor agent --kube` against the in-process fake API server (real list/watch wire
//! protocol): pods whose UIDs map to real network namespaces and cgroups made here, Istio's
//! annotations, bad values, re-lists, API and agent restarts, pod sandbox restarts, IP reuse —
//! each checked with real traffic through the interception.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use interceptor::kube::annotations::{
    EXCLUDE_INBOUND_PORTS, EXCLUDE_OUTBOUND_IP_RANGES, EXCLUDE_OUTBOUND_PORTS,
    INCLUDE_INBOUND_PORTS, INCLUDE_OUTBOUND_IP_RANGES, INCLUDE_OUTBOUND_PORTS, INJECT,
    INTERCEPTION_MODE, MODE, NAMESPACE_INJECTION, STATUS,
};
use interceptor_lab::lab::LabPod;
use serde_json::Value;

use crate::{
    EchoServer, Harness, connect_from, echo_round_trip,
    fake_api::{self, FakeApi, Kind},
    ip4,
    kube::{
        Driver, KubeEnv, kubelet_cgroup, namespace_object, new_uid, pod_object, set_annotations,
    },
    wait_until,
};

pub(super) const NS: &str = "shop";
const WAIT: Duration = Duration::from_secs(30);
pub(super) const PROXY: &[&str] = &["app", "istio-proxy"];
/// The DaemonSet the agents of these tests say they run in (`--daemonset`).
pub(super) const DS_NS: &str = "interceptor-system";
pub(super) const DS_NAME: &str = "interceptor";
pub(super) const DAEMONSET: &[&str] = &["--daemonset", "interceptor-system/interceptor"];

pub(super) fn entry(h: &Harness, name: &str) -> Option<Value> {
    h.status()["pods"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == format!("{NS}/{name}").as_str())
        .cloned()
}

fn kube_entries(h: &Harness) -> Vec<String> {
    h.status()["pods"]
        .as_array()
        .map(|pods| {
            pods.iter()
                .filter(|p| p["source"] == "kubernetes")
                .filter_map(|p| p["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

pub(super) fn wait_entry(h: &Harness, name: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let mut found = None;
    wait_until(WAIT, || {
        found = entry(h, name).filter(|e| ok(e));
        found.is_some()
    });
    found.expect("entry")
}

fn wait_gone(h: &Harness, name: &str) {
    wait_until(WAIT, || entry(h, name).is_none());
}

/// Connects from `from` and asserts the connection went to the sidecar's 15001.
pub(super) fn through_sidecar(from: &LabPod, echo: &EchoServer) {
    let s = connect_from(from, echo.addr).expect("connect");
    assert_eq!(
        s.peer_addr().expect("peer"),
        SocketAddr::from(([127, 0, 0, 1], 15001)),
        "should go through the sidecar"
    );
    assert_eq!(echo_round_trip(s, b"via").expect("echo"), b"via");
}

/// Connects from `from` and asserts the connection went straight to the server.
fn direct(from: &LabPod, echo: &EchoServer) {
    let s = connect_from(from, echo.addr).expect("connect");
    assert_eq!(s.peer_addr().expect("peer"), echo.addr, "should go direct");
    assert_eq!(echo_round_trip(s, b"direct").expect("echo"), b"direct");
}

/// A lab pod registered in the fake API under a fresh UID, with a process in its kubelet-style
/// cgroup and (when `sidecar`) the proxy running in it.
pub(super) fn meshed_pod(
    h: &mut Harness,
    env: &KubeEnv,
    name: &str,
    annotations: &[(&str, &str)],
    containers: &[&str],
    sidecar: bool,
) -> (LabPod, String) {
    let lab_pod = h.pod(name);
    let uid = new_uid();
    let pod = kubelet_cgroup(&lab_pod, &uid, Driver::Systemd);
    h.keep_running(&pod);
    if sidecar {
        h.sidecar(&pod);
    }
    env.api.apply(
        Kind::Pod,
        pod_object(NS, name, &uid, &env.node, pod.ip, annotations, containers),
    );
    (pod, uid)
}

/// How most of these tests start: a harness, the fake API server with the default namespace,
/// and a server pod with an echo server on its address, port 9000.
pub(super) struct World {
    pub(super) h: Harness,
    pub(super) env: KubeEnv,
    pub(super) server: LabPod,
    pub(super) echo: EchoServer,
}

impl World {
    pub(super) fn new(tag: &str) -> Self {
        let mut h = Harness::new(tag);
        let env = KubeEnv::new(&h);
        env.api.apply(Kind::Namespace, namespace_object(NS, &[]));
        let server = h.pod("server");
        let echo = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
        Self {
            h,
            env,
            server,
            echo,
        }
    }
}

fn warnings(env: &KubeEnv, pod: &str, reason: &str) -> Vec<Value> {
    env.api
        .events()
        .into_iter()
        .filter(|e| e["regarding"]["name"] == pod && e["reason"] == reason)
        .collect()
}

#[test]
fn api_pods_are_intercepted_before_and_after_agent_start_and_released_on_delete() {
    let World {
        mut h,
        env,
        server: _server,
        echo,
    } = World::new("kpods");
    // Meshed before the agent starts.
    let (client, _) = meshed_pod(&mut h, &env, "client", &[(STATUS, "{}")], PROXY, true);
    // Not meshed: never touched.
    let (bystander, _) = meshed_pod(&mut h, &env, "bystander", &[], &["app"], false);
    // Meshed, with a process on this machine, but the API puts it on another node.
    let other = h.pod("other");
    let other_uid = new_uid();
    let other_pod = kubelet_cgroup(&other, &other_uid, Driver::Systemd);
    h.keep_running(&other_pod);
    h.sidecar(&other_pod);
    env.api.apply(
        Kind::Pod,
        pod_object(
            NS,
            "other",
            &other_uid,
            "another-node",
            other.ip,
            &[(STATUS, "{}")],
            PROXY,
        ),
    );

    env.api.apply(
        Kind::DaemonSet,
        serde_json::json!({"metadata": {"namespace": DS_NS, "name": DS_NAME}}),
    );
    h.start_kube_agent(&env.kubeconfig, &env.node, DAEMONSET);
    // Ready means listed and applied: the pod is there without waiting.
    let e = entry(&h, "client").expect("intercepted at ready");
    assert_eq!(e["source"], "kubernetes");
    assert_eq!(e["addresses"][0], client.ip.to_string());
    assert_eq!(kube_entries(&h), vec![format!("{NS}/client")]);
    let node_selector = format!("fieldSelector=spec.nodeName%3D{}", env.node);
    assert!(
        env.api
            .requests()
            .iter()
            .any(|r| r.starts_with("GET /api/v1/pods?") && r.contains(&node_selector)),
        "the agent lists only its node's pods: {:?}",
        env.api.requests()
    );

    let before = h.counters();
    through_sidecar(&client, &echo);
    direct(&bystander, &echo);
    direct(&other_pod, &echo);
    assert_eq!(h.counters().since(&before, "connect_redirected"), 1);

    // A pod that asks for a sidecar, created while the agent runs.
    let (late, _) = meshed_pod(&mut h, &env, "late", &[(INJECT, "true")], &["app"], true);
    wait_entry(&h, "late", |_| true);
    through_sidecar(&late, &echo);

    // Deleted: its interception goes, the rest stays.
    env.api.delete(Kind::Pod, NS, "client");
    wait_gone(&h, "client");
    direct(&client, &echo);
    through_sidecar(&late, &echo);
    assert_eq!(kube_entries(&h), vec![format!("{NS}/late")]);

    // A stop that is not an uninstall (a rollout, `kubectl delete pod`, an OOM kill): the
    // DaemonSet still exists, so the datapath stays and the pods stay intercepted.
    assert!(h.stop_agent(), "agent exits cleanly");
    assert!(h.pin_root.exists(), "a restart keeps the datapath");
    through_sidecar(&late, &echo);
    // The next agent adopts it and carries on.
    h.start_kube_agent(&env.kubeconfig, &env.node, DAEMONSET);
    through_sidecar(&late, &echo);
    assert_eq!(kube_entries(&h), vec![format!("{NS}/late")]);

    // Uninstall (`kubectl delete daemonset` with foreground cascade: the DaemonSet is marked
    // for deletion while its pods get SIGTERM): nothing stays on the node.
    env.api.update(Kind::DaemonSet, DS_NS, DS_NAME, |ds| {
        ds["metadata"]["deletionTimestamp"] = serde_json::json!("2024-01-02T00:00:00Z");
    });
    assert!(h.stop_agent(), "agent exits cleanly");
    assert!(!h.pin_root.exists(), "pins removed");
    direct(&late, &echo);
}

/// `helm uninstall` / `kubectl delete daemonset` in background cascade: the DaemonSet is gone
/// when its pods get SIGTERM, and the agent removes everything. Without --daemonset, a stop in
/// Kubernetes mode never uninstalls.
#[test]
fn a_deleted_daemonset_uninstalls_and_a_stop_without_one_keeps_the_datapath() {
    let World {
        mut h,
        env,
        server: _server,
        echo,
    } = World::new("kuninst");
    let (pod, _) = meshed_pod(&mut h, &env, "app", &[(STATUS, "{}")], PROXY, true);
    h.start_kube_agent(&env.kubeconfig, &env.node, &[]);
    wait_entry(&h, "app", |_| true);
    through_sidecar(&pod, &echo);
    assert!(h.stop_agent(), "agent exits cleanly");
    assert!(
        h.pin_root.exists(),
        "no --daemonset: a stop keeps the datapath"
    );
    through_sidecar(&pod, &echo);

    // The DaemonSet was never there (deleted before its pod stopped): uninstall.
    h.start_kube_agent(&env.kubeconfig, &env.node, DAEMONSET);
    wait_entry(&h, "app", |_| true);
    assert!(h.stop_agent(), "agent exits cleanly");
    assert!(!h.pin_root.exists(), "pins removed");
    direct(&pod, &echo);
    assert!(
        env.api
            .requests()
            .iter()
            .any(|r| r == &format!("GET /apis/apps/v1/namespaces/{DS_NS}/daemonsets/{DS_NAME}")),
        "the stopping agent asked for its DaemonSet: {:?}",
        env.api.requests()
    );
}

/// `helm uninstall` and `kubectl delete -f` delete the agent's Role, RoleBinding and
/// ServiceAccount right after its DaemonSet, before the garbage collector stops its pods: by
/// SIGTERM the agent's GET of its DaemonSet is refused. The agent's watch saw the deletion
/// while it was still allowed to, so the stop still removes everything. A refusal alone (RBAC
/// broken while the DaemonSet exists) keeps the datapath: it never takes pods out of the mesh.
#[test]
fn an_uninstall_that_deleted_the_agents_rbac_first_still_removes_everything() {
    let World {
        mut h,
        env,
        server: _server,
        echo,
    } = World::new("krbac");
    let (pod, _) = meshed_pod(&mut h, &env, "app", &[(STATUS, "{}")], PROXY, true);
    env.api.apply(
        Kind::DaemonSet,
        serde_json::json!({"metadata": {"namespace": DS_NS, "name": DS_NAME}}),
    );
    // Watches of the DaemonSet the agents opened.
    let daemonset_watches = || {
        env.api
            .requests()
            .iter()
            .filter(|r| {
                r.starts_with(&format!("GET /apis/apps/v1/namespaces/{DS_NS}/daemonsets?"))
                    && r.contains(&format!("fieldSelector=metadata.name%3D{DS_NAME}"))
                    && r.contains("watch=true")
            })
            .count()
    };
    h.start_kube_agent(&env.kubeconfig, &env.node, DAEMONSET);
    wait_entry(&h, "app", |_| true);
    through_sidecar(&pod, &echo);
    wait_until(WAIT, || daemonset_watches() > 0);

    // RBAC broken while the DaemonSet exists: a stop is a restart.
    env.api.refuse_requests(true);
    assert!(h.stop_agent(), "agent exits cleanly");
    assert!(
        h.pin_root.exists(),
        "a refused answer alone keeps the datapath"
    );
    through_sidecar(&pod, &echo);

    // RBAC back, a new agent; then the uninstall: the DaemonSet deleted, at once every request
    // refused, then SIGTERM.
    env.api.refuse_requests(false);
    let watched_before = daemonset_watches();
    h.start_kube_agent(&env.kubeconfig, &env.node, DAEMONSET);
    wait_entry(&h, "app", |_| true);
    through_sidecar(&pod, &echo);
    wait_until(WAIT, || daemonset_watches() > watched_before);
    let deleted_before = env.api.delivered("DaemonSet", "DELETED");
    env.api.delete(Kind::DaemonSet, DS_NS, DS_NAME);
    env.api.refuse_requests(true);
    // The deletion reaches the agent's open watch.
    wait_until(WAIT, || {
        env.api.delivered("DaemonSet", "DELETED") > deleted_before
    });
    h.agent_mut()
        .wait_for_line("the next stop uninstalls", WAIT)
        .expect("the agent saw the deletion");
    let refused_before = env.api.requests().len();
    assert!(h.stop_agent(), "agent exits cleanly");
    assert!(
        !h.pin_root.exists(),
        "the uninstall removed the datapath although the API refused the stopping agent"
    );
    direct(&pod, &echo);
    assert!(
        env.api.requests()[refused_before..]
            .iter()
            .any(|r| r == &format!("GET /apis/apps/v1/namespaces/{DS_NS}/daemonsets/{DS_NAME}")),
        "the stopping agent asked (and was refused): {:?}",
        env.api.requests()
    );
}

#[test]
fn not_ready_until_the_first_list_then_ready() {
    let mut h = Harness::new("kready");
    let api_addr = fake_api::free_loopback_addr();
    let health = fake_api::free_loopback_addr();
    let kubeconfig = std::env::temp_dir().join(format!("{}-kubeconfig", h.lab.name));
    fake_api::write_kubeconfig(&kubeconfig, api_addr);
    let node = format!("node-{}", h.lab.name);
    let lab_pod = h.pod("app");
    let uid = new_uid();
    let pod = kubelet_cgroup(&lab_pod, &uid, Driver::Systemd);
    h.keep_running(&pod);
    h.sidecar(&pod);
    let ready = || {
        interceptor_lab::testapp::http_get(health, "/healthz/ready", Duration::from_secs(2))
            .map(|r| r.status)
            .ok()
    };
    // The API server is not up: the agent runs, keeps retrying, and says it is not ready.
    h.spawn_agent(&[
        "--kube",
        "--kubeconfig",
        kubeconfig.to_str().expect("path"),
        "--node-name",
        &node,
        "--health-addr",
        &health.to_string(),
    ]);
    let pod_watch_errors = || {
        let metrics =
            interceptor_lab::testapp::http_get(health, "/metrics", Duration::from_secs(2)).ok()?;
        String::from_utf8_lossy(&metrics.body)
            .lines()
            .find_map(|l| {
                l.strip_prefix("interceptor_agent_kube_watch_errors_total{resource=\"Pods\"} ")?
                    .parse::<u64>()
                    .ok()
            })
    };
    // Until it has tried the API and failed, this would test nothing.
    wait_until(WAIT, || pod_watch_errors().is_some_and(|n| n >= 1));
    assert_eq!(ready(), Some(503));
    assert!(h.status()["pods"].as_array().expect("pods").is_empty());

    let api = FakeApi::start_on(api_addr);
    api.apply(Kind::Namespace, namespace_object(NS, &[]));
    api.apply(
        Kind::Pod,
        pod_object(NS, "app", &uid, &node, pod.ip, &[(STATUS, "{}")], PROXY),
    );
    h.agent_mut()
        .wait_for_line("agent ready", Duration::from_secs(60))
        .expect("ready once the API answers");
    assert_eq!(ready(), Some(200));
    // Ready means the first list is applied: the pod is intercepted already.
    assert!(entry(&h, "app").is_some());
    let metrics = interceptor_lab::testapp::http_get(health, "/metrics", Duration::from_secs(2))
        .expect("metrics");
    let text = String::from_utf8_lossy(&metrics.body);
    for line in [
        "interceptor_agent_ready 1",
        "interceptor_agent_kube_pods{state=\"Ebpf\"} 1",
        "interceptor_agent_kube_lists_total{resource=\"Pods\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }
    let _ = std::fs::remove_file(&kubeconfig);
}

#[test]
fn pods_in_the_nodes_network_namespace_are_never_intercepted() {
    let mut h = Harness::new("khostnet");
    let env = KubeEnv::new(&h);
    env.api.apply(Kind::Namespace, namespace_object(NS, &[]));
    // A process in the node's own network namespace, in a kubelet-style cgroup, claimed by two
    // pod objects: one honest (hostNetwork: true) and one that says it has its own network.
    let base = h.pod("hostproc");
    let uid = new_uid();
    let cgroup = kubelet_cgroup(&base, &uid, Driver::Systemd)
        .cgroup
        .expect("cgroup");
    let sleeper = interceptor_lab::lab::Managed::new(
        "host process",
        std::process::Command::new("sleep")
            .arg("3600")
            .spawn()
            .expect("sleep"),
    );
    let pid = sleeper.pid().expect("pid");
    std::fs::write(cgroup.join("cgroup.procs"), pid.to_string()).expect("cgroup.procs");
    let mut honest = pod_object(
        NS,
        "hostnet",
        &new_uid(),
        &env.node,
        base.ip,
        &[(STATUS, "{}")],
        PROXY,
    );
    honest["spec"]["hostNetwork"] = true.into();
    env.api.apply(Kind::Pod, honest);
    env.api.apply(
        Kind::Pod,
        pod_object(
            NS,
            "liar",
            &uid,
            &env.node,
            base.ip,
            &[(MODE, "ebpf")],
            PROXY,
        ),
    );
    h.start_kube_agent(&env.kubeconfig, &env.node, &[]);
    wait_until(WAIT, || {
        !warnings(&env, "liar", "InterceptionFailed").is_empty()
    });
    let note = warnings(&env, "liar", "InterceptionFailed")[0]["note"]
        .as_str()
        .expect("note")
        .to_owned();
    assert!(note.contains("node's own network namespace"), "{note}");
    assert!(kube_entries(&h).is_empty());
    assert!(warnings(&env, "hostnet", "InterceptionFailed").is_empty());
    drop(sleeper);
}

#[test]
fn outbound_annotations_apply_live() {
    let mut h = Harness::new("kout");
    let env = KubeEnv::new(&h);
    env.api.apply(Kind::Namespace, namespace_object(NS, &[]));
    let server = h.pod("server");
    let other = h.pod("other");
    let e9000 = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
    let e9001 = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9001));
    let other9001 = EchoServer::start(&other, SocketAddr::new(ip4(&other), 9001));
    let other9443 = EchoServer::start(&other, SocketAddr::new(ip4(&other), 9443));
    let other_cidr = format!("{}/32", other.ip);
    let (client, _) = meshed_pod(
        &mut h,
        &env,
        "client",
        &[
            (STATUS, "{}"),
            (EXCLUDE_OUTBOUND_PORTS, "9000"),
            (EXCLUDE_OUTBOUND_IP_RANGES, &other_cidr),
        ],
        PROXY,
        true,
    );
    h.start_kube_agent(&env.kubeconfig, &env.node, &[]);
    wait_entry(&h, "client", |e| {
        e["spec"]["exclude_outbound_ports"] == serde_json::json!([9000])
    });
    let before = h.counters();
    direct(&client, &e9000);
    direct(&client, &other9001);
    through_sidecar(&client, &e9001);
    let after = h.counters();
    assert_eq!(after.since(&before, "connect_skipped_port"), 1);
    assert_eq!(after.since(&before, "connect_skipped_cidr"), 1);
    assert_eq!(after.since(&before, "connect_redirected"), 1);

    // Re-annotated: only the server's /32 is captured, plus port 9443 anywhere.
    let server_cidr = format!("{}/32", server.ip);
    env.api.update(Kind::Pod, NS, "client", |p| {
        set_annotations(
            p,
            &[
                (EXCLUDE_OUTBOUND_PORTS, None),
                (EXCLUDE_OUTBOUND_IP_RANGES, None),
                (INCLUDE_OUTBOUND_IP_RANGES, Some(&server_cidr)),
                (INCLUDE_OUTBOUND_PORTS, Some("9443")),
            ],
        );
    });
    wait_entry(&h, "client", |e| {
        e["spec"]["include_outbound_ports"] == serde_json::json!([9443])
    });
    let before = h.counters();
    through_sidecar(&client, &e9000);
    direct(&client, &other9001);
    through_sidecar(&client, &other9443);
    let after = h.counters();
    assert_eq!(after.since(&before, "connect_redirected"), 2);
    assert_eq!(after.since(&before, "connect_skipped_not_included"), 1);
}

#[test]
fn inbound_annotations_apply_live() {
    let mut h = Harness::new("kin");
    let env = KubeEnv::new(&h);
    env.api.apply(Kind::Namespace, namespace_object(NS, &[]));
    let client = h.pod("client");
    let (server, _) = meshed_pod(
        &mut h,
        &env,
        "server",
        &[(STATUS, "{}"), (EXCLUDE_INBOUND_PORTS, "9000")],
        PROXY,
        true,
    );
    let e9000 = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
    let e9001 = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9001));
    h.start_kube_agent(&env.kubeconfig, &env.node, &[]);
    wait_entry(&h, "server", |e| e["inbound_ready"] == true);
    let passthrough = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6));
    let send = |echo: &EchoServer| {
        let s = connect_from(&client, echo.addr).expect("connect");
        assert_eq!(echo_round_trip(s, b"in").expect("echo"), b"in");
        echo.seen().last().expect("seen").peer.ip()
    };
    assert_eq!(send(&e9000), ip4(&client), "excluded port: direct");
    assert_eq!(send(&e9001), passthrough, "captured by the sidecar");

    // includeInboundPorts as a list: only 9000 is captured now.
    env.api.update(Kind::Pod, NS, "server", |p| {
        set_annotations(
            p,
            &[
                (EXCLUDE_INBOUND_PORTS, None),
                (INCLUDE_INBOUND_PORTS, Some("9000")),
            ],
        );
    });
    wait_entry(&h, "server", |e| {
        e["spec"]["include_inbound_ports"] == serde_json::json!({"list": [9000]})
    });
    assert_eq!(send(&e9001), ip4(&client), "9001 no longer listed");
    assert_eq!(send(&e9000), passthrough, "9000 listed");

    // Empty: inbound capture off, outbound still on.
    env.api.update(Kind::Pod, NS, "server", |p| {
        set_annotations(p, &[(INCLUDE_INBOUND_PORTS, Some(""))]);
    });
    wait_entry(&h, "server", |e| {
        e["inbound"] == false && e["outbound"] == true
    });
    assert_eq!(send(&e9000), ip4(&client));
}

#[test]
fn modes_and_injection_policy_decide_interception() {
    let World {
        mut h,
        env,
        server: _server,
        echo,
    } = World::new("kmode");
    let (pod, _) = meshed_pod(&mut h, &env, "app", &[(STATUS, "{}")], PROXY, true);
    h.start_kube_agent(&env.kubeconfig, &env.node, &[]);
    wait_entry(&h, "app", |_| true);
    through_sidecar(&pod, &echo);

    let set = |k: &'static str, v: Option<&'static str>| {
        env.api
            .update(Kind::Pod, NS, "app", |p| set_annotations(p, &[(k, v)]));
    };
    set(INTERCEPTION_MODE, Some("NONE"));
    wait_gone(&h, "app");
    direct(&pod, &echo);
    set(INTERCEPTION_MODE, Some("REDIRECT"));
    wait_entry(&h, "app", |_| true);
    through_sidecar(&pod, &echo);
    // Ours wins over Istio's: off, then ebpf even with NONE.
    set(MODE, Some("off"));
    wait_gone(&h, "app");
    direct(&pod, &echo);
    set(INTERCEPTION_MODE, Some("NONE"));
    set(MODE, Some("ebpf"));
    wait_entry(&h, "app", |_| true);
    through_sidecar(&pod, &echo);
    // iptables mode: istio-iptables' chains in the pod instead of the datapath (the app's
    // socket sees its original peer through the NAT; the sidecar counts the connection).
    set(MODE, Some("iptables"));
    wait_entry(&h, "app", |e| e["mode"] == "iptables");
    let outbound = "interceptor_proxy_connections_total{direction=\"Outbound\"}";
    let before = h.proxy_metric(&pod, outbound);
    let redirected = h.counters();
    let s = connect_from(&pod, echo.addr).expect("connect");
    assert_eq!(echo_round_trip(s, b"nat").expect("echo"), b"nat");
    assert_eq!(
        h.proxy_metric(&pod, outbound),
        before + 1.0,
        "via the sidecar"
    );
    assert_eq!(
        h.counters().since(&redirected, "connect_redirected"),
        0,
        "not by the datapath"
    );
    // Back to eBPF: the chains go, the datapath takes over.
    set(MODE, Some("ebpf"));
    wait_entry(&h, "app", |e| e["mode"] == "ebpf");
    through_sidecar(&pod, &echo);
    // Off from iptables mode: nothing left.
    set(MODE, Some("iptables"));
    wait_entry(&h, "app", |e| e["mode"] == "iptables");
    set(MODE, Some("off"));
    wait_gone(&h, "app");
    direct(&pod, &echo);
    let before = h.proxy_metric(&pod, outbound);
    direct(&pod, &echo);
    assert_eq!(
        h.proxy_metric(&pod, outbound),
        before,
        "no rule left behind"
    );

    // A namespace asking for injection does not capture a pod that has no sidecar (its traffic
    // would go to a proxy that does not exist): an event says so.
    env.api.apply(
        Kind::Namespace,
        namespace_object(NS, &[(NAMESPACE_INJECTION, "enabled")]),
    );
    let (bare, _) = meshed_pod(&mut h, &env, "bare", &[], &["app"], false);
    wait_until(WAIT, || {
        !warnings(&env, "bare", "SidecarMissing").is_empty()
    });
    assert!(entry(&h, "bare").is_none());
    direct(&bare, &echo);
    // …while one the injector handled is captured.
    let (injected, _) = meshed_pod(&mut h, &env, "injected", &[(STATUS, "{}")], PROXY, true);
    wait_entry(&h, "injected", |_| true);
    through_sidecar(&injected, &echo);
}

#[test]
fn bad_values_post_an_event_and_leave_the_pod_unintercepted() {
    let World {
        mut h,
        env,
        server: _server,
        echo,
    } = World::new("kbad");
    let (pod, _) = meshed_pod(&mut h, &env, "app", &[(STATUS, "{}")], PROXY, true);
    h.start_kube_agent(&env.kubeconfig, &env.node, &[]);
    wait_entry(&h, "app", |_| true);

    let bad = [
        (INCLUDE_INBOUND_PORTS, "80,*"),
        (EXCLUDE_INBOUND_PORTS, "http"),
        (INCLUDE_OUTBOUND_PORTS, "70000"),
        (EXCLUDE_OUTBOUND_PORTS, "*"),
        (INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/33"),
        (EXCLUDE_OUTBOUND_IP_RANGES, "not-a-cidr"),
        (INTERCEPTION_MODE, "BPF"),
        (MODE, "turbo"),
    ];
    for (i, (annotation, value)) in bad.into_iter().enumerate() {
        env.api.update(Kind::Pod, NS, "app", |p| {
            set_annotations(p, &[(annotation, Some(value))]);
        });
        wait_until(WAIT, || {
            warnings(&env, "app", "InvalidInterceptionAnnotation").len() > i
        });
        let events = warnings(&env, "app", "InvalidInterceptionAnnotation");
        let note = events[i]["note"].as_str().expect("note");
        assert!(
            note.contains(annotation) && note.contains(value),
            "event names annotation and value: {note}"
        );
        assert_eq!(events[i]["type"], "Warning");
        assert_eq!(events[i]["regarding"]["kind"], "Pod");
        assert_eq!(events[i]["regarding"]["namespace"], NS);
        // Never half-configured: the pod is not intercepted at all.
        wait_gone(&h, "app");
        direct(&pod, &echo);
        // Fixed: intercepted again.
        env.api.update(Kind::Pod, NS, "app", |p| {
            set_annotations(p, &[(annotation, None)]);
        });
        wait_entry(&h, "app", |_| true);
        through_sidecar(&pod, &echo);
    }
}

#[test]
fn relists_after_watch_expiry_and_api_restarts_converge() {
    let World {
        mut h,
        mut env,
        server,
        echo,
    } = World::new("krelist");
    let (a, _) = meshed_pod(&mut h, &env, "a", &[(STATUS, "{}")], PROXY, true);
    let (b, _) = meshed_pod(&mut h, &env, "b", &[(STATUS, "{}")], PROXY, true);
    h.start_kube_agent(&env.kubeconfig, &env.node, &[]);
    wait_entry(&h, "a", |_| true);
    wait_entry(&h, "b", |_| true);
    let lists = env.api.lists("Pod");

    // The watch expires while `a` is deleted and `b` re-annotated: only a re-list tells.
    env.api.expire_watches(|c| {
        c.delete(Kind::Pod, NS, "a");
        c.update(Kind::Pod, NS, "b", |p| {
            set_annotations(p, &[(EXCLUDE_OUTBOUND_PORTS, Some("9000"))]);
        });
    });
    wait_gone(&h, "a");
    wait_entry(&h, "b", |e| {
        e["spec"]["exclude_outbound_ports"] == serde_json::json!([9000])
    });
    assert!(env.api.lists("Pod") > lists, "re-listed after 410 Gone");
    direct(&a, &echo);
    direct(&b, &echo);

    // A change neither watch is shown (a pod of another node): the watches only learn its
    // version from BOOKMARK events, and must resume from it after the restart below.
    let marker = env.api.apply(
        Kind::Pod,
        pod_object(
            NS,
            "elsewhere",
            &new_uid(),
            "another-node",
            server.ip,
            &[],
            &["app"],
        ),
    );
    // Both watches have been sent a bookmark carrying it. "Sent" is the fake server's queue,
    // not the agent's watcher: give the agent (another process, on a loaded CI machine) ample
    // time to read and apply it — 100 ms once proved too short.
    wait_until(Duration::from_secs(20), || {
        env.api.bookmarked("Pod") >= marker && env.api.bookmarked("Namespace") >= marker
    });
    std::thread::sleep(Duration::from_secs(3));

    // The API server goes away for a while; `b` is deleted meanwhile. The agent keeps the
    // datapath running, reconnects with backoff, and converges.
    let watches = env.api.watches();
    env.api.restart(Duration::from_secs(2), |c| {
        c.delete(Kind::Pod, NS, "b");
    });
    wait_gone(&h, "b");
    assert!(
        env.api.watches() > watches,
        "watching again after the restart"
    );
    // Each watch comes back on its own backoff schedule: wait (bounded) until both have
    // re-watched from a version at least the bookmark's, then say which did not.
    let resumed_from = |resource: &str| -> Vec<u64> {
        env.api
            .requests()
            .iter()
            .filter(|r| {
                r.starts_with(&format!("GET /api/v1/{resource}?")) && r.contains("watch=true")
            })
            .filter_map(|r| {
                let v = r.split("resourceVersion=").nth(1)?;
                v.split('&').next()?.parse().ok()
            })
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline
        && !["pods", "namespaces"]
            .iter()
            .all(|r| resumed_from(r).iter().any(|&rv| rv >= marker))
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    for resource in ["pods", "namespaces"] {
        let resumed = resumed_from(resource);
        assert!(
            resumed.iter().any(|&rv| rv >= marker),
            "{resource} watch resumed from a bookmarked version (>= {marker}): {resumed:?}"
        );
    }
    let (c, _) = meshed_pod(&mut h, &env, "c", &[(STATUS, "{}")], PROXY, true);
    wait_entry(&h, "c", |_| true);
    through_sidecar(&c, &echo);
}

#[test]
fn agent_restart_collects_pods_deleted_meanwhile_and_takes_over_reused_ips() {
    let World {
        mut h,
        env,
        server: _server,
        echo,
    } = World::new("krestart");
    let (stays, _) = meshed_pod(&mut h, &env, "stays", &[(STATUS, "{}")], PROXY, true);
    let (goes, _) = meshed_pod(&mut h, &env, "goes", &[(STATUS, "{}")], PROXY, true);
    h.start_kube_agent(&env.kubeconfig, &env.node, &["--keep-pinned"]);
    wait_entry(&h, "stays", |_| true);
    wait_entry(&h, "goes", |_| true);
    assert!(h.stop_agent());

    // No agent: interception goes on from the pins.
    through_sidecar(&stays, &echo);
    // Meanwhile `goes` is deleted (containers stopped, sandbox removed) and a new pod gets its
    // IP (an IP the registry still lists for `goes`).
    let reused = goes.ip;
    env.api.delete(Kind::Pod, NS, "goes");
    h.stop_processes_of(&goes);
    interceptor_lab::lab::ip(&["netns", "del", &goes.netns]).expect("netns del");
    let fresh = h.pod("fresh");
    interceptor_lab::lab::ip(&[
        "-n",
        &fresh.netns,
        "addr",
        "add",
        &format!("{reused}/24"),
        "dev",
        "eth0",
    ])
    .expect("ip addr add");
    let uid = new_uid();
    let fresh = kubelet_cgroup(&fresh, &uid, Driver::Cgroupfs);
    h.keep_running(&fresh);
    h.sidecar(&fresh);
    env.api.apply(
        Kind::Pod,
        pod_object(
            NS,
            "fresh",
            &uid,
            &env.node,
            reused,
            &[(STATUS, "{}")],
            PROXY,
        ),
    );

    h.start_kube_agent(&env.kubeconfig, &env.node, &[]);
    assert!(entry(&h, "goes").is_none(), "collected at the first list");
    let e = wait_entry(&h, "fresh", |_| true);
    let addresses: Vec<String> = e["addresses"]
        .as_array()
        .expect("addresses")
        .iter()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    assert!(addresses.contains(&reused.to_string()), "{addresses:?}");
    through_sidecar(&fresh, &echo);
    through_sidecar(&stays, &echo);
    let mut names = kube_entries(&h);
    names.sort();
    assert_eq!(names, vec![format!("{NS}/fresh"), format!("{NS}/stays")]);
}

#[test]
fn sandbox_restart_and_pods_found_only_by_ip() {
    let World {
        mut h,
        env,
        server: _server,
        echo,
    } = World::new("ksandbox");
    let (first, uid) = meshed_pod(&mut h, &env, "web", &[(STATUS, "{}")], PROXY, true);
    // A pod whose cgroup path does not carry its UID: found by its IP in exactly one netns.
    let by_ip = h.pod("byip");
    h.keep_running(&by_ip);
    h.sidecar(&by_ip);
    env.api.apply(
        Kind::Pod,
        pod_object(
            NS,
            "byip",
            &new_uid(),
            &env.node,
            by_ip.ip,
            &[(STATUS, "{}")],
            PROXY,
        ),
    );
    h.start_kube_agent(&env.kubeconfig, &env.node, &[]);
    wait_entry(&h, "web", |_| true);
    wait_entry(&h, "byip", |_| true);
    through_sidecar(&by_ip, &echo);

    // The sandbox dies and kubelet makes a new one: same pod UID, new network namespace, new IP.
    h.stop_processes_of(&first);
    interceptor_lab::lab::ip(&["netns", "del", &first.netns]).expect("netns del");
    let second = h.pod("web2");
    let second = kubelet_cgroup(&second, &uid, Driver::Cgroupfs);
    h.keep_running(&second);
    h.sidecar(&second);
    env.api.update(Kind::Pod, NS, "web", |p| {
        p["status"]["podIP"] = second.ip.to_string().into();
        p["status"]["podIPs"] = serde_json::json!([{"ip": second.ip.to_string()}]);
    });
    wait_entry(&h, "web", |e| {
        e["addresses"][0] == second.ip.to_string().as_str()
    });
    through_sidecar(&second, &echo);
    assert_eq!(
        kube_entries(&h)
            .iter()
            .filter(|n| n.ends_with("/web"))
            .count(),
        1,
        "one entry for the pod"
    );
}

/// CPU time (user + system, clock ticks) a process has used, from /proc/PID/stat.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

#[test]
fn many_pods_are_all_intercepted_and_reported() {
    const PODS: usize = 40;
    let World {
        mut h,
        env,
        server: _server,
        echo,
    } = World::new("kscale");
    let mut pods = Vec::new();
    for i in 0..PODS {
        let sidecar = i == 0;
        let (pod, _) = meshed_pod(
            &mut h,
            &env,
            &format!("p{i}"),
            &[(STATUS, "{}")],
            PROXY,
            sidecar,
        );
        pods.push(pod);
    }
    let started = std::time::Instant::now();
    h.start_kube_agent(&env.kubeconfig, &env.node, &[]);
    let to_ready = started.elapsed();
    // Ready means every listed pod is applied.
    assert_eq!(kube_entries(&h).len(), PODS);
    through_sidecar(&pods[0], &echo);

    // Steady state: the controller's passes (5 a second here) over 40 pods.
    let pid = h.agent_mut().pid().expect("agent pid");
    let ticks = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(5));
    let idle_ticks = cpu_ticks(pid) - ticks;

    let uid = new_uid();
    let late = kubelet_cgroup(&h.pod("late"), &uid, Driver::Systemd);
    h.keep_running(&late);
    h.sidecar(&late);
    let applied = std::time::Instant::now();
    env.api.apply(
        Kind::Pod,
        pod_object(
            NS,
            "late",
            &uid,
            &env.node,
            late.ip,
            &[(STATUS, "{}")],
            PROXY,
        ),
    );
    wait_entry(&h, "late", |_| true);
    let to_intercept = applied.elapsed();
    through_sidecar(&late, &echo);
    eprintln!(
        "kube scale: {PODS} pods, agent start to ready {to_ready:?}; idle CPU {idle_ticks} ticks \
         in 5 s at 5 passes/s; new pod to intercepted {to_intercept:?} (status polled every \
         50 ms)"
    );
}

#[test]
fn a_new_pod_takes_over_an_ip_whose_old_pod_is_deleted_but_lingers() {
    let World {
        mut h,
        env,
        server: _server,
        echo,
    } = World::new("kreuse");
    let (old, _) = meshed_pod(&mut h, &env, "old", &[(STATUS, "{}")], PROXY, true);
    h.start_kube_agent(&env.kubeconfig, &env.node, &[]);
    wait_entry(&h, "old", |_| true);

    // The new pod's sandbox gets the old pod's IP while the old sandbox still exists (its
    // teardown lags), and the agent learns both changes in one re-list.
    let reused = old.ip;
    let uid = new_uid();
    let new = kubelet_cgroup(&h.pod("new"), &uid, Driver::Systemd);
    interceptor_lab::lab::ip(&[
        "-n",
        &new.netns,
        "addr",
        "add",
        &format!("{reused}/32"),
        "dev",
        "eth0",
    ])
    .expect("ip addr add");
    h.keep_running(&new);
    h.sidecar(&new);
    env.api.expire_watches(|c| {
        c.delete(Kind::Pod, NS, "old");
        c.apply(
            Kind::Pod,
            pod_object(NS, "new", &uid, &env.node, reused, &[(STATUS, "{}")], PROXY),
        );
    });
    let e = wait_entry(&h, "new", |_| true);
    assert!(
        e["addresses"]
            .as_array()
            .expect("addresses")
            .iter()
            .any(|a| a == reused.to_string().as_str()),
        "{e}"
    );
    assert!(entry(&h, "old").is_none());
    assert!(
        warnings(&env, "new", "InterceptionFailed").is_empty(),
        "taken over without a failed attempt: {:?}",
        env.api.events()
    );
    through_sidecar(&new, &echo);
    direct(&old, &echo);
}
