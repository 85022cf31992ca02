//! `cargo xtask bench` / `cargo xtask bench datapath`: the interception modes side by side
//! (direct, iptables, ebpf, ebpf without sk_msg) on real network-namespace pods, run by
//! `interceptor-lab bench` from a release build. Results land in `bench/results/datapath-*.{json,md,svg}`
//! and the Markdown table replaces the README's benchmark section.

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};
use xtask::{exec, is_root, step, workspace_root};

#[derive(clap::Args, Clone, Default)]
pub(crate) struct DatapathOptions {
    /// Leave README.md alone.
    #[arg(long)]
    no_readme: bool,
    /// Passed to `interceptor-lab bench` (e.g. `-- --rounds 5 --modes iptables,ebpf`).
    #[arg(last = true)]
    args: Vec<String>,
}

const README_START: &str = "<!-- bench-datapath:start -->";
const README_END: &str = "<!-- bench-datapath:end -->";

pub(crate) fn run(opts: &DatapathOptions, command_line: &str) -> Result<()> {
    if !is_root() {
        bail!(
            "the benchmark builds pods (network namespaces, cgroups) and loads eBPF: run as root"
        );
    }
    crate::setup::run(&crate::setup::Options::default())?;
    let bin = xtask::build_release_lab()?;
    let root = workspace_root();
    let out = root.join("bench/results");
    step(&format!(
        "{} bench (a few minutes; every run is bounded)",
        bin.display()
    ));
    let before = xtask::newest_result(&out, "datapath-", ".md");
    exec(
        Command::new(&bin)
            .args(["bench", "--out"])
            .arg(&out)
            .args(&opts.args)
            .env("INTERCEPTOR_BENCH_COMMAND", command_line)
            .current_dir(&root),
    )?;
    let report = xtask::newest_result(&out, "datapath-", ".md")
        .context("interceptor-lab bench wrote no report")?;
    if Some(&report) == before.as_ref() {
        bail!(
            "interceptor-lab bench wrote no new report in {}",
            out.display()
        );
    }
    if !opts.no_readme {
        update_readme(&root.join("README.md"), &report)?;
    }
    Ok(())
}

fn update_readme(readme: &Path, report: &Path) -> Result<()> {
    let table = fs::read_to_string(report)?;
    let name = report
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let body = format!("{table}\nFull results: `bench/results/{name}` (and `.json`, `.svg`).");
    xtask::replace_readme_section(readme, README_START, README_END, &body)?;
    eprintln!("updated the benchmark section of {}", readme.display());
    Ok(())
}
