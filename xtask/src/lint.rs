//! `cargo xtask lint`: what CI holds the tree to besides the tests — formatting, clippy on the
//! host crates and on the eBPF crate, and the deployment checked with real Helm and the
//! Kubernetes schemas (deploy/check.py).

use std::process::Command;

use anyhow::Result;
use xtask::{exec, step, workspace_root};

/// The crates built for the host; the eBPF crate is checked apart (it is `no_std`, `no_main`).
const HOST_CRATES: &[&str] = &[
    "interceptor",
    "interceptor-common",
    "interceptor-lab",
    "interceptor-e2e",
    "xtask",
];

#[derive(clap::Args, Default)]
pub(crate) struct Options {
    /// Skip the deployment checks (Helm lint/render, Kubernetes schema validation).
    #[arg(long)]
    no_deploy: bool,
}

pub(crate) fn run(opts: &Options) -> Result<()> {
    step("cargo fmt --check");
    exec(xtask::cargo().args(["fmt", "--all", "--", "--check"]))?;

    step("clippy, host crates (all targets, warnings are errors)");
    let mut clippy = xtask::cargo();
    // `--no-deps`: only the crates named here. Path dependencies are otherwise linted too, and
    // third_party/ holds vendored crates kept as upstream wrote them (third_party/*/PATCHES.md).
    clippy.args(["clippy", "--all-targets", "--no-deps"]);
    for krate in HOST_CRATES {
        clippy.args(["--package", krate]);
    }
    exec(clippy.args(["--", "-D", "warnings"]))?;

    // As aya does for its eBPF crates, apart from the host crates. Here on the host target: the
    // rustup toolchain has no rust-src for bpfel (TOOLCHAIN.md) and Debian's has no clippy, and
    // a check build needs neither a linker nor the BPF target. No test harness (no_std).
    step("clippy, eBPF crate");
    exec(xtask::cargo().args([
        "clippy",
        "--package",
        "interceptor-ebpf",
        "--",
        "-C",
        "panic=abort",
        "-D",
        "warnings",
    ]))?;

    if !opts.no_deploy {
        step("deployment: helm lint --strict, render, validate against Kubernetes schemas");
        exec(
            Command::new("python3")
                .arg(workspace_root().join("deploy/check.py"))
                .arg("all"),
        )?;
    }
    Ok(())
}
