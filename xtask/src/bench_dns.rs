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
    let bin = xtask::build_release_lab()?;
    let root = workspace_root();
    let out = root.join("bench/results");
    step(&format!(
        "{} dns-bench (every run is bounded)",
        bin.display()
    ));
    let before = xtask::newest_result(&out, "dns-", "");
    exec(
        Command::new(&bin)
            .args(["dns-bench", "--out"])
            .arg(&out)
            .args(&opts.args)
            .env("INTERCEPTOR_BENCH_COMMAND", command_line)
            .current_dir(&root),
    )?;
    let dir = xtask::newest_result(&out, "dns-", "")
        .context("interceptor-lab dns-bench wrote no results")?;
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

fn update_readme(readme: &Path, dir: &Path) -> Result<()> {
    let table = fs::read_to_string(dir.join("table.md"))?;
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let body = format!("{table}\nFull results: `bench/results/{name}/results.json`.");
    xtask::replace_readme_section(readme, README_START, README_END, &body)?;
    eprintln!("updated the DNS benchmark section of {}", readme.display());
    Ok(())
}
