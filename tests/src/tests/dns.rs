//! DNS capture on real pods: dnsmasq in a third pod is the app's resolver; the clients are
//! `dig` (bind9-dnsutils) over UDP and TCP and glibc's resolver (`getent hosts`). With capture
//! on, a mesh name is answered by the sidecar's DNS proxy (dnsmasq does not know it), other
//! names by the resolver, and every reply comes from the resolver's address; a pod without
//! capture is untouched; the resolver down gives SERVFAIL in bounded time.
//!
//! Both modes share the fixture and the checks: iptables mode (istio-iptables' DNS rules) and
//! eBPF mode (cgroup sendmsg/recvmsg for UDP, connect4/6 for TCP and connected UDP sockets).

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
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
            interceptor_lab::bench::peers::dnsmasq(&[pod.ip.into(), pod.ip6.into()])
                .arg(format!("--address=/upstream.test/{UPSTREAM_IP}")),
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
        &[&[at.as_str(), "+tries=1", "+time=10"], args].concat(),
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
                 cluster.local\noptions ndots:5 timeout:5 attempts:1\n"
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
  upstream_timeout: 3s
  services:
    - name: reviews.default
      addresses: [198.18.77.7, \"fd00:198:18::77\"]
";

/// The pods, the resolver and the sidecar both modes test with.
struct Fixture {
    h: Harness,
    client: LabPod,
    resolver: LabPod,
    bystander: LabPod,
    r4: String,
    r6: String,
    files: Vec<PathBuf>,
}

impl Fixture {
    /// Three pods, dnsmasq answering in `dns`; `agent` starts the datapath before the sidecar.
    fn new(tag: &str, agent: bool) -> Self {
        let mut h = Harness::new(tag);
        let client = h.pod("client");
        let resolver = h.pod("dns");
        let bystander = h.pod("other");
        if agent {
            h.start_agent(&[]);
        }
        start_resolver(&mut h, &resolver);
        let (r4, r6) = (resolver.ip.to_string(), resolver.ip6.to_string());
        wait_until(Duration::from_secs(30), || {
            dig(&bystander, &r4, &["+short", "upstream.test"]).trim() == UPSTREAM_IP
        });
        Self {
            h,
            client,
            resolver,
            bystander,
            r4,
            r6,
            files: Vec::new(),
        }
    }

    /// The sidecar in the client pod: its UDP upstream is the pod's resolv.conf nameserver, as
    /// Istio's agent.
    fn sidecar(&mut self) {
        let conf = std::env::temp_dir().join(format!("{}-resolv.conf", self.client.netns));
        std::fs::write(&conf, format!("nameserver {}\n", self.r4)).expect("resolv.conf");
        let yaml = std::env::temp_dir().join(format!("{}-dns.yaml", self.client.netns));
        std::fs::write(&yaml, MESH).expect("config");
        for f in [&conf, &yaml] {
            let _ =
                std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o644));
        }
        self.h.sidecar_with(
            &self.client,
            &[
                "--config",
                &yaml.to_string_lossy(),
                "--dns-resolv-conf",
                &conf.to_string_lossy(),
            ],
        );
        self.files.extend([conf, yaml]);
    }

    /// `--dns-servers` for the resolver's two addresses.
    fn servers(&self) -> String {
        format!("{},{}", self.r4, self.r6)
    }

    /// What capture must do in either mode, with the client captured.
    fn check_captured(&mut self) {
        let _glibc = NetnsResolvConf::write(&self.client, self.resolver.ip.into());
        let (client, r4) = (&self.client, &self.r4);
        // A mesh name the resolver does not know: answered by the sidecar, over UDP and TCP,
        // v4 and v6 resolver addresses, and the reply's source is the resolver's address.
        for server in [&self.r4, &self.r6] {
            for tcp in ["+notcp", "+tcp"] {
                let out = dig(
                    client,
                    server,
                    &[tcp, "reviews.default.svc.cluster.local", "A"],
                );
                assert_eq!(status_of(&out), "NOERROR", "{server} {tcp}: {out}");
                assert!(out.contains(MESH_IP), "{server} {tcp}: {out}");
                assert_eq!(&server_of(&out), server, "reply source: {out}");
                let out = dig(client, server, &[tcp, "upstream.test", "A"]);
                assert!(
                    out.contains(UPSTREAM_IP),
                    "forwarded, {server} {tcp}: {out}"
                );
                assert_eq!(&server_of(&out), server, "reply source: {out}");
            }
        }
        let out = dig(client, r4, &["reviews.default.svc.cluster.local", "AAAA"]);
        assert!(out.contains(MESH_IP6), "{out}");
        // glibc's resolver with Kubernetes' search list finds the short name.
        let out = getent(client, "reviews");
        assert!(
            out.starts_with(MESH_IP6) || out.starts_with(MESH_IP),
            "getent: {out:?}"
        );
        let out = getent(client, "upstream.test");
        assert!(out.starts_with(UPSTREAM_IP), "getent: {out:?}");
        let local = self.h.proxy_metric(
            client,
            "interceptor_proxy_dns_queries_total{transport=\"Udp\",result=\"Local\"}",
        );
        assert!(local >= 3.0, "{local}");

        // The pod without capture asks dnsmasq itself: the mesh name does not resolve.
        let out = dig(
            &self.bystander,
            r4,
            &["reviews.default.svc.cluster.local", "A"],
        );
        assert!(!out.contains(MESH_IP), "{out}");
        assert_ne!(status_of(&out), "none", "dnsmasq answered: {out}");
    }

    /// The resolver down: SERVFAIL from the sidecar (within dig's single 5 s try, so the
    /// sidecar gave up first), for UDP and TCP; mesh names still resolve.
    fn check_resolver_down(&mut self) {
        self.h.apps.clear();
        for tcp in ["+notcp", "+tcp"] {
            let out = dig(&self.client, &self.r4, &[tcp, "down.test", "A"]);
            assert_eq!(status_of(&out), "SERVFAIL", "{tcp}: {out}");
        }
        let out = dig(
            &self.client,
            &self.r4,
            &["+short", "reviews.default.svc.cluster.local", "A"],
        );
        assert_eq!(out.trim(), MESH_IP);
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

#[test]
fn dns_capture_in_iptables_mode_answers_mesh_names_and_forwards_the_rest() {
    for backend in ["nft", "legacy"] {
        iptables_mode(backend);
    }
}

fn iptables_mode(backend: &str) {
    let mut f = Fixture::new(&format!("dns{backend}"), false);
    f.sidecar();
    let out = f.h.cli(&[
        "iptables",
        "apply",
        "--netns",
        &f.client.netns,
        "--backend",
        backend,
        "--dns-capture",
        "--dns-servers",
        &f.servers(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    f.check_captured();
    f.check_resolver_down();

    // Removal takes the DNS rules too: afterwards the app talks to the (dead) resolver itself.
    let out = f.h.cli(&["iptables", "remove", "--netns", &f.client.netns]);
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
                &f.client.netns,
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
        &f.client,
        &f.r4,
        &["+short", "reviews.default.svc.cluster.local", "A"],
    );
    assert!(!out.contains(MESH_IP), "{out}");
}

#[test]
fn dns_capture_in_ebpf_mode_answers_mesh_names_and_forwards_the_rest() {
    let mut f = Fixture::new("dnsebpf", true);
    f.sidecar();
    f.h.enable(
        &f.client,
        &[
            "--mode",
            "ebpf",
            "--dns-capture",
            "--dns-servers",
            &f.servers(),
        ],
    );
    // Shown as captured in eBPF mode.
    let pods = f.h.status()["pods"].clone();
    let pod = &pods.as_array().expect("pods")[0];
    assert_eq!(pod["mode"], "ebpf", "{pod}");
    assert_eq!(pod["spec"]["dns"]["enabled"], true, "{pod}");
    assert_eq!(f.h.status()["dns_capture_ebpf"], true);

    let before = f.h.counters();
    f.check_captured();
    let after = f.h.counters();
    for (counter, what) in [
        (
            "dns_connect_redirected",
            "dig's and glibc's connected UDP sockets",
        ),
        (
            "dns_reply_rewritten",
            "replies given the resolver's address",
        ),
        // The sidecar forwarding upstream.test to dnsmasq as UID 1337: not captured again (a
        // loop would never have answered the queries above).
        ("dns_skipped_proxy", "the proxy's own queries"),
    ] {
        assert!(after.since(&before, counter) > 0, "{counter}: {what}");
    }
    // dig +tcp: with its destination recorded, or (kernels < 5.15, dig binds its socket first)
    // without, then forwarded to the pod's resolv.conf nameserver.
    assert!(
        after.since(&before, "dns_tcp_redirected") + after.since(&before, "dns_tcp_unrecorded") > 0
    );
    // An unconnected UDP socket's sendto goes through sendmsg4/6.
    let out = f
        .client
        .run(|| sendto_query(&f.resolver.ip.into(), "reviews.default.svc.cluster.local"));
    let (from, answer) = out.expect("netns").expect("sendto query");
    assert_eq!(from.ip(), IpAddr::from(f.resolver.ip), "reply source");
    assert_eq!(from.port(), 53);
    assert!(
        answer.windows(4).any(|w| w == [198, 18, 77, 7]),
        "{answer:?}"
    );
    let out = f
        .client
        .run(|| sendto_query(&f.resolver.ip6.into(), "reviews.default.svc.cluster.local"));
    let (from, _) = out.expect("netns").expect("sendto query v6");
    assert_eq!(from.ip(), IpAddr::from(f.resolver.ip6), "reply source");
    assert!(f.h.counters().since(&after, "dns_query_redirected") >= 2);

    // Port 53 to another address is not captured without capture-all.
    let skipped = f.h.counters();
    let out = dig(
        &f.client,
        &f.bystander.ip.to_string(),
        &["+notcp", "x.test", "A"],
    );
    assert_eq!(status_of(&out), "none", "nothing listens there: {out}");
    assert!(f.h.counters().since(&skipped, "dns_skipped_not_nameserver") > 0);

    // The node (not a pod) is untouched: dnsmasq answers it without the mesh name.
    let node = f.h.lab.node_netns().to_owned();
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &node,
            "dig",
            &format!("@{}", f.r4),
            "+tries=1",
            "+time=10",
        ])
        .args(["reviews.default.svc.cluster.local", "A"])
        .stdin(Stdio::null())
        .output()
        .expect("dig on the node");
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(!out.contains(MESH_IP), "{out}");
    assert_ne!(status_of(&out), "none", "dnsmasq answered the node: {out}");

    f.check_resolver_down();

    // Disabled: the app talks to the (dead) resolver itself again.
    f.h.disable(&f.client);
    let out = dig(
        &f.client,
        &f.r4,
        &["+short", "reviews.default.svc.cluster.local", "A"],
    );
    assert!(!out.contains(MESH_IP), "{out}");
}

/// One A query with `sendto` on an unconnected UDP socket (musl- and Go-style stubs do this):
/// the reply's source address and bytes.
fn sendto_query(server: &IpAddr, name: &str) -> std::io::Result<(SocketAddr, Vec<u8>)> {
    let bind: SocketAddr = match server {
        IpAddr::V4(_) => "0.0.0.0:0".parse().expect("addr"),
        IpAddr::V6(_) => "[::]:0".parse().expect("addr"),
    };
    let sock = UdpSocket::bind(bind)?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut query = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        query.push(label.len() as u8);
        query.extend(label.as_bytes());
    }
    query.extend([0, 0, 1, 0, 1]);
    sock.send_to(&query, SocketAddr::new(*server, 53))?;
    let mut buf = vec![0; 1500];
    let (n, from) = sock.recv_from(&mut buf)?;
    buf.truncate(n);
    Ok((from, buf))
}
