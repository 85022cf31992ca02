//! `cargo xtask bench dns`: DNS capture (eBPF and iptables) to the sidecar's DNS proxy against
//! the resolver asked directly, run by `interceptor-lab dns-bench` from a release build.
//! Results land in `bench/results/dns-<time>/` and the table replaces the README's DNS
//! benchmark section.

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};
use xtask::{exec, is_root, step, workspace_root};

#[derive(clap::Args, Clone, Default)]
pub(crate) struct DnsOptions {
    /// Leave README.md alone.
    #[arg(long)]
    no_readme: bool,
    /// Passed to `interceptor-lab dns-bench` (e.g. `-- --rounds 5 --queries 20000`).
    #[arg(last = true)]
    args: Vec<String>,
}

const README_START: &str = "<!-- bench-dns:start -->";
const README_END: &str = "<!-- bench-dns:end -->";

pub(crate) fn run(opts: &DnsOptions, command_line: &str) -> Result<()> {
    if !is_root() {
        bail!("the DNS benchmark builds pods (network namespaces) and loads eBPF: run as root");
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
        "{} dns-bench (every run is bounded)",
        bin.display()
    ));
    let before = newest(&out);
    exec(
        Command::new(&bin)
            .args(["dns-bench", "--out"])
            .arg(&out)
            .args(&opts.args)
            .env("INTERCEPTOR_BENCH_COMMAND", command_line)
            .current_dir(&root),
    )?;
    let dir = newest(&out).context("interceptor-lab dns-bench wrote no results")?;
    if Some(&dir) == before.as_ref() {
        bail!(
            "interceptor-lab dns-bench wrote no new results in {}",
            out.display()
        );
    }
    if !opts.no_readme {
        update_readme(&root.join("README.md"), &dir)?;
    }
    Ok(())
}

/// The most recent `dns-*` directory in `dir`.
fn newest(dir: &Path) -> Option<std::path::PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("dns-"))
        })
        .max()
}

fn update_readme(readme: &Path, dir: &Path) -> Result<()> {
    let text =
        fs::read_to_string(readme).with_context(|| format!("reading {}", readme.display()))?;
    let (Some(start), Some(end)) = (text.find(README_START), text.find(README_END)) else {
        bail!(
            "{} has no {README_START} … {README_END} section",
            readme.display()
        );
    };
    let table = fs::read_to_string(dir.join("table.md"))?;
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let updated = format!(
        "{}{README_START}\n{table}\nFull results: `bench/results/{name}/results.json`.\n{}",
        &text[..start],
        &text[end..]
    );
    fs::write(readme, updated)?;
    eprintln!("updated the DNS benchmark section of {}", readme.display());
    Ok(())
}
