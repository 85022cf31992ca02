//! The benchmark's report: every run, min/median/max over rounds, the ratios that matter
//! (eBPF vs iptables, eBPF vs direct, sk_msg vs loopback TCP), written as JSON, a Markdown
//! table and an SVG chart.

use std::{fmt::Write as _, fs, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::{BenchArgs, HttpRun, Mode, StreamRun};

#[derive(Debug, Serialize)]
pub struct Report {
    /// The command that produced it.
    pub command: String,
    /// UTC, RFC 3339.
    pub started: String,
    pub kernel: String,
    pub cpus: usize,
    pub rounds: u32,
    pub seconds: f64,
    pub http: Vec<HttpRun>,
    pub streams: Vec<StreamRun>,
    pub http_summary: Vec<HttpSummary>,
    pub stream_summary: Vec<StreamSummary>,
    pub ratios: Vec<Ratio>,
}

/// min / median / max over rounds.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    pub(crate) fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 {
            v[mid]
        } else {
            (v[mid - 1] + v[mid]) / 2.0
        };
        Some(Self {
            min: v[0],
            median,
            max: v[v.len() - 1],
        })
    }
}

#[derive(Debug, Serialize)]
pub struct HttpSummary {
    pub workload: String,
    pub mode: Mode,
    pub requests_per_second: Spread,
    pub p50_us: Spread,
    pub p90_us: Spread,
    pub p99_us: Spread,
    pub p999_us: Spread,
    pub cpu_seconds_per_10k: Spread,
    pub errors: u64,
}

#[derive(Debug, Serialize)]
pub struct StreamSummary {
    pub message_size: usize,
    pub mode: Mode,
    pub gib_per_second: Spread,
    pub cpu_seconds_per_gib: Spread,
}

/// `numerator / denominator` of the medians, per workload.
#[derive(Debug, Serialize)]
pub struct Ratio {
    pub workload: String,
    pub metric: &'static str,
    pub numerator: Mode,
    pub denominator: Mode,
    pub ratio: f64,
}

impl Report {
    pub fn new(args: &BenchArgs) -> Self {
        Self {
            // The xtask that ran us names itself; else our own command line.
            command: std::env::var("INTERCEPTOR_BENCH_COMMAND")
                .unwrap_or_else(|_| std::env::args().collect::<Vec<_>>().join(" ")),
            started: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            kernel: interceptor::bpf::features::kernel_release(),
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            rounds: args.rounds,
            seconds: 0.0,
            http: Vec::new(),
            streams: Vec::new(),
            http_summary: Vec::new(),
            stream_summary: Vec::new(),
            ratios: Vec::new(),
        }
    }

    /// Computes the summaries and ratios from the runs.
    pub fn finish(&mut self, took: Duration) {
        self.seconds = (took.as_secs_f64() * 10.0).round() / 10.0;
        let mut workloads: Vec<String> = Vec::new();
        for run in &self.http {
            if !workloads.contains(&run.workload) {
                workloads.push(run.workload.clone());
            }
        }
        for workload in &workloads {
            for mode in Mode::REPORTED {
                let runs: Vec<&HttpRun> = self
                    .http
                    .iter()
                    .filter(|r| &r.workload == workload && r.mode == mode)
                    .collect();
                let spread = |f: fn(&HttpRun) -> f64| {
                    Spread::of(&runs.iter().map(|r| f(r)).collect::<Vec<_>>())
                };
                let Some(rps) = spread(|r| r.requests_per_second) else {
                    continue;
                };
                let p = |f| spread(f).unwrap_or(rps);
                self.http_summary.push(HttpSummary {
                    workload: workload.clone(),
                    mode,
                    requests_per_second: rps,
                    p50_us: p(|r| r.p50_us),
                    p90_us: p(|r| r.p90_us),
                    p99_us: p(|r| r.p99_us),
                    p999_us: p(|r| r.p999_us),
                    cpu_seconds_per_10k: p(|r| r.cpu_seconds_per_10k),
                    errors: runs.iter().map(|r| r.errors).sum(),
                });
            }
            for (metric, num, den) in [
                ("requests_per_second", Mode::Ebpf, Mode::Iptables),
                ("requests_per_second", Mode::Ebpf, Mode::Direct),
                ("p99_us", Mode::Ebpf, Mode::Iptables),
                ("cpu_seconds_per_10k", Mode::Ebpf, Mode::Iptables),
                ("requests_per_second", Mode::Ebpf, Mode::EbpfNoSkmsg),
                ("requests_per_second", Mode::EbpfAdaptive, Mode::EbpfAlways),
                ("cpu_seconds_per_10k", Mode::EbpfAdaptive, Mode::EbpfAlways),
            ] {
                let value = |mode| {
                    self.http_summary
                        .iter()
                        .find(|s| &s.workload == workload && s.mode == mode)
                        .map(|s| match metric {
                            "requests_per_second" => s.requests_per_second.median,
                            "p99_us" => s.p99_us.median,
                            _ => s.cpu_seconds_per_10k.median,
                        })
                };
                if let (Some(n), Some(d)) = (value(num), value(den))
                    && d > 0.0
                {
                    self.ratios.push(Ratio {
                        workload: workload.clone(),
                        metric,
                        numerator: num,
                        denominator: den,
                        ratio: n / d,
                    });
                }
            }
        }
        let mut sizes: Vec<usize> = self.streams.iter().map(|s| s.message_size).collect();
        sizes.sort_unstable();
        sizes.dedup();
        for size in sizes {
            for mode in Mode::REPORTED {
                let runs: Vec<&StreamRun> = self
                    .streams
                    .iter()
                    .filter(|r| r.message_size == size && r.mode == mode)
                    .collect();
                let Some(gib) =
                    Spread::of(&runs.iter().map(|r| r.gib_per_second).collect::<Vec<_>>())
                else {
                    continue;
                };
                let cpu = Spread::of(
                    &runs
                        .iter()
                        .map(|r| r.cpu_seconds_per_gib)
                        .collect::<Vec<_>>(),
                )
                .unwrap_or(gib);
                self.stream_summary.push(StreamSummary {
                    message_size: size,
                    mode,
                    gib_per_second: gib,
                    cpu_seconds_per_gib: cpu,
                });
            }
        }
    }

    /// Writes `<out>/datapath-<time>.{json,md,svg}`; returns the three paths.
    pub fn write(&self, out: &std::path::Path) -> Result<[PathBuf; 3]> {
        fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let stamp: String = self
            .started
            .chars()
            .filter(|c| c.is_ascii_digit() || *c == 'T')
            .collect();
        let base = out.join(format!("datapath-{stamp}"));
        let paths = [
            base.with_extension("json"),
            base.with_extension("md"),
            base.with_extension("svg"),
        ];
        fs::write(&paths[0], serde_json::to_string_pretty(self)? + "\n")?;
        fs::write(&paths[1], self.markdown())?;
        fs::write(&paths[2], self.svg())?;
        Ok(paths)
    }

    /// The Markdown tables (also what README.md shows).
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Command: `{}` — {} on {} ({} CPUs), {} rounds interleaved, {:.0} s. \
             Medians over rounds, (min–max) for throughput.\n",
            self.command, self.started, self.kernel, self.cpus, self.rounds, self.seconds
        );
        if !self.http_summary.is_empty() {
            s.push_str(
                "| workload | mode | req/s | p50 µs | p90 µs | p99 µs | p99.9 µs | CPU s / 10k req | errors |\n\
                 |---|---|---|---|---|---|---|---|---|\n",
            );
            for h in &self.http_summary {
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.0} ({:.0}–{:.0}) | {:.0} | {:.0} | {:.0} | {:.0} | {:.3} | {} |",
                    h.workload,
                    h.mode.name(),
                    h.requests_per_second.median,
                    h.requests_per_second.min,
                    h.requests_per_second.max,
                    h.p50_us.median,
                    h.p90_us.median,
                    h.p99_us.median,
                    h.p999_us.median,
                    h.cpu_seconds_per_10k.median,
                    h.errors
                );
            }
        }
        if !self.ratios.is_empty() {
            s.push_str("\n| workload | ratio | value |\n|---|---|---|\n");
            for r in &self.ratios {
                let _ = writeln!(
                    s,
                    "| {} | {} {} / {} | {:.2}× |",
                    r.workload,
                    r.metric,
                    r.numerator.name(),
                    r.denominator.name(),
                    r.ratio
                );
            }
        }
        if !self.stream_summary.is_empty() {
            s.push_str(
                "\nApp↔proxy hop alone (app writes to a sink on the proxy's 15001):\n\n\
                 | write size | mode | GiB/s | CPU s / GiB |\n|---|---|---|---|\n",
            );
            for st in &self.stream_summary {
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.2} ({:.2}–{:.2}) | {:.2} |",
                    human_size(st.message_size),
                    st.mode.name(),
                    st.gib_per_second.median,
                    st.gib_per_second.min,
                    st.gib_per_second.max,
                    st.cpu_seconds_per_gib.median
                );
            }
        }
        s
    }

    /// Two grouped bar charts: median req/s and median p99 per workload and mode.
    pub fn svg(&self) -> String {
        const COLORS: [(&str, Mode); 6] = [
            ("#9e9e9e", Mode::Direct),
            ("#e4572e", Mode::Iptables),
            ("#17bebb", Mode::Ebpf),
            ("#3a6ea5", Mode::EbpfAlways),
            ("#f2a541", Mode::EbpfAdaptive),
            ("#76b041", Mode::EbpfNoSkmsg),
        ];
        let mut workloads: Vec<&str> = Vec::new();
        for h in &self.http_summary {
            if !workloads.contains(&h.workload.as_str()) {
                workloads.push(&h.workload);
            }
        }
        let (w, panel_h, top) = (900.0, 260.0, 40.0);
        let height = top + 2.0 * (panel_h + 60.0) + 30.0;
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{height}\" \
             font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"10\" y=\"20\" font-size=\"14\">interceptor datapath benchmark — {} ({})</text>\n",
            self.kernel, self.started
        );
        for (i, (color, mode)) in COLORS.iter().enumerate() {
            let x = 520.0 + i as f64 * 95.0;
            let _ = writeln!(
                s,
                "<rect x=\"{x}\" y=\"10\" width=\"12\" height=\"12\" fill=\"{color}\"/>\
                 <text x=\"{}\" y=\"20\">{}</text>",
                x + 16.0,
                mode.name()
            );
        }
        let panels: [Panel; 2] = [
            ("requests/s (median)", |h| h.requests_per_second.median),
            ("p99 latency µs (median)", |h| h.p99_us.median),
        ];
        for (p, (title, value)) in panels.iter().enumerate() {
            let y0 = top + p as f64 * (panel_h + 60.0);
            let max = self
                .http_summary
                .iter()
                .map(value)
                .fold(0.0f64, f64::max)
                .max(1.0);
            let _ = writeln!(
                s,
                "<text x=\"10\" y=\"{}\" font-size=\"13\">{title}</text>",
                y0 + 14.0
            );
            let base = y0 + 20.0 + panel_h;
            let _ = writeln!(
                s,
                "<line x1=\"60\" y1=\"{base}\" x2=\"{}\" y2=\"{base}\" stroke=\"black\"/>",
                w - 10.0
            );
            let group_w = (w - 80.0) / workloads.len().max(1) as f64;
            let bar_w = (group_w - 20.0) / COLORS.len() as f64;
            for (g, workload) in workloads.iter().enumerate() {
                let gx = 70.0 + g as f64 * group_w;
                for (b, (color, mode)) in COLORS.iter().enumerate() {
                    let Some(h) = self
                        .http_summary
                        .iter()
                        .find(|h| h.workload == *workload && h.mode == *mode)
                    else {
                        continue;
                    };
                    let v = value(h);
                    let bh = v / max * (panel_h - 20.0);
                    let x = gx + b as f64 * bar_w;
                    let _ = writeln!(
                        s,
                        "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" \
                         fill=\"{color}\"><title>{} {}: {v:.0}</title></rect>\
                         <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"9\" text-anchor=\"middle\">{}</text>",
                        base - bh,
                        bar_w - 2.0,
                        workload,
                        mode.name(),
                        x + bar_w / 2.0,
                        base - bh - 3.0,
                        short(v)
                    );
                }
                let _ = writeln!(
                    s,
                    "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{workload}</text>",
                    gx + (group_w - 20.0) / 2.0,
                    base + 16.0
                );
            }
        }
        s.push_str("</svg>\n");
        s
    }
}

/// A chart panel: its title and the value it plots.
type Panel = (&'static str, fn(&HttpSummary) -> f64);

fn short(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

pub(super) fn human_size(bytes: usize) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_min_median_max() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).expect("values");
        assert_eq!((s.min, s.median, s.max), (1.0, 2.0, 3.0));
        let s = Spread::of(&[4.0, 1.0]).expect("values");
        assert_eq!(s.median, 2.5);
        assert!(Spread::of(&[]).is_none());
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_size(1024), "1 KiB");
        assert_eq!(human_size(1 << 20), "1 MiB");
        assert_eq!(human_size(1500), "1500 B");
    }
}
