//! Least privilege: every capability the agent names (`interceptor::capabilities`) is shown
//! necessary by dropping it alone with `setpriv` (everything else kept) and seeing the failure
//! that names it; with exactly the named set, and nothing else, a pod is intercepted; the pinned
//! state is root's alone.
//!
//! Each drop is shown twice: the start-up check refuses with the capability and its use, and
//! with the check skipped (`INTERCEPTOR_SKIP_CAPABILITY_CHECK=1`) the kernel itself refuses the
//! operation that needs it, and the error says which capability this process lacked.

use std::{
    net::SocketAddr,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    process::{Output, Stdio},
    time::Duration,
};

use interceptor::{
    bpf::features::{kernel_below, kernel_release},
    capabilities::{AGENT, SKIP_CHECK_ENV},
};

use crate::{EchoServer, Harness, connect_from, echo_round_trip, ip4};

/// `setpriv` options that drop `caps` (e.g. `-sys_admin` or `-all,+sys_admin`) from the
/// bounding set: root's exec then gets exactly the rest. Nothing is inherited or ambient.
fn setpriv(bounding: &str) -> Vec<String> {
    vec![
        "setpriv".into(),
        "--inh-caps=-all".into(),
        "--ambient-caps=-all".into(),
        format!("--bounding-set={bounding}"),
        "--".into(),
    ]
}

/// `interceptor` run through `prefix` (e.g. `prlimit` and its options, or nothing) and then
/// `setpriv` keeping `bounding`, with the start-up check skipped if asked.
fn command_under(
    h: &Harness,
    prefix: &[&str],
    bounding: &str,
    skip_check: bool,
) -> std::process::Command {
    let mut wrapper: Vec<String> = prefix.iter().map(|&p| p.to_owned()).collect();
    wrapper.extend(setpriv(bounding));
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let env: &[(&str, &str)] = if skip_check {
        &[(SKIP_CHECK_ENV, "1")]
    } else {
        &[]
    };
    h.command_via(&wrapper, env)
}

fn run_via(h: &Harness, bounding: &str, skip_check: bool, args: &[&str]) -> Output {
    command_under(h, &[], bounding, skip_check)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running interceptor under setpriv")
}

/// `setpriv`'s name for a capability: `CAP_SYS_ADMIN` → `sys_admin`.
fn setpriv_name(cap: &str) -> String {
    cap.trim_start_matches("CAP_").to_ascii_lowercase()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_agent_refuses_to_start_without_each_capability_it_names() {
    let h = Harness::new("capcheck");
    for need in AGENT {
        let cap = need.cap.name();
        let out = run_via(&h, &format!("-{}", setpriv_name(cap)), false, &["agent"]);
        let err = stderr(&out);
        assert!(!out.status.success(), "started without {cap}: {err}");
        assert!(
            err.contains(&format!("the agent is missing {cap}:")) && err.contains(need.why),
            "without {cap}: {err}"
        );
        // Refused before anything was loaded or pinned.
        assert!(!h.pin_root.exists(), "without {cap}: state was pinned");
    }
}

#[test]
fn without_cap_sys_admin_the_kernel_refuses_to_enter_a_pod() {
    let mut h = Harness::new("capsysadm");
    let pod = h.pod("app");
    h.start_agent(&[]);
    let enable = ["pod", "enable", "--netns", pod.netns.as_str()];

    let checked = run_via(&h, "-sys_admin", false, &enable);
    assert!(!checked.status.success());
    assert!(
        stderr(&checked).contains("`interceptor pod enable` is missing CAP_SYS_ADMIN"),
        "{}",
        stderr(&checked)
    );

    // CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN kept: only setns() is refused.
    let out = run_via(&h, "-sys_admin", true, &enable);
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "enabled without CAP_SYS_ADMIN: {err}"
    );
    assert!(
        err.contains("entering network namespace")
            && err.contains("Operation not permitted (this process lacks CAP_SYS_ADMIN)"),
        "{err}"
    );
    assert!(h.cli(&["pod", "list", "--json"]).stdout.starts_with(b"[]"));
}

#[test]
fn without_cap_sys_ptrace_a_listener_that_predates_the_datapath_cannot_be_adopted() {
    let mut h = Harness::new("capptrace");
    let server = h.pod("server");
    // The sidecar listens before any program is attached: sockops never saw its listen(), so
    // the agent must take the socket from the sidecar (UID 1337) itself.
    h.sidecar(&server);
    let wrapper = setpriv("-sys_ptrace");
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let cmd = h.command_via(&wrapper, &[(SKIP_CHECK_ENV, "1")]);
    h.spawn_agent_with(cmd, &[])
        .wait_for_line("agent ready", Duration::from_secs(60))
        .expect("agent ready without CAP_SYS_PTRACE");
    let enable = ["pod", "enable", "--netns", server.netns.as_str()];

    let checked = run_via(&h, "-sys_ptrace", false, &enable);
    assert!(
        stderr(&checked).contains("`interceptor pod enable` is missing CAP_SYS_PTRACE"),
        "{}",
        stderr(&checked)
    );

    let out = run_via(&h, "-sys_ptrace", true, &enable);
    let err = stderr(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The pod is enabled (outbound needs no listener), but inbound cannot reach the proxy.
    assert!(out.status.success(), "{err}");
    assert!(
        stdout.contains("waiting for the proxy's 15006 listener"),
        "{stdout}"
    );
    // The warning naming the capability is checked where it was verified (>= 5.15). On the
    // 5.10 guest the listener stays unadopted all the same (above and below) but `pod enable`
    // prints no warning: the refusal is silent there, an open gap (see the closing note).
    if !kernel_below(&kernel_release(), (5, 15)) {
        assert!(
            err.contains("inbound listener cannot be resolved")
                && err.contains("could not lend it")
                && err.contains("(this process lacks CAP_SYS_PTRACE)"),
            "stderr: {err}\nstdout: {stdout}"
        );
    } else {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "interceptor-e2e: not checked below 5.15: the warning naming CAP_SYS_PTRACE \
             (got {err:?})"
        );
    }

    // The same command with the capability adopts the listener at once.
    let out = h.cli(&enable);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("inbound on"), "{stdout}");
}

#[test]
fn without_cap_net_admin_iptables_mode_is_refused() {
    let mut h = Harness::new("capnetadm");
    let pod = h.pod("app");
    h.start_agent(&[]);
    let out = run_via(
        &h,
        "-net_admin",
        true,
        &[
            "pod",
            "enable",
            "--netns",
            pod.netns.as_str(),
            "--mode",
            "iptables",
            "--backend",
            "nft",
        ],
    );
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "iptables mode without CAP_NET_ADMIN: {err}"
    );
    assert!(err.contains("this process lacks CAP_NET_ADMIN"), "{err}");
    assert!(h.cli(&["pod", "list", "--json"]).stdout.starts_with(b"[]"));
}

#[test]
fn without_cap_net_raw_the_legacy_iptables_backend_is_refused() {
    let mut h = Harness::new("capnetraw");
    let pod = h.pod("app");
    h.start_agent(&[]);
    let out = run_via(
        &h,
        "-net_raw",
        true,
        &[
            "pod",
            "enable",
            "--netns",
            pod.netns.as_str(),
            "--mode",
            "iptables",
            "--backend",
            "legacy",
        ],
    );
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "legacy iptables without CAP_NET_RAW: {err}"
    );
    assert!(err.contains("this process lacks CAP_NET_RAW"), "{err}");
}

#[test]
fn with_exactly_the_named_capabilities_pods_are_intercepted() {
    let mut h = Harness::new("capexact");
    let client = h.pod("client");
    let server = h.pod("server");
    let outside = h.pod("outside");
    // The server's sidecar runs as UID 1337 from exec, as Envoy does: dumpable, so its /proc
    // entries are 1337's, and it listens before the datapath exists, so the agent must take
    // its listener over with pidfd_getfd (no CAP_DAC_READ_SEARCH to list /proc/PID/fd).
    let mut sidecar = std::process::Command::new("setpriv");
    sidecar
        .args(["--reuid=1337", "--regid=1337", "--clear-groups", "--"])
        .arg(&h.bin)
        .args(["proxy", "--no-drop-privileges"]);
    h.start_sidecar(&server, sidecar);
    let exact = exact_set();
    // No CAP_BPF, CAP_PERFMON, CAP_SYS_RESOURCE or CAP_DAC_*, and no skipped check.
    let wrapper = setpriv(&exact);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let cmd = h.command_via(&wrapper, &[]);
    h.spawn_agent_with(cmd, &[])
        .wait_for_line("agent ready", Duration::from_secs(60))
        .expect("agent ready with exactly the named capabilities");
    h.sidecar(&client);
    let echo = EchoServer::start(&outside, SocketAddr::new(ip4(&outside), 9000));
    let inner = EchoServer::start(&server, SocketAddr::new(ip4(&server), 9000));
    for pod in [&client, &server] {
        let out = run_via(
            &h,
            &exact,
            false,
            &["pod", "enable", "--netns", pod.netns.as_str()],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        if pod.name == server.name {
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(stdout.contains("inbound on"), "{stdout}");
        }
    }
    let before = h.counters();

    // Outbound: the client's connection goes through its sidecar.
    let stream = connect_from(&client, echo.addr).expect("connect");
    let peer = stream.peer_addr().expect("peer");
    assert_eq!(echo_round_trip(stream, b"least").expect("echo"), b"least");
    assert_eq!(peer, SocketAddr::from(([127, 0, 0, 1], 15001)));
    // Inbound: the server's app is reached through its adopted sidecar listener.
    let stream = connect_from(&outside, inner.addr).expect("connect");
    assert_eq!(echo_round_trip(stream, b"in").expect("echo"), b"in");

    let after = h.counters();
    assert_eq!(after.since(&before, "connect_redirected"), 1);
    after.assert_steered_inbound(&before);
    assert_eq!(echo.seen().len(), 1);
    let seen = inner.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].peer.ip(), std::net::Ipv4Addr::new(127, 0, 0, 6));
}

/// The DaemonSet's mode: `--kube` against the fake API server, with exactly the capabilities
/// the manifests add (less the conditional ones), finds its pods through /proc and intercepts
/// one meshed before it started and one created while it runs.
#[test]
fn in_kubernetes_mode_with_exactly_the_named_capabilities_pods_are_intercepted() {
    use super::kube::{
        DAEMONSET, DS_NAME, DS_NS, PROXY, World, entry, meshed_pod, through_sidecar, wait_entry,
    };
    use crate::fake_api::Kind;
    let World {
        mut h,
        env,
        server: _server,
        echo,
    } = World::new("capkube");
    let status = interceptor::kube::annotations::STATUS;
    let (client, _) = meshed_pod(&mut h, &env, "client", &[(status, "{}")], PROXY, true);
    env.api.apply(
        Kind::DaemonSet,
        serde_json::json!({"metadata": {"namespace": DS_NS, "name": DS_NAME}}),
    );
    let wrapper = setpriv(&exact_set());
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let cmd = h.command_via(&wrapper, &[]);
    let kubeconfig = env.kubeconfig.to_str().expect("utf-8 path");
    let args = [
        &[
            "--kube",
            "--kubeconfig",
            kubeconfig,
            "--node-name",
            &env.node,
        ][..],
        DAEMONSET,
    ]
    .concat();
    h.spawn_agent_with(cmd, &args)
        .wait_for_line("agent ready", Duration::from_secs(60))
        .expect("kube agent ready with exactly the named capabilities");
    assert!(entry(&h, "client").is_some(), "intercepted at ready");
    through_sidecar(&client, &echo);

    let inject = interceptor::kube::annotations::INJECT;
    let (late, _) = meshed_pod(&mut h, &env, "late", &[(inject, "true")], &["app"], true);
    wait_entry(&h, "late", |_| true);
    through_sidecar(&late, &echo);
}

/// CAP_SYS_RESOURCE is named only where the kernel charges BPF memory to RLIMIT_MEMLOCK
/// (Linux < 5.11). With a 64 KiB memlock limit and without the capability, the agent refuses
/// there — by its check, and with the check skipped by its own error naming the limit and the
/// capability — and starts with it; on newer kernels it starts without it (not needed).
#[test]
fn cap_sys_resource_is_needed_only_where_bpf_memory_counts_against_memlock() {
    let mut h = Harness::new("capmemlock");
    const LOW_MEMLOCK: &[&str] = &["prlimit", "--memlock=65536:65536", "--"];
    let low_memlock =
        |bounding: &str, skip_check: bool| command_under(&h, LOW_MEMLOCK, bounding, skip_check);
    if !kernel_below(&kernel_release(), (5, 11)) {
        let cmd = low_memlock("-sys_resource", false);
        h.spawn_agent_with(cmd, &[])
            .wait_for_line("agent ready", Duration::from_secs(60))
            .expect("agent ready without CAP_SYS_RESOURCE and a 64 KiB memlock limit");
        return;
    }
    let out = low_memlock("-sys_resource", false)
        .arg("agent")
        .stdin(Stdio::null())
        .output()
        .expect("agent");
    let err = stderr(&out);
    assert!(!out.status.success(), "started: {err}");
    assert!(
        err.contains("the agent is missing CAP_SYS_RESOURCE")
            && err.contains(interceptor::capabilities::MEMLOCK.why),
        "{err}"
    );
    assert!(!h.pin_root.exists(), "state was pinned");
    let out = low_memlock("-sys_resource", true)
        .arg("agent")
        .stdin(Stdio::null())
        .output()
        .expect("agent");
    let err = stderr(&out);
    assert!(!out.status.success(), "started: {err}");
    assert!(
        err.contains("charges BPF maps to RLIMIT_MEMLOCK, which stays at 64.0 KiB")
            && err.contains("(this process lacks CAP_SYS_RESOURCE)"),
        "{err}"
    );
    assert!(!h.pin_root.exists(), "state was pinned");
    // With the capability the agent raises the limit itself.
    let cmd = low_memlock("+all", false);
    h.spawn_agent_with(cmd, &[])
        .wait_for_line("agent ready", Duration::from_secs(60))
        .expect("agent ready with CAP_SYS_RESOURCE and a 64 KiB memlock limit");
}

/// `setpriv --bounding-set` keeping exactly the capabilities the agent checks at start.
fn exact_set() -> String {
    format!(
        "-all,{}",
        AGENT
            .iter()
            .map(|n| format!("+{}", setpriv_name(n.cap.name())))
            .collect::<Vec<_>>()
            .join(",")
    )
}

#[test]
fn pinned_state_is_root_only() {
    let mut h = Harness::new("pinmode");
    h.start_agent(&[]);
    let maps = h.pin_root.join("maps");
    for dir in [&h.pin_root, &maps, &h.pin_root.join("links")] {
        let meta = std::fs::metadata(dir).expect("pin directory");
        assert_eq!(meta.uid(), 0, "{}", dir.display());
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o700,
            "{}",
            dir.display()
        );
    }
    let pins: Vec<_> = std::fs::read_dir(&maps)
        .expect("maps")
        .map(|e| e.expect("entry").path())
        .collect();
    assert!(!pins.is_empty());
    for pin in &pins {
        let meta = std::fs::metadata(pin).expect("pin");
        assert_eq!(meta.uid(), 0);
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o600,
            "{}",
            pin.display()
        );
    }

    // Another user cannot open a map to read or to write it: BPF_OBJ_GET checks nothing but
    // the path's permissions. First the 0700 directories stop the lookup, then (directories
    // opened up to search) the 0600 pin itself does.
    let pin = &pins[0];
    assert_eq!(obj_get_as(0, pin), ["ok", "ok"], "the helper itself works");
    // EACCES: the path's permissions refused it. EPERM: kernels before 6.5 with unprivileged
    // bpf() disabled (Debian's default) refuse any other user's bpf() call before the path is
    // looked at — a refusal too, one that does not depend on the modes checked above.
    let refused = |r: &[String]| r.iter().all(|e| e == "EACCES" || e == "EPERM");
    let direct = obj_get_as(NOBODY, pin);
    assert!(refused(&direct), "{direct:?}");
    let search = std::fs::Permissions::from_mode(0o711);
    for dir in [&h.pin_root, &maps] {
        std::fs::set_permissions(dir, search.clone()).expect("chmod");
    }
    let through_open_dirs = obj_get_as(NOBODY, pin);
    for dir in [&h.pin_root, &maps] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    }
    assert!(refused(&through_open_dirs), "{through_open_dirs:?}");
}

const NOBODY: u32 = 65534;

/// bpf(BPF_OBJ_GET) of `pin` read-only and write-only as UID/GID `id` (a tiny ctypes helper
/// under `setpriv`): the errno name of each, or "ok".
fn obj_get_as(id: u32, pin: &std::path::Path) -> Vec<String> {
    const HELPER: &str = r#"
import ctypes, errno, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
path = ctypes.create_string_buffer(sys.argv[1].encode())
for flags in (1 << 3, 1 << 4):  # BPF_F_RDONLY, BPF_F_WRONLY
    attr = ctypes.create_string_buffer(struct.pack("QII", ctypes.addressof(path), 0, flags), 64)
    fd = libc.syscall(int(sys.argv[2]), 7, attr, 64)  # bpf(BPF_OBJ_GET)
    print("ok" if fd >= 0 else errno.errorcode[ctypes.get_errno()])
"#;
    let out = std::process::Command::new("setpriv")
        .args([format!("--reuid={id}"), format!("--regid={id}")])
        .args(["--clear-groups", "--"])
        // Debian's python3 (`cargo xtask setup`): a shim under /root would be unreadable.
        .args(["/usr/bin/python3", "-c", HELPER])
        .arg(pin)
        .arg(libc::SYS_bpf.to_string())
        .output()
        .expect("running the BPF_OBJ_GET helper as nobody");
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}
