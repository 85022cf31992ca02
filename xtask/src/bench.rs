//! `cargo xtask bench <what>`: benchmarks, each writing `bench/results/<what>-<timestamp>.json`
//! and `.md` with the exact command that produced them. Everything runs on loopback.
//!
//! `proxy`: keep-alive HTTP/1.1 requests/s and latency through the sidecar proxy vs direct to
//! the upstream vs haproxy (Debian package, installed here) configured as the same sidecar:
//! route by Host, add `x-request-id`, retry policy, pooled keep-alive upstream. One run of each,
//! same machine, same load generator (`interceptor-lab testapp load`, i.e. `interceptor_lab::loadgen`).
//! Also: proxy CPU per request, and memory per idle downstream connection.

#![allow(
    unsafe_code,
    reason = "kill, getrlimit/setrlimit and sysconf for the benchmark's processes"
)]

use std::{
    fmt::Write as _,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use serde_json::Value;
use xtask::{exec, is_root, output, step, workspace_root};

/// `cargo xtask bench [datapath|proxy]`: the datapath comparison when nothing is named.
#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    what: Option<Bench>,
}

#[derive(clap::Subcommand)]
pub(crate) enum Bench {
    /// Interception modes side by side on real pods: direct, iptables, ebpf, ebpf without
    /// sk_msg (the default).
    Datapath(crate::bench_datapath::DatapathOptions),
    /// The L7 sidecar proxy vs direct vs haproxy (keep-alive HTTP/1.1 on loopback).
    Proxy(ProxyOptions),
    /// DNS capture (eBPF, iptables) to the sidecar's DNS proxy vs the resolver asked directly.
    Dns(crate::bench_dns::DnsOptions),
}

#[derive(clap::Args, Clone, Serialize)]
pub(crate) struct ProxyOptions {
    /// Concurrent keep-alive connections of the load generator.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Request budget of each measured run.
    #[arg(long, default_value_t = 200_000)]
    requests: u64,
    /// Time limit of each measured run, seconds (a run stops at the budget or the limit).
    #[arg(long, default_value_t = 8.0)]
    seconds: f64,
    /// Interleaved rounds (direct, interceptor, haproxy, again…); the table shows the median
    /// of each metric, so a burst of load from another tenant skews one round, not the result.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Warm-up before each measured run, seconds.
    #[arg(long, default_value_t = 1.0)]
    warmup_seconds: f64,
    /// Requests of the one-connection latency run (per-request overhead without queueing).
    #[arg(long, default_value_t = 20_000)]
    latency_requests: u64,
    /// Idle connections opened to measure memory per connection.
    #[arg(long, default_value_t = 2000)]
    idle_connections: usize,
    /// Skip haproxy (e.g. on a machine without Debian packages).
    #[arg(long)]
    no_haproxy: bool,
}

pub(crate) fn run(args: &BenchArgs, command_line: &str) -> Result<()> {
    match &args.what {
        None => crate::bench_datapath::run(&Default::default(), command_line),
        Some(Bench::Datapath(opts)) => crate::bench_datapath::run(opts, command_line),
        Some(Bench::Proxy(opts)) => proxy(opts, command_line),
        Some(Bench::Dns(opts)) => crate::bench_dns::run(opts, command_line),
    }
}

/// A child process killed on drop (benchmarks must leave nothing running).
struct Proc {
    name: &'static str,
    child: Child,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command) -> Result<Self> {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}: `{}`", xtask::render(cmd)))?;
        Ok(Self { name, child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early ({status})", self.name);
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first so proxies drain, then make sure.
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(l.local_addr()?.port())
}

fn wait_listening(addr: SocketAddr, proc_: &mut Proc) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        proc_.check_alive()?;
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{} did not listen on {addr} in 20s", proc_.name)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Raises the open-file limit (inherited by the children) for the idle-connection test.
fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("bad stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz.max(1.0))
}

#[derive(Clone, Serialize)]
struct Row {
    name: String,
    requests_per_second: f64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    p999_us: f64,
    mean_us: f64,
    ok: u64,
    errors: u64,
    non_2xx: u64,
    /// Added latency vs direct at p50 / mean (µs).
    overhead_p50_us: Option<f64>,
    overhead_mean_us: Option<f64>,
    /// CPU the proxy process used per request (µs).
    proxy_cpu_us_per_request: Option<f64>,
    /// RSS growth per idle keep-alive downstream connection (bytes).
    memory_per_idle_connection_bytes: Option<f64>,
}

fn load(
    bin: &Path,
    target: SocketAddr,
    concurrency: usize,
    seconds: f64,
    requests: u64,
) -> Result<Value> {
    let out = output(
        Command::new(bin)
            .args(["--log-level", "warn", "testapp", "load", "--target"])
            .arg(target.to_string())
            .args(["--host", "reviews", "--path", "/"])
            .args(["--concurrency", &concurrency.to_string()])
            .args(["--requests", &requests.to_string()])
            .args(["--time-limit", &seconds.to_string()]),
    )?;
    serde_json::from_str(&out).context("parsing the load generator's JSON")
}

/// What one measured run sends.
struct Run {
    concurrency: usize,
    requests: u64,
    seconds: f64,
    warmup_seconds: f64,
}

fn measure(
    name: &str,
    bin: &Path,
    target: SocketAddr,
    proxy_pid: Option<u32>,
    run: &Run,
) -> Result<(Row, Value)> {
    step(&format!(
        "{name}: warm-up {}s, then {} requests or {}s on {} connections",
        run.warmup_seconds, run.requests, run.seconds, run.concurrency
    ));
    load(
        bin,
        target,
        run.concurrency,
        run.warmup_seconds,
        u64::MAX / 4,
    )?;
    let cpu_before = proxy_pid.map(cpu_seconds).transpose()?;
    let r = load(bin, target, run.concurrency, run.seconds, run.requests)?;
    let cpu_after = proxy_pid.map(cpu_seconds).transpose()?;
    let lat = &r["latency_us"];
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let ok = r["ok"].as_u64().unwrap_or(0);
    let responses = r["responses"].as_u64().unwrap_or(0);
    let row = Row {
        name: name.to_owned(),
        requests_per_second: f(&r["requests_per_second"]),
        p50_us: f(&lat["p50"]),
        p90_us: f(&lat["p90"]),
        p99_us: f(&lat["p99"]),
        p999_us: f(&lat["p999"]),
        mean_us: f(&lat["mean"]),
        ok,
        errors: r["errors"].as_u64().unwrap_or(0),
        non_2xx: responses - ok,
        overhead_p50_us: None,
        overhead_mean_us: None,
        proxy_cpu_us_per_request: match (cpu_before, cpu_after) {
            (Some(b), Some(a)) if responses > 0 => Some((a - b) * 1e6 / responses as f64),
            _ => None,
        },
        memory_per_idle_connection_bytes: None,
    };
    println!(
        "    {:.0} req/s  p50 {:.0} µs  p99 {:.0} µs  errors {}",
        row.requests_per_second, row.p50_us, row.p99_us, row.errors
    );
    Ok((row, r))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Each metric's median over the rounds; errors are summed.
fn median_row(rounds: &[Row]) -> Row {
    let m = |f: fn(&Row) -> f64| median(rounds.iter().map(f).collect());
    let cpu: Vec<f64> = rounds
        .iter()
        .filter_map(|r| r.proxy_cpu_us_per_request)
        .collect();
    Row {
        name: rounds.first().map(|r| r.name.clone()).unwrap_or_default(),
        requests_per_second: m(|r| r.requests_per_second),
        p50_us: m(|r| r.p50_us),
        p90_us: m(|r| r.p90_us),
        p99_us: m(|r| r.p99_us),
        p999_us: m(|r| r.p999_us),
        mean_us: m(|r| r.mean_us),
        ok: rounds.iter().map(|r| r.ok).sum(),
        errors: rounds.iter().map(|r| r.errors).sum(),
        non_2xx: rounds.iter().map(|r| r.non_2xx).sum(),
        overhead_p50_us: None,
        overhead_mean_us: None,
        proxy_cpu_us_per_request: (!cpu.is_empty()).then(|| median(cpu)),
        memory_per_idle_connection_bytes: None,
    }
}

/// Opens `n` keep-alive connections through the proxy, one request each, keeps them idle and
/// returns the proxy's RSS growth per connection (bytes).
fn memory_per_idle_connection(target: SocketAddr, pid: u32, n: usize) -> Result<f64> {
    // Settle the allocator with a few connections first.
    let mut warm = Vec::new();
    for _ in 0..16 {
        warm.push(idle_connection(target)?);
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = rss_kib(pid)?;
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(idle_connection(target)?);
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kib(pid)?;
    drop(conns);
    drop(warm);
    Ok((after.saturating_sub(before) as f64 * 1024.0) / n as f64)
}

fn idle_connection(target: SocketAddr) -> Result<TcpStream> {
    let mut s = TcpStream::connect(target)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")?;
    let mut reader = BufReader::new(s.try_clone()?);
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            bail!("connection closed before the response ended");
        }
        if line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    Ok(s)
}

fn interceptor_config(upstream: SocketAddr) -> String {
    format!(
        r#"# Written by `cargo xtask bench proxy`.
clusters:
  - name: outbound|9080||reviews.default.svc.cluster.local
    endpoints: ["{upstream}"]
outbound:
  listeners:
    - port: 9080
      virtual_hosts:
        - name: reviews
          services: [reviews.default.svc.cluster.local]
          routes:
            - route: {{cluster: "outbound|9080||reviews.default.svc.cluster.local"}}
"#
    )
}

fn haproxy_config(listen: SocketAddr, upstream: SocketAddr) -> String {
    format!(
        r#"# Written by `cargo xtask bench proxy`: haproxy as the same sidecar.
global
    maxconn 9000
    log stderr format raw local0 emerg

defaults
    mode http
    timeout connect 10s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
    http-reuse always

frontend sidecar_outbound_9080
    bind {listen}
    unique-id-format %[uuid()]
    http-request set-header x-request-id %[unique-id] unless {{ req.hdr(x-request-id) -m found }}
    http-request set-header x-envoy-attempt-count 1
    acl reviews hdr(host) -i reviews reviews:9080 reviews.default reviews.default:9080 reviews.default.svc reviews.default.svc:9080 reviews.default.svc.cluster reviews.default.svc.cluster:9080 reviews.default.svc.cluster.local reviews.default.svc.cluster.local:9080
    use_backend reviews if reviews
    default_backend passthrough

backend reviews
    retry-on conn-failure empty-response 503
    retries 2
    option redispatch
    server reviews1 {upstream}

backend passthrough
    server orig {upstream}
"#
    )
}

fn proxy(opts: &ProxyOptions, command_line: &str) -> Result<()> {
    if !opts.no_haproxy {
        let missing = crate::setup::missing_packages(&["haproxy"])?;
        if !missing.is_empty() {
            if !is_root() {
                bail!(
                    "haproxy is not installed: run as root (installs the Debian package) or pass --no-haproxy"
                );
            }
            crate::setup::install_packages(&missing)?;
        }
    }
    step("building interceptor (release)");
    exec(xtask::cargo().args([
        "build",
        "--release",
        "--package",
        "interceptor",
        "--package",
        "interceptor-lab",
    ]))?;
    // The lab binary: test apps, and the product's proxy with a fixed original destination.
    let bin = target_dir().join("release/interceptor-lab");
    raise_nofile();
    let dir = workspace_root().join("bench/results");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let scratch = std::env::temp_dir().join(format!("interceptor-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let _cleanup = Cleanup(scratch.clone());

    let upstream = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let mut upstream_proc = Proc::spawn(
        "upstream",
        Command::new(&bin)
            .args(["--log-level", "warn", "testapp", "http-server", "--listen"])
            .arg(upstream.to_string())
            .args(["--name", "reviews"])
            .stdout(Stdio::null()),
    )?;
    wait_listening(upstream, &mut upstream_proc)?;

    // interceptor as the outbound sidecar: the original destination is fixed (no interception
    // on the host), so the same routing path runs minus one getsockopt.
    let config_path = scratch.join("interceptor.yaml");
    std::fs::write(&config_path, interceptor_config(upstream))?;
    let ports: Vec<u16> = (0..5).map(|_| free_port()).collect::<Result<_>>()?;
    let listen = |p: u16| format!("127.0.0.1:{p}");
    let outbound = SocketAddr::from(([127, 0, 0, 1], ports[0]));
    let mut icpt = Proc::spawn(
        "interceptor proxy",
        Command::new(&bin)
            .args([
                "--log-level",
                "warn",
                "proxy",
                "--fixed-dst",
                "127.0.0.1:9080",
                "--no-drop-privileges",
                "--config",
            ])
            .arg(&config_path)
            .args(["--outbound", &listen(ports[0]), "--outbound-v6", "none"])
            .args([
                "--inbound",
                &listen(ports[1]),
                "--metrics",
                &listen(ports[2]),
            ])
            .args(["--health", &listen(ports[3]), "--admin", &listen(ports[4])])
            .stdout(Stdio::null()),
    )?;
    wait_listening(outbound, &mut icpt)?;

    let mut haproxy_version = None;
    let mut ha = None;
    if !opts.no_haproxy {
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let cfg = scratch.join("haproxy.cfg");
        std::fs::write(&cfg, haproxy_config(listen, upstream))?;
        haproxy_version = output(Command::new("haproxy").arg("-v"))
            .ok()
            .and_then(|v| v.lines().next().map(str::to_owned));
        let mut p = Proc::spawn(
            "haproxy",
            Command::new("haproxy")
                .args(["-db", "-f"])
                .arg(&cfg)
                .stdout(Stdio::null()),
        )?;
        wait_listening(listen, &mut p)?;
        ha = Some((p, listen));
    }

    let mut targets: Vec<(&str, SocketAddr, Option<u32>)> = vec![
        ("direct (no proxy)", upstream, None),
        ("interceptor proxy", outbound, Some(icpt.pid())),
    ];
    if let Some((p, addr)) = &ha {
        targets.push(("haproxy", *addr, Some(p.pid())));
    }
    let loaded = Run {
        concurrency: opts.concurrency,
        requests: opts.requests,
        seconds: opts.seconds,
        warmup_seconds: opts.warmup_seconds,
    };
    let single = Run {
        concurrency: 1,
        requests: opts.latency_requests,
        seconds: opts.seconds,
        warmup_seconds: opts.warmup_seconds.min(0.5),
    };
    let mut rounds: Vec<Vec<Row>> = vec![Vec::new(); targets.len()];
    let mut latency_rounds: Vec<Vec<Row>> = vec![Vec::new(); targets.len()];
    let mut raw: Vec<Vec<Value>> = vec![Vec::new(); targets.len()];
    for round in 1..=opts.rounds.max(1) {
        for (i, (name, addr, pid)) in targets.iter().enumerate() {
            let label = format!("round {round}: {name}");
            let (row, r) = measure(&label, &bin, *addr, *pid, &loaded)?;
            rounds[i].push(Row {
                name: (*name).to_owned(),
                ..row
            });
            raw[i].push(r);
            let (row, r) = measure(&label, &bin, *addr, *pid, &single)?;
            latency_rounds[i].push(Row {
                name: (*name).to_owned(),
                ..row
            });
            raw[i].push(r);
        }
    }
    let mut rows: Vec<Row> = rounds.iter().map(|r| median_row(r)).collect();
    let mut latency_rows: Vec<Row> = latency_rounds.iter().map(|r| median_row(r)).collect();

    step("interceptor proxy: memory per idle connection");
    rows[1].memory_per_idle_connection_bytes = Some(memory_per_idle_connection(
        outbound,
        icpt.pid(),
        opts.idle_connections,
    )?);
    drop(icpt);
    if let Some((p, addr)) = &ha {
        step("haproxy: memory per idle connection");
        rows[2].memory_per_idle_connection_bytes = Some(memory_per_idle_connection(
            *addr,
            p.pid(),
            opts.idle_connections,
        )?);
    }
    drop(ha);
    drop(upstream_proc);
    let raw: serde_json::Map<String, Value> = targets
        .iter()
        .zip(raw)
        .map(|((name, ..), runs)| ((*name).to_owned(), Value::Array(runs)))
        .collect();
    let all_rounds: Vec<&Row> = rounds.iter().flatten().collect();

    for table in [&mut rows, &mut latency_rows] {
        let (base_p50, base_mean) = (table[0].p50_us, table[0].mean_us);
        for row in table.iter_mut().skip(1) {
            row.overhead_p50_us = Some(row.p50_us - base_p50);
            row.overhead_mean_us = Some(row.mean_us - base_mean);
        }
    }

    let stamp = output(Command::new("date").args(["-u", "+%Y%m%dT%H%M%SZ"]))?
        .trim()
        .to_owned();
    let machine = Machine::collect(haproxy_version);
    let report = serde_json::json!({
        "bench": "proxy",
        "command": command_line,
        "timestamp": stamp,
        "machine": machine,
        "options": opts,
        "results": rows,
        "latency_one_connection": latency_rows,
        "rounds": all_rounds,
        "raw": raw,
    });
    let json_path = dir.join(format!("proxy-{stamp}.json"));
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)? + "\n")?;
    let md = markdown(
        command_line,
        &stamp,
        &machine,
        opts,
        &rows,
        &latency_rows,
        &rounds,
    );
    let md_path = dir.join(format!("proxy-{stamp}.md"));
    std::fs::write(&md_path, &md)?;
    println!("\n{md}");
    println!("wrote {} and {}", json_path.display(), md_path.display());
    Ok(())
}

struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Serialize)]
struct Machine {
    cpus: usize,
    kernel: String,
    cpu_model: String,
    haproxy: Option<String>,
}

impl Machine {
    fn collect(haproxy: Option<String>) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: output(Command::new("uname").arg("-r"))
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
                .unwrap_or_default(),
            haproxy,
        }
    }
}

fn markdown(
    command: &str,
    stamp: &str,
    machine: &Machine,
    opts: &ProxyOptions,
    rows: &[Row],
    latency_rows: &[Row],
    rounds: &[Vec<Row>],
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Proxy benchmark {stamp}\n");
    let _ = writeln!(md, "Command: `{command}`\n");
    let _ = writeln!(
        md,
        "Machine: {} CPUs ({}), kernel {}{}. Load generator, proxy and upstream share the \
         machine; all traffic on 127.0.0.1. Keep-alive HTTP/1.1, {} connections, each run {} \
         requests or {} s after {} s of warm-up; {} interleaved rounds, medians shown.\n",
        machine.cpus,
        machine.cpu_model,
        machine.kernel,
        machine
            .haproxy
            .as_deref()
            .map(|h| format!(", {h}"))
            .unwrap_or_default(),
        opts.concurrency,
        opts.requests,
        opts.seconds,
        opts.warmup_seconds,
        opts.rounds
    );
    let _ = writeln!(
        md,
        "| path | req/s | p50 µs | p90 µs | p99 µs | p99.9 µs | added p50 µs | added mean µs | proxy CPU µs/req | memory/idle conn | errors |"
    );
    let _ = writeln!(
        md,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let opt =
        |v: Option<f64>, digits: usize| v.map_or("–".to_owned(), |v| format!("{v:.digits$}"));
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} | {} |",
            r.name,
            r.requests_per_second,
            r.p50_us,
            r.p90_us,
            r.p99_us,
            r.p999_us,
            opt(r.overhead_p50_us, 0),
            opt(r.overhead_mean_us, 0),
            opt(r.proxy_cpu_us_per_request, 1),
            r.memory_per_idle_connection_bytes
                .map_or("–".to_owned(), |b| format!("{:.1} KiB", b / 1024.0)),
            r.errors + r.non_2xx
        );
    }
    let _ = writeln!(
        md,
        "\nPer-request overhead without queueing: one connection, {} requests per round.\n",
        opts.latency_requests
    );
    let _ = writeln!(
        md,
        "| path | req/s | p50 µs | p90 µs | p99 µs | added p50 µs | added mean µs | proxy CPU µs/req |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in latency_rows {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} |",
            r.name,
            r.requests_per_second,
            r.p50_us,
            r.p90_us,
            r.p99_us,
            opt(r.overhead_p50_us, 1),
            opt(r.overhead_mean_us, 1),
            opt(r.proxy_cpu_us_per_request, 1),
        );
    }
    let _ = writeln!(
        md,
        "\nEvery {}-connection round (req/s · p50 µs · proxy CPU µs/req):\n",
        opts.concurrency
    );
    for path in rounds {
        let runs: Vec<String> = path
            .iter()
            .map(|r| {
                format!(
                    "{:.0} · {:.0} · {}",
                    r.requests_per_second,
                    r.p50_us,
                    opt(r.proxy_cpu_us_per_request, 1)
                )
            })
            .collect();
        if let Some(first) = path.first() {
            let _ = writeln!(md, "- {}: {}", first.name, runs.join(" | "));
        }
    }
    md
}
