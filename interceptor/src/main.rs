use std::{io::IsTerminal as _, process::ExitCode};

use anyhow::{Context as _, Result, bail};
use clap::Parser as _;
use interceptor::{
    agent::{self, AgentOptions},
    app::Bound,
    bench,
    bpf::{LoadOptions, Maps, Pins},
    cli::{self, Cli, Command, IptablesCommand, ModeArg, NetnsTarget, PodCommand, TestappCommand},
    demo, iptables,
    kube::KubeOptions,
    loadgen,
    netns::Netns,
    pods::{self, Mode, PodRef, PodSource, Registry},
    privileges,
    proxy::ProxyConfig,
    signal, status, telemetry, testapp,
};
use interceptor_common::config::{CONFIG_MSG_REDIRECT, GlobalConfig};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    // The demo and the benchmark narrate on their own: routine info lines (theirs and their
    // children's, which read INTERCEPTOR_LOG) would bury that, unless a level was asked for.
    let narrated = matches!(cli.command, Command::Demo(_) | Command::Bench(_));
    if narrated && std::env::var_os("INTERCEPTOR_LOG").is_none() && cli.log_level == "info" {
        cli.log_level = "warn".into();
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("INTERCEPTOR_LOG", "warn") };
    }
    telemetry::init(&cli.log_level, cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

fn run(cli: Cli) -> Result<()> {
    let pins = Pins::new(&cli.pin_root);
    match cli.command {
        Command::Agent(args) => {
            // Checked before anything is loaded: a misconfigured DaemonSet fails fast.
            let kube = match (args.kube, args.node_name.clone()) {
                (false, _) => None,
                (true, Some(node_name)) if !node_name.is_empty() => Some(KubeOptions {
                    kubeconfig: args.kubeconfig.clone(),
                    node_name,
                    // The host's: the DaemonSet runs with hostPID, and the registry's own
                    // lookups (gone pods, listeners) read /proc too.
                    proc_root: "/proc".into(),
                    dns_capture: args.dns_capture,
                }),
                (true, _) => return Err(interceptor::kube::Error::NoNodeName.into()),
            };
            let (cgroup, features) = agent::preflight(args.cgroup.as_deref())?;
            let mut config = GlobalConfig::istio_defaults();
            config.outbound_port = args.outbound_port.into();
            config.inbound_port = args.inbound_port.into();
            if args.no_msg_redirect {
                config.flags &= !CONFIG_MSG_REDIRECT;
            }
            let opts = AgentOptions {
                pins,
                load: LoadOptions {
                    cgroup,
                    config,
                    bpf_log_level: args.bpf_log_level.into(),
                    replace: args.replace,
                },
                keep_pinned: args.keep_pinned,
                reconcile_every: cli::secs(args.reconcile_seconds.max(0.05)),
                kube,
                health_addr: args.health_addr,
                features: Some(features),
            };
            runtime()?.block_on(agent::run(opts, signal::shutdown()))?;
            Ok(())
        }
        Command::Proxy(args) => {
            if let Some(path) = &args.check_config {
                let config = interceptor::proxy::config::Config::load(path)?;
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&config)?);
                } else {
                    println!(
                        "{}: valid ({} clusters, {} outbound listeners, {} virtual hosts)",
                        path.display(),
                        config.clusters.len(),
                        config.outbound.listeners.len(),
                        config
                            .outbound
                            .listeners
                            .iter()
                            .map(|l| l.virtual_hosts.len())
                            .sum::<usize>()
                    );
                }
                return Ok(());
            }
            let config = ProxyConfig {
                outbound: args.outbound,
                outbound_v6: match args.outbound_v6.as_str() {
                    "none" | "" => None,
                    s => Some(s.parse().context("--outbound-v6")?),
                },
                inbound: args.inbound,
                metrics: args.metrics,
                health: args.health,
                admin: args.admin,
                config_file: args.config.clone(),
                config_poll: cli::secs(args.config_poll_seconds),
                workers: args
                    .workers
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
                connect_timeout: cli::secs(args.connect_timeout),
                drain_timeout: cli::secs(args.drain_timeout),
                dns: interceptor::proxy::dns::DnsSettings {
                    listen: cli::optional_addr("--dns", &args.dns)?,
                    listen_v6: cli::optional_addr("--dns-v6", &args.dns_v6)?,
                    resolv_conf: args.dns_resolv_conf.clone(),
                    upstreams: args.dns_upstream.clone(),
                },
                ..ProxyConfig::default()
            };
            // Fail before dropping privileges, with the file's line and field.
            if let Some(path) = &config.config_file {
                interceptor::proxy::config::Config::load(path)?;
            }
            // Before any thread exists: every thread must run as the proxy identity.
            if !args.no_drop_privileges && privileges::drop_to(args.uid, args.gid)? {
                tracing::info!(
                    uid = args.uid,
                    gid = args.gid,
                    "running as the proxy identity"
                );
            }
            // The control plane (admin, metrics, reload, signals) is light: one thread. The
            // data plane runs on its own worker threads (see `app.rs`).
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            rt.block_on(async {
                let bound = Bound::bind(config)?;
                bound.run(signal::shutdown()).await;
                Ok::<_, anyhow::Error>(())
            })
        }
        Command::Pod(cmd) => pod(&pins, cmd),
        Command::Status { json } => {
            let status = status::Status::collect(&pins)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status.render());
            }
            Ok(())
        }
        Command::Iptables(cmd) => iptables_command(cmd),
        Command::Demo(args) => {
            let color = std::io::stdout().is_terminal();
            runtime()?.block_on(demo::run(args, color))
        }
        Command::Testapp(cmd) => testapp_command(cmd),
        Command::Bench(args) => {
            let report = bench::run(&args)?;
            let paths = report.write(&args.out)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{}", report.markdown());
            }
            for path in paths {
                eprintln!("wrote {}", path.display());
            }
            Ok(())
        }
    }
}

fn pod(pins: &Pins, cmd: PodCommand) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("`interceptor pod` writes the datapath's maps: run it as root");
    }
    let mut maps = Maps::open(pins)?;
    match cmd {
        PodCommand::Enable(args) => {
            let mut spec = args.switches.spec()?;
            spec.dns
                .fill_nameservers(&pods::spec::pod_resolv_conf(
                    args.target.netns.as_deref(),
                    args.target.pid,
                ))
                .map_err(anyhow::Error::msg)?;
            let mode = match args.mode {
                ModeArg::Ebpf => Mode::Ebpf,
                ModeArg::Iptables => Mode::Iptables(args.backend),
                ModeArg::Auto => Mode::Auto(args.backend),
            };
            let (netns, source) = match (&args.target.netns, args.target.pid) {
                (Some(name), _) => (Netns::by_name(name)?, PodSource::Netns(name.clone())),
                (None, Some(pid)) => (Netns::by_pid(pid)?, PodSource::Pid(pid)),
                (None, None) => bail!("name the pod with --netns or --pid"),
            };
            let entry =
                Registry::lock(pins, &mut maps)?.enable_with(&netns, &source, &spec, mode)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&entry)?);
            } else {
                let addrs: Vec<String> = entry.addresses.iter().map(ToString::to_string).collect();
                println!(
                    "enabled pod {} (id {}, {}, {}): outbound {}, inbound {}",
                    entry.name,
                    entry.id,
                    match entry.backend {
                        Some(b) => format!("iptables mode, {b} backend"),
                        None => "ebpf mode".into(),
                    },
                    if addrs.is_empty() {
                        "no address".into()
                    } else {
                        addrs.join(", ")
                    },
                    if entry.outbound { "on" } else { "off" },
                    match (entry.inbound, entry.inbound_ready) {
                        (false, _) => "off",
                        (true, true) => "on",
                        (true, false) => "on (waiting for the proxy's 15006 listener)",
                    }
                );
            }
        }
        PodCommand::Disable(sel) => {
            let pod = match (sel.netns, sel.pid, sel.id, sel.name) {
                (Some(n), ..) => PodRef::Netns(n),
                (_, Some(p), ..) => PodRef::Pid(p),
                (_, _, Some(i), _) => PodRef::Id(i),
                (_, _, _, Some(n)) => PodRef::Name(n),
                _ => bail!("name the pod with --netns, --pid, --id or --name"),
            };
            let entry = Registry::lock(pins, &mut maps)?.disable(&pod)?;
            println!("disabled pod {} (id {})", entry.name, entry.id);
        }
        PodCommand::List { json } => {
            let pods = pods::list(pins, &maps)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&pods)?);
            } else if pods.is_empty() {
                println!("no pods enabled");
            } else {
                println!(
                    "{:>3}  {:<28} {:<9} {:<34} {:<4} {:<4} IN",
                    "ID", "NAME", "MODE", "ADDRESSES", "OUT", "DNS"
                );
                for p in pods {
                    let addrs: Vec<String> = p.addresses.iter().map(ToString::to_string).collect();
                    println!(
                        "{:>3}  {:<28} {:<9} {:<34} {:<4} {:<4} {}",
                        p.id,
                        p.name,
                        p.mode,
                        addrs.join(","),
                        if p.outbound { "on" } else { "off" },
                        p.spec.dns.label(),
                        match (p.inbound, p.inbound_ready) {
                            (false, _) => "off",
                            (true, true) => "on",
                            (true, false) => "waiting for proxy",
                        }
                    );
                }
            }
        }
    }
    Ok(())
}

fn netns_of(target: &NetnsTarget) -> Result<Netns> {
    Ok(match (&target.netns, target.pid) {
        (Some(name), _) => Netns::by_name(name)?,
        (None, Some(pid)) => Netns::by_pid(pid)?,
        (None, None) => bail!("name the network namespace with --netns or --pid"),
    })
}

/// `interceptor iptables apply|remove`: istio-iptables' job, without the agent.
fn iptables_command(cmd: IptablesCommand) -> Result<()> {
    match cmd {
        IptablesCommand::Apply(args) => {
            let mut spec = args.switches.spec()?;
            spec.dns
                .fill_nameservers(&pods::spec::pod_resolv_conf(
                    args.target.netns.as_deref(),
                    args.target.pid,
                ))
                .map_err(anyhow::Error::msg)?;
            let settings = iptables::Settings {
                outbound_port: args.outbound_port,
                inbound_port: args.inbound_port,
                ..iptables::Settings::default()
            };
            if args.dry_run {
                for family in [iptables::Family::V4, iptables::Family::V6] {
                    print!(
                        "{}",
                        iptables::RuleSet::new(&spec, &settings, family).save_format()
                    );
                }
                return Ok(());
            }
            if !nix::unistd::geteuid().is_root() {
                bail!("writing iptables rules into a network namespace needs root");
            }
            let netns = netns_of(&args.target)?;
            let backend = iptables::resolve(&netns, args.backend);
            let applied = iptables::apply(&netns, &spec, &settings, backend)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&applied)?);
            } else {
                println!(
                    "applied {} rules in {} ({} backend, {})",
                    applied.rules,
                    netns.path().display(),
                    applied.backend,
                    applied
                        .families
                        .iter()
                        .map(|f| match f {
                            iptables::Family::V4 => "iptables",
                            iptables::Family::V6 => "ip6tables",
                        })
                        .collect::<Vec<_>>()
                        .join(" + ")
                );
            }
        }
        IptablesCommand::Remove(args) => {
            if !nix::unistd::geteuid().is_root() {
                bail!("removing iptables rules from a network namespace needs root");
            }
            let netns = netns_of(&args.target)?;
            let backend = iptables::resolve(&netns, args.backend);
            let removed = iptables::remove(&netns, backend)?;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({ "backend": backend, "removed": removed })
                );
            } else if removed == 0 {
                println!(
                    "no Istio chains in {} ({backend} backend)",
                    netns.path().display()
                );
            } else {
                println!(
                    "removed {removed} rules from {} ({backend} backend)",
                    netns.path().display()
                );
            }
        }
    }
    Ok(())
}

fn testapp_command(cmd: TestappCommand) -> Result<()> {
    match cmd {
        TestappCommand::HttpServer { listen, name } => {
            runtime()?.block_on(testapp::http_server(listen, name))?;
        }
        TestappCommand::Load(args) => {
            let spec = loadgen::LoadSpec::new(
                args.target,
                &args.host,
                &args.path,
                args.concurrency,
                args.requests,
                cli::secs(args.time_limit),
                match args.mode {
                    cli::LoadMode::KeepAlive => loadgen::Mode::KeepAlive,
                    cli::LoadMode::ConnectionPerRequest => loadgen::Mode::ConnectionPerRequest,
                },
            );
            let result = runtime()?.block_on(loadgen::run(spec));
            println!("{}", serde_json::to_string_pretty(&result)?);
        }
        TestappCommand::Sink { listen } => {
            runtime()?.block_on(testapp::stream::sink(listen))?;
        }
        TestappCommand::Stream {
            to,
            message_size,
            bytes,
            time_limit,
        } => {
            let result = runtime()?.block_on(testapp::stream::stream(
                to,
                message_size,
                bytes,
                cli::secs(time_limit),
            ))?;
            println!("{}", serde_json::to_string(&result)?);
        }
    }
    Ok(())
}
