//! DNS capture on real pods: dnsmasq in a third pod is the app's resolver; the clients are
//! `dig` (bind9-dnsutils) over UDP and TCP and glibc's resolver (`getent hosts`). With capture
//! on, a mesh name is answered by the sidecar's DNS proxy (dnsmasq does not know it), other
//! names by the resolver, and every reply comes from the resolver's address; a pod without
//! capture is untouched; the resolver down gives SERVFAIL in bounded time.
//!
//! iptables mode (istio-iptables' DNS rules). The eBPF mode's DNS capture is not built yet.

use std::{
    net::IpAddr,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use interceptor_lab::lab::{LabPod, Managed};

use crate::{Harness, wait_until};

const MESH_IP: &str = "198.18.77.7";
const MESH_IP6: &str = "fd00:198:18::77";
const UPSTREAM_IP: &str = "198.18.88.8";

/// dnsmasq in `pod`, on its IPv4 and IPv6 addresses, port 53, knowing only `upstream.test`.
fn start_resolver(h: &mut Harness, pod: &LabPod) {
    let child = pod
        .spawn(
            Command::new("dnsmasq")
                .args([
                    "-k",
                    "--conf-file=/dev/null",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                    "--pid-file=",
                    "--user=root",
                    "--port=53",
                    "--local-ttl=60",
                ])
                .arg(format!("--listen-address={}", pod.ip))
                .arg(format!("--listen-address={}", pod.ip6))
                .arg(format!("--address=/upstream.test/{UPSTREAM_IP}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("dnsmasq (apt-get install dnsmasq-base; cargo xtask setup does)");
    h.apps
        .push(Managed::new(format!("{} dnsmasq", pod.name), child));
}

/// Runs `program ARGS` in `pod` (its netns and cgroup) and returns stdout.
fn run_in(pod: &LabPod, program: &str, args: &[&str]) -> String {
    let child = pod
        .spawn(
            Command::new(program)
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::null()),
        )
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let out = child.wait_with_output().expect("wait");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `dig @server ARGS` from `pod`, one try, 5 s.
fn dig(pod: &LabPod, server: &str, args: &[&str]) -> String {
    let at = format!("@{server}");
    run_in(
        pod,
        "dig",
        &[&[at.as_str(), "+tries=1", "+time=5"], args].concat(),
    )
}

fn status_of(out: &str) -> &str {
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("none")
}

/// The `;; SERVER: ip#port(...)` line: who the reply came from, as dig saw it.
fn server_of(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(";; SERVER: "))
        .and_then(|s| s.split('#').next())
        .unwrap_or("")
        .to_owned()
}

/// `/etc/netns/NETNS/resolv.conf`: what `ip netns exec` shows the pod's glibc.
struct NetnsResolvConf(PathBuf);

impl NetnsResolvConf {
    fn write(pod: &LabPod, nameserver: IpAddr) -> Self {
        let dir = PathBuf::from(format!("/etc/netns/{}", pod.netns));
        std::fs::create_dir_all(&dir).expect("/etc/netns dir");
        std::fs::write(
            dir.join("resolv.conf"),
            format!(
                "nameserver {nameserver}\nsearch default.svc.cluster.local svc.cluster.local \
                 cluster.local\noptions ndots:5 timeout:2 attempts:1\n"
            ),
        )
        .expect("resolv.conf");
        Self(dir)
    }
}

impl Drop for NetnsResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn getent(pod: &LabPod, name: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &pod.netns, "getent", "hosts", name])
        .stdin(Stdio::null())
        .output()
        .expect("getent");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const MESH: &str = "namespace: default
dns:
  ttl: 30s
  upstream_timeout: 1s
  services:
    - name: reviews.default
      addresses: [198.18.77.7, \"fd00:198:18::77\"]
";

#[test]
fn dns_capture_in_iptables_mode_answers_mesh_names_and_forwards_the_rest() {
    for backend in ["nft", "legacy"] {
        iptables_mode(backend);
    }
}

fn iptables_mode(backend: &str) {
    let mut h = Harness::new(&format!("dns{backend}"));
    let client = h.pod("client");
    let resolver = h.pod("dns");
    let bystander = h.pod("other");
    start_resolver(&mut h, &resolver);
    let (r4, r6) = (resolver.ip.to_string(), resolver.ip6.to_string());
    wait_until(Duration::from_secs(10), || {
        dig(&bystander, &r4, &["+short", "upstream.test"]).trim() == UPSTREAM_IP
    });

    // The sidecar: its UDP upstream is the pod's resolv.conf nameserver, as Istio's agent.
    let conf = std::env::temp_dir().join(format!("{}-resolv.conf", client.netns));
    std::fs::write(&conf, format!("nameserver {r4}\n")).expect("resolv.conf");
    let yaml = std::env::temp_dir().join(format!("{}-dns.yaml", client.netns));
    std::fs::write(&yaml, MESH).expect("config");
    for f in [&conf, &yaml] {
        let _ = std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o644));
    }
    h.sidecar_with(
        &client,
        &[
            "--config",
            &yaml.to_string_lossy(),
            "--dns-resolv-conf",
            &conf.to_string_lossy(),
        ],
    );
    let out = h.cli(&[
        "iptables",
        "apply",
        "--netns",
        &client.netns,
        "--backend",
        backend,
        "--dns-capture",
        "--dns-servers",
        &format!("{r4},{r6}"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _glibc = NetnsResolvConf::write(&client, resolver.ip.into());

    // A mesh name the resolver does not know: answered by the sidecar, over UDP and TCP, v4
    // and v6 resolver addresses, and the reply's source is the resolver's address.
    for server in [&r4, &r6] {
        for tcp in ["+notcp", "+tcp"] {
            let out = dig(
                &client,
                server,
                &[tcp, "reviews.default.svc.cluster.local", "A"],
            );
            assert_eq!(status_of(&out), "NOERROR", "{server} {tcp}: {out}");
            assert!(out.contains(MESH_IP), "{server} {tcp}: {out}");
            assert_eq!(&server_of(&out), server, "reply source: {out}");
            let out = dig(&client, server, &[tcp, "upstream.test", "A"]);
            assert!(
                out.contains(UPSTREAM_IP),
                "forwarded, {server} {tcp}: {out}"
            );
            assert_eq!(&server_of(&out), server, "reply source: {out}");
        }
    }
    let out = dig(&client, &r4, &["reviews.default.svc.cluster.local", "AAAA"]);
    assert!(out.contains(MESH_IP6), "{out}");
    // glibc's resolver with Kubernetes' search list finds the short name.
    let out = getent(&client, "reviews");
    assert!(
        out.starts_with(MESH_IP6) || out.starts_with(MESH_IP),
        "getent: {out:?}"
    );
    let out = getent(&client, "upstream.test");
    assert!(out.starts_with(UPSTREAM_IP), "getent: {out:?}");
    let local = h.proxy_metric(
        &client,
        "interceptor_proxy_dns_queries_total{transport=\"Udp\",result=\"Local\"}",
    );
    assert!(local >= 3.0, "{local}");

    // The pod without capture asks dnsmasq itself: the mesh name does not resolve.
    let out = dig(&bystander, &r4, &["reviews.default.svc.cluster.local", "A"]);
    assert!(!out.contains(MESH_IP), "{out}");
    assert_ne!(status_of(&out), "none", "dnsmasq answered: {out}");

    // The resolver down: SERVFAIL from the sidecar, in bounded time, for UDP and TCP.
    h.apps.clear();
    for tcp in ["+notcp", "+tcp"] {
        let start = Instant::now();
        let out = dig(&client, &r4, &[tcp, "down.test", "A"]);
        assert_eq!(status_of(&out), "SERVFAIL", "{tcp}: {out}");
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "{tcp}: {:?}",
            start.elapsed()
        );
    }
    // Mesh names still resolve without the resolver.
    let out = dig(
        &client,
        &r4,
        &["+short", "reviews.default.svc.cluster.local", "A"],
    );
    assert_eq!(out.trim(), MESH_IP);

    // Removal takes the DNS rules too: afterwards the app talks to the (dead) resolver itself.
    let out = h.cli(&["iptables", "remove", "--netns", &client.netns]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for table in ["nat", "raw"] {
        // (Per backend: the rules must have gone from the one they were written with.)
        let save = Command::new("ip")
            .args([
                "netns",
                "exec",
                &client.netns,
                "iptables-nft-save",
                "-t",
                table,
            ])
            .output()
            .expect("save");
        let text = String::from_utf8_lossy(&save.stdout);
        assert!(
            !text.contains("15053") && !text.contains("--zone"),
            "{table}: {text}"
        );
    }
    let out = dig(
        &client,
        &r4,
        &["+short", "reviews.default.svc.cluster.local", "A"],
    );
    assert!(!out.contains(MESH_IP), "{out}");
    let _ = std::fs::remove_file(conf);
    let _ = std::fs::remove_file(yaml);
}
