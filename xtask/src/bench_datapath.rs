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
    step("building interceptor (release)");
    exec(xtask::cargo().args([
        "build",
        "--release",
        "--package",
        "interceptor",
        "--package",
        "interceptor-lab",
    ]))?;
    let root = workspace_root();
    let out = root.join("bench/results");
    let bin = root.join("target/release/interceptor-lab");
    step(&format!(
        "{} bench (a few minutes; every run is bounded)",
        bin.display()
    ));
    let before = newest_report(&out);
    exec(
        Command::new(&bin)
            .args(["bench", "--out"])
            .arg(&out)
            .args(&opts.args)
            .env("INTERCEPTOR_BENCH_COMMAND", command_line)
            .current_dir(&root),
    )?;
    let report = newest_report(&out).context("interceptor-lab bench wrote no report")?;
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

/// The most recent `datapath-*.md` in `dir`.
fn newest_report(dir: &Path) -> Option<std::path::PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "md")
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("datapath-"))
        })
        .max()
}

fn update_readme(readme: &Path, report: &Path) -> Result<()> {
    let text =
        fs::read_to_string(readme).with_context(|| format!("reading {}", readme.display()))?;
    let (Some(start), Some(end)) = (text.find(README_START), text.find(README_END)) else {
        bail!(
            "{} has no {README_START} … {README_END} section",
            readme.display()
        );
    };
    let table = fs::read_to_string(report)?;
    let name = report
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let updated = format!(
        "{}{README_START}\n{table}\nFull results: `bench/results/{name}` (and `.json`, `.svg`).\n{}",
        &text[..start],
        &text[end..]
    );
    fs::write(readme, updated)?;
    eprintln!("updated the benchmark section of {}", readme.display());
    Ok(())
}
