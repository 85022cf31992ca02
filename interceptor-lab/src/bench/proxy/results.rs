//! The proxy benchmark's report: every round, medians per workload and peer (the datapath
//! bench's `Spread`), memory per idle h2 connection, the targets checked against
//! haproxy; written as JSON and Markdown, and into a README section between markers.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::{Measured, ProxyBenchArgs, Workload};
use crate::bench::report::Spread;

pub(super) const README_START: &str = "<!-- bench-proxy:start -->";
pub(super) const README_END: &str = "<!-- bench-proxy:end -->";

const OURS: &str = "interceptor proxy";
const HAPROXY: &str = "haproxy";

#[derive(Debug, Serialize)]
pub struct Round {
    pub round: usize,
    pub peer: String,
    pub workload: Workload,
    pub measured: Measured,
}

/// Medians (and spread) over rounds of one workload through one peer.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub workload: Workload,
    pub label: String,
    pub unit: &'static str,
    pub peer: String,
    pub per_second: Spread,
    pub p50_us: Spread,
    pub p99_us: Spread,
    pub proxy_cpu_us_per_op: Option<Spread>,
    pub errors: u64,
}

/// One of the targets, met or not.
#[derive(Debug, Serialize)]
pub struct Target {
    pub what: String,
    pub ours: f64,
    pub haproxy: Option<f64>,
    pub met: bool,
}

#[derive(Debug, Serialize)]
pub struct ProxyReport {
    /// The command that produced it.
    pub command: String,
    /// UTC, RFC 3339.
    pub started: String,
    pub kernel: String,
    pub cpus: usize,
    pub haproxy_version: Option<String>,
    pub options: ProxyBenchArgs,
    pub rounds: Vec<Round>,
    pub summary: Vec<Summary>,
    /// (peer, bytes of RSS per idle h2 connection).
    pub idle_h2: Vec<(String, f64)>,
    pub targets: Vec<Target>,
    /// Runs that could not be measured, and why.
    pub failures: Vec<String>,
}

impl ProxyReport {
    pub(super) fn new(args: &ProxyBenchArgs) -> Self {
        Self {
            command: std::env::var("INTERCEPTOR_BENCH_COMMAND")
                .unwrap_or_else(|_| std::env::args().collect::<Vec<_>>().join(" ")),
            started: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            kernel: interceptor::bpf::features::kernel_release(),
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            haproxy_version: None,
            options: args.clone(),
            rounds: Vec::new(),
            summary: Vec::new(),
            idle_h2: Vec::new(),
            targets: Vec::new(),
            failures: Vec::new(),
        }
    }

    /// Medians and targets from the rounds.
    pub(super) fn finish(&mut self, args: &ProxyBenchArgs) {
        let mut peers: Vec<String> = Vec::new();
        for r in &self.rounds {
            if !peers.contains(&r.peer) {
                peers.push(r.peer.clone());
            }
        }
        for workload in Workload::ALL {
            for peer in &peers {
                let runs: Vec<&Measured> = self
                    .rounds
                    .iter()
                    .filter(|r| r.workload == workload && &r.peer == peer)
                    .map(|r| &r.measured)
                    .collect();
                let spread = |f: fn(&Measured) -> f64| {
                    Spread::of(&runs.iter().map(|m| f(m)).collect::<Vec<_>>())
                };
                let (Some(per_second), Some(p50_us), Some(p99_us)) = (
                    spread(|m| m.per_second),
                    spread(|m| m.latency_us.p50),
                    spread(|m| m.latency_us.p99),
                ) else {
                    continue;
                };
                let cpu: Vec<f64> = runs.iter().filter_map(|m| m.proxy_cpu_us_per_op).collect();
                self.summary.push(Summary {
                    workload,
                    label: workload.label(args),
                    unit: workload.unit(),
                    peer: peer.clone(),
                    per_second,
                    p50_us,
                    p99_us,
                    proxy_cpu_us_per_op: Spread::of(&cpu),
                    errors: runs.iter().map(|m| m.errors).sum(),
                });
            }
        }
        let find = |w: Workload, peer: &str| {
            self.summary
                .iter()
                .find(|s| s.workload == w && s.peer == peer)
        };
        let mut targets = Vec::new();
        for w in [Workload::GrpcOneConnection, Workload::GrpcFourConnections] {
            let (Some(ours), theirs) = (find(w, OURS), find(w, HAPROXY)) else {
                continue;
            };
            let label = w.label(args);
            let theirs_rps = theirs.map(|t| t.per_second.median);
            targets.push(Target {
                what: format!("{label}: calls/s ≥ haproxy's"),
                ours: ours.per_second.median,
                haproxy: theirs_rps,
                met: theirs_rps.is_some_and(|t| ours.per_second.median >= t),
            });
            let theirs_p99 = theirs.map(|t| t.p99_us.median);
            targets.push(Target {
                what: format!("{label}: p99 ≤ haproxy's (µs)"),
                ours: ours.p99_us.median,
                haproxy: theirs_p99,
                met: theirs_p99.is_some_and(|t| ours.p99_us.median <= t),
            });
        }
        if let Some((_, bytes)) = self.idle_h2.iter().find(|(p, _)| p == OURS) {
            targets.push(Target {
                what: "memory per idle h2 connection ≤ 16 KiB (bytes)".to_owned(),
                ours: *bytes,
                haproxy: self
                    .idle_h2
                    .iter()
                    .find(|(p, _)| p == HAPROXY)
                    .map(|(_, b)| *b),
                met: *bytes <= 16.0 * 1024.0,
            });
        }
        self.targets = targets;
    }

    /// Writes `<out>/proxy-<timestamp>/{report.json,report.md}`; returns the directory.
    pub fn write(&self, out: &Path) -> Result<PathBuf> {
        let stamp: String = self
            .started
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        let dir = out.join(format!("proxy-{stamp}"));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = dir.join("report.json");
        fs::write(&json, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| format!("writing {}", json.display()))?;
        let md = dir.join("report.md");
        fs::write(&md, self.markdown(&dir)).with_context(|| format!("writing {}", md.display()))?;
        Ok(dir)
    }

    /// Replaces the README's section between the markers with the tables.
    pub fn update_readme(&self, readme: &Path, dir: &Path) -> Result<()> {
        let text =
            fs::read_to_string(readme).with_context(|| format!("reading {}", readme.display()))?;
        let (Some(start), Some(end)) = (text.find(README_START), text.find(README_END)) else {
            anyhow::bail!(
                "{} has no {README_START} … {README_END} section: add the two markers where \
                 the proxy benchmark's tables belong",
                readme.display()
            );
        };
        let mut updated = String::with_capacity(text.len());
        updated.push_str(&text[..start + README_START.len()]);
        updated.push('\n');
        updated.push_str(&self.tables(dir));
        updated.push_str(&text[end..]);
        fs::write(readme, updated).with_context(|| format!("writing {}", readme.display()))
    }

    pub fn markdown(&self, dir: &Path) -> String {
        let mut md = format!("# Proxy benchmark, {}\n\n", self.started);
        md.push_str(&self.tables(dir));
        let _ = writeln!(md, "\nEvery round (per second · p50 µs · p99 µs):\n");
        for s in &self.summary {
            let runs: Vec<String> = self
                .rounds
                .iter()
                .filter(|r| r.workload == s.workload && r.peer == s.peer)
                .map(|r| {
                    format!(
                        "{:.0} · {:.0} · {:.0}",
                        r.measured.per_second, r.measured.latency_us.p50, r.measured.latency_us.p99
                    )
                })
                .collect();
            let _ = writeln!(md, "- {} — {}: {}", s.label, s.peer, runs.join(" | "));
        }
        md
    }

    fn tables(&self, dir: &Path) -> String {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "Command: `{}` — {} on {} ({} CPUs){}. Load generator, apps and proxies share the \
             machine, all on 127.0.0.1; {} interleaved rounds of {} s after {} s of warm-up, \
             medians (min–max for throughput). gRPC: h2load, 64 B messages; WebSocket: \
             tokio-tungstenite; HTTP/1.1: `interceptor_lab::loadgen`.\n",
            self.command,
            self.started,
            self.kernel,
            self.cpus,
            self.haproxy_version
                .as_deref()
                .map(|h| format!(", {h}"))
                .unwrap_or_default(),
            self.options.rounds,
            self.options.seconds,
            self.options.warmup_seconds,
        );
        let _ = writeln!(
            md,
            "| workload | path | per second | p50 µs | p99 µs | proxy CPU µs/op | errors | vs haproxy |"
        );
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|");
        for s in &self.summary {
            let haproxy = self
                .summary
                .iter()
                .find(|h| h.workload == s.workload && h.peer == HAPROXY);
            let ratio = match haproxy {
                Some(h) if s.peer != HAPROXY && h.per_second.median > 0.0 => {
                    format!("{:.2}×", s.per_second.median / h.per_second.median)
                }
                _ => "–".to_owned(),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} {} ({:.0}–{:.0}) | {:.0} | {:.0} | {} | {} | {} |",
                s.label,
                s.peer,
                s.per_second.median,
                s.unit,
                s.per_second.min,
                s.per_second.max,
                s.p50_us.median,
                s.p99_us.median,
                s.proxy_cpu_us_per_op
                    .map_or("–".to_owned(), |c| format!("{:.1}", c.median)),
                s.errors,
                ratio
            );
        }
        if !self.idle_h2.is_empty() {
            let _ = writeln!(
                md,
                "\nMemory per idle h2 connection (RSS growth over {} connections, one gRPC call \
                 each):\n",
                self.options.idle_connections
            );
            let _ = writeln!(md, "| path | per connection |\n|---|---:|");
            for (peer, bytes) in &self.idle_h2 {
                let _ = writeln!(md, "| {peer} | {:.1} KiB |", bytes / 1024.0);
            }
        }
        if !self.targets.is_empty() {
            let _ = writeln!(md, "\nTargets (issue 18):\n");
            let _ = writeln!(md, "| target | ours | haproxy | met |\n|---|---:|---:|---|");
            for t in &self.targets {
                let _ = writeln!(
                    md,
                    "| {} | {:.0} | {} | {} |",
                    t.what,
                    t.ours,
                    t.haproxy.map_or("–".to_owned(), |h| format!("{h:.0}")),
                    if t.met { "yes" } else { "**no**" }
                );
            }
        }
        if !self.failures.is_empty() {
            let _ = writeln!(md, "\nNot measured:\n");
            for f in &self.failures {
                let _ = writeln!(md, "- {f}");
            }
        }
        let _ = writeln!(
            md,
            "\nFull results: `{}/` (report.json, report.md).",
            dir.display()
        );
        md
    }
}
