//! The benchmarks `interceptor-lab` runs whole from a release build and that write
//! `bench/results/<prefix><time>/{results.json,table.md}`: `cargo xtask bench dns` (DNS capture
//! to the sidecar's DNS proxy against the resolver asked directly, `interceptor-lab dns-bench`)
//! and `cargo xtask bench scale` (thousands of pods, `interceptor-lab bench-scale`). Each table
//! replaces its README section.

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};
use xtask::{exec, is_root, step, workspace_root};

#[derive(clap::Args, Clone, Default)]
pub(crate) struct LabBenchOptions {
    /// Leave README.md alone.
    #[arg(long)]
    no_readme: bool,
    /// Passed to the `interceptor-lab` subcommand (e.g. `-- --rounds 5`).
    #[arg(last = true)]
    args: Vec<String>,
}

/// One such benchmark.
pub(crate) struct LabBench {
    /// `interceptor-lab` subcommand.
    pub subcommand: &'static str,
    /// Result directory prefix under bench/results.
    pub prefix: &'static str,
    /// What README.md calls the section, for messages.
    pub title: &'static str,
    /// `<!-- bench-<marker>:start -->` … `:end -->` in README.md.
    pub marker: &'static str,
}

pub(crate) const DNS: LabBench = LabBench {
    subcommand: "dns-bench",
    prefix: "dns-",
    title: "DNS benchmark",
    marker: "bench-dns",
};

pub(crate) const SCALE: LabBench = LabBench {
    subcommand: "bench-scale",
    prefix: "scale-",
    title: "node-scale benchmark",
    marker: "bench-scale",
};

pub(crate) fn run(bench: &LabBench, opts: &LabBenchOptions, command_line: &str) -> Result<()> {
    if !is_root() {
        bail!(
            "the {} builds pods (network namespaces) and loads eBPF: run as root",
            bench.title
        );
    }
    crate::setup::run(&crate::setup::Options::default())?;
    let bin = xtask::build_release_lab()?;
    let root = workspace_root();
    let out = root.join("bench/results");
    step(&format!(
        "{} {} (every run is bounded)",
        bin.display(),
        bench.subcommand
    ));
    let before = xtask::newest_result(&out, bench.prefix, "");
    exec(
        Command::new(&bin)
            .args([bench.subcommand, "--out"])
            .arg(&out)
            .args(&opts.args)
            .env("INTERCEPTOR_BENCH_COMMAND", command_line)
            .current_dir(&root),
    )?;
    let dir = xtask::newest_result(&out, bench.prefix, "")
        .with_context(|| format!("interceptor-lab {} wrote no results", bench.subcommand))?;
    if Some(&dir) == before.as_ref() {
        bail!(
            "interceptor-lab {} wrote no new results in {}",
            bench.subcommand,
            out.display()
        );
    }
    if !opts.no_readme {
        update_readme(bench, &root.join("README.md"), &dir)?;
    }
    Ok(())
}

fn update_readme(bench: &LabBench, readme: &Path, dir: &Path) -> Result<()> {
    let table = fs::read_to_string(dir.join("table.md"))?;
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let body = format!("{table}\nFull results: `bench/results/{name}/results.json`.");
    xtask::replace_readme_section(
        readme,
        &format!("<!-- {}:start -->", bench.marker),
        &format!("<!-- {}:end -->", bench.marker),
        &body,
    )?;
    eprintln!(
        "updated the {} section of {}",
        bench.title,
        readme.display()
    );
    Ok(())
}
