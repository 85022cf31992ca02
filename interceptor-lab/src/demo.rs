//! `interceptor demo`: two pods on real network namespaces, the real agent and sidecars, and a
//! client request followed through every stage. Leaves nothing behind.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use interceptor::{
    bpf::{Maps, Pins, features::Features},
    registry::{PodSource, Registry, spec::PodSpec},
};

use crate::{
    bins,
    lab::{self, Lab, LabPod, Managed},
    testapp,
};

/// `interceptor-lab demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Requests the client pod sends.
    #[arg(long, default_value_t = 5)]
    pub requests: u32,
    /// Machine-readable summary on stdout.
    #[arg(long)]
    pub json: bool,
}

const APP_PORT: u16 = 8080;

struct Style {
    color: bool,
}

impl Style {
    fn step(&self, n: u32, total: u32, text: &str) {
        if self.color {
            println!("\n\x1b[1;36m[{n}/{total}]\x1b[0m \x1b[1m{text}\x1b[0m");
        } else {
            println!("\n[{n}/{total}] {text}");
        }
    }
}

#[derive(Serialize)]
struct Summary {
    requests: u32,
    ok: u32,
    counters: BTreeMap<&'static str, u64>,
    client_sidecar_outbound_connections: f64,
    server_sidecar_inbound_connections: f64,
    /// HTTP requests each sidecar routed (the L7 proxy pools upstream connections, so
    /// requests, not connections, match one to one across the sidecars).
    client_sidecar_outbound_requests: f64,
    server_sidecar_inbound_requests: f64,
}

/// Counters the demo explains, in the order a request meets them.
const STAGES: &[(&str, &str)] = &[
    (
        "connect_redirected",
        "client app's connect rewritten to its sidecar (127.0.0.1:15001)",
    ),
    (
        "sockhash_insert",
        "app and sidecar sockets added to the sockhash by sockops",
    ),
    (
        "orig_dst_answered",
        "client sidecar's SO_ORIGINAL_DST answered from the map",
    ),
    (
        "connect_skipped_proxy",
        "sidecars' own upstream connects left alone (UID 1337)",
    ),
    (
        "inbound_assigned",
        "server pod: sk_lookup handed the connection to its sidecar's 15006",
    ),
    (
        "orig_dst_local",
        "server sidecar's SO_ORIGINAL_DST = the pod address it was sent to",
    ),
    (
        "connect_passthrough",
        "server sidecar → app from 127.0.0.6 (kept out of capture)",
    ),
    (
        "msg_redirected",
        "messages moved socket-to-socket by sk_msg, skipping TCP/IP",
    ),
    (
        "msg_redirect_failed",
        "messages that fell back to TCP (peer not yet in the sockhash)",
    ),
];

pub async fn run(args: DemoArgs, color: bool) -> Result<()> {
    tokio::task::spawn_blocking(move || demo(&args, color))
        .await
        .context("demo thread")?
}

fn demo(args: &DemoArgs, color: bool) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo creates network namespaces and loads eBPF programs: run it as root");
    }
    let style = Style { color };
    let total = 6;
    let exe = bins::product()?;
    let lab_exe = bins::lab()?;
    let swept = lab::sweep_stale();
    if swept > 0 {
        println!("(removed {swept} namespaces left by an earlier crashed run)");
    }

    style.step(1, total, "Kernel");
    let features = Features::probe();
    println!(
        "  kernel {}  cgroup v2 at {}",
        features.kernel,
        features
            .cgroup2
            .as_deref()
            .map_or("(none)".into(), |p| p.display().to_string())
    );
    let missing = features.missing_for_outbound();
    if !missing.is_empty() {
        bail!(
            "this kernel lacks {}: see `interceptor status`",
            missing.join(", ")
        );
    }
    println!(
        "  sockhash + sk_msg redirect: yes   sk_lookup (inbound): {}",
        if features.inbound() {
            "yes"
        } else {
            "no — inbound stays direct"
        }
    );

    style.step(
        2,
        total,
        "Pods: network namespaces joined by a bridge, each with a cgroup",
    );
    let mut lab = Lab::create("demo")?;
    let client = lab.add_pod("client")?;
    let server = lab.add_pod("server")?;
    for pod in [&client, &server] {
        println!(
            "  {:<7} {:<15} {}  (netns {})",
            pod.name, pod.ip, pod.ip6, pod.netns
        );
    }

    style.step(
        3,
        total,
        "Agent: load the eBPF programs and attach them at the cgroup v2 root",
    );
    // Named like the lab, so a crashed demo's pins are swept with its namespaces.
    let pin_root = format!("/sys/fs/bpf/{}", lab.name);
    let pins = Pins::new(&pin_root);
    let mut agent = Managed::new(
        "agent",
        Command::new(&exe)
            .args([
                "--pin-root",
                &pin_root,
                "agent",
                "--reconcile-seconds",
                "0.2",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the agent")?,
    );
    agent.wait_for_line("agent ready", Duration::from_secs(60))?;
    println!(
        "  interceptor --pin-root {pin_root} agent   (pid {})",
        agent.pid().unwrap_or(0)
    );

    style.step(4, total, "App and sidecars");
    let app_addr = SocketAddr::from((server.ip, APP_PORT));
    let mut app = Managed::new(
        "server app",
        server.spawn(
            Command::new(&lab_exe)
                .args([
                    "testapp",
                    "http-server",
                    "--listen",
                    &app_addr.to_string(),
                    "--name",
                    "server-app",
                ])
                .stdout(Stdio::piped()),
        )?,
    );
    app.wait_for_line("listening", Duration::from_secs(20))?;
    println!("  server pod: HTTP app on {app_addr} (its pod IP only)");
    let mut sidecars = Vec::new();
    for pod in [&client, &server] {
        let mut proxy = Managed::new(
            format!("{} sidecar", pod.name),
            pod.spawn(Command::new(&exe).args(["proxy"]).stdout(Stdio::null()))?,
        );
        pod.wait_listening(15021, Duration::from_secs(20), Some(&mut proxy))?;
        println!(
            "  {} pod: sidecar as UID 1337: outbound 127.0.0.1:15001, inbound :15006, metrics :15090",
            pod.name
        );
        sidecars.push(proxy);
    }

    style.step(5, total, "Enable interception of both pods");
    {
        let mut maps = Maps::open(&pins)?;
        let mut registry = Registry::lock(&pins, &mut maps)?;
        for pod in [&client, &server] {
            let entry = registry.enable(
                &pod.open_netns()?,
                &PodSource::Netns(pod.netns.clone()),
                &PodSpec::default(),
            )?;
            println!(
                "  interceptor pod enable --netns {}   → pod id {}",
                pod.netns, entry.id
            );
        }
    }
    if !crate::lab::wait_inbound_ready(&pins, &server.netns, Duration::from_secs(30))? {
        bail!("the server sidecar's inbound listener was not registered in 30s");
    }
    println!("  server sidecar's 15006 listener registered for inbound steering");

    style.step(
        6,
        total,
        &format!(
            "Client pod → http://{app_addr}/  ({} requests)",
            args.requests
        ),
    );
    let before = Maps::open(&pins)?.counters()?;
    let mut ok = 0;
    for i in 1..=args.requests {
        let resp = client.run(|| testapp::http_get(app_addr, "/", Duration::from_secs(5)))?;
        match resp {
            Ok(r) => {
                let body = String::from_utf8_lossy(&r.body);
                println!("  request {i}: {} {}", r.status, body.trim());
                if r.status == 200 {
                    ok += 1;
                }
            }
            Err(err) => println!("  request {i}: failed: {err}"),
        }
    }
    // Let sockets close so the close counters settle.
    std::thread::sleep(Duration::from_millis(200));
    let after = Maps::open(&pins)?.counters()?;
    let delta: BTreeMap<&'static str, u64> = after
        .iter()
        .map(|(k, v)| (*k, v.saturating_sub(before.get(k).copied().unwrap_or(0))))
        .collect();

    println!("\n  What the datapath did (counter increments during the requests):");
    for (name, meaning) in STAGES {
        println!(
            "    {:<22} {:>6}   {meaning}",
            name,
            delta.get(name).copied().unwrap_or(0)
        );
    }
    let client_out = metric(
        &client,
        "interceptor_proxy_connections_total{direction=\"Outbound\"}",
    );
    let server_in = metric(
        &server,
        "interceptor_proxy_connections_total{direction=\"Inbound\"}",
    );
    let client_requests = metric(
        &client,
        "interceptor_proxy_requests_total{direction=\"Outbound\",cluster=\"PassthroughCluster\",code=\"200\"}",
    );
    let server_requests = metric(
        &server,
        &format!(
            "interceptor_proxy_requests_total{{direction=\"Inbound\",cluster=\"inbound|{APP_PORT}||\",code=\"200\"}}"
        ),
    );
    println!("\n  Sidecar metrics (15090 /stats/prometheus):");
    println!("    client sidecar outbound connections  {client_out}");
    println!("    client sidecar outbound requests     {client_requests}  (HTTP, routed)");
    println!(
        "    server sidecar inbound connections   {server_in}  (the client sidecar keeps its upstream connection alive)"
    );
    println!("    server sidecar inbound requests      {server_requests}");

    println!("\nCleaning up: sidecars, app, agent (detaches and unpins), namespaces, cgroups.");
    drop(sidecars);
    drop(app);
    agent.stop(Duration::from_secs(20));
    let leftover = Path::new(&pin_root).exists();
    drop(lab);
    if leftover {
        bail!("the agent left {pin_root} pinned");
    }
    if args.json {
        let summary = Summary {
            requests: args.requests,
            ok,
            counters: delta,
            client_sidecar_outbound_connections: client_out,
            server_sidecar_inbound_connections: server_in,
            client_sidecar_outbound_requests: client_requests,
            server_sidecar_inbound_requests: server_requests,
        };
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    if ok != args.requests {
        bail!(
            "{} of {} requests failed",
            args.requests - ok,
            args.requests
        );
    }
    println!(
        "Done: {ok}/{} requests went client app → client sidecar → server sidecar → server app.",
        args.requests
    );
    Ok(())
}

/// One sample of the sidecar's Prometheus text, fetched from inside its pod.
fn metric(pod: &LabPod, series: &str) -> f64 {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 15090));
    let body = pod
        .run(|| testapp::http_get(addr, "/stats/prometheus", Duration::from_secs(5)))
        .ok()
        .and_then(Result::ok)
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .unwrap_or_default();
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}
