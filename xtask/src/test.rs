//! `cargo xtask test`: setup, the host unit tests, then the end-to-end suite that loads the real
//! programs into this kernel (root; pods are network namespaces).

use anyhow::{Result, bail};
use xtask::{exec, is_root, step, workspace_root};

#[derive(clap::Args)]
pub(crate) struct Options {
    /// Only run tests whose name contains this.
    filter: Option<String>,
    /// Parallel test threads for the end-to-end suite (each test has its own agent and pods).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Skip setup (for machines prepared already, e.g. inside the VM matrix).
    #[arg(long)]
    no_setup: bool,
}

pub(crate) fn run(opts: &Options) -> Result<()> {
    if !is_root() {
        bail!("the end-to-end tests load eBPF programs and create network namespaces: run as root");
    }
    if !opts.no_setup {
        crate::setup::run(&crate::setup::Options::default())?;
    }
    xtask::build_upgrade_probe()?;
    step("building interceptor and the test suites");
    exec(xtask::cargo().args([
        "build",
        "--package",
        "interceptor",
        "--package",
        "interceptor-lab",
    ]))?;
    let filter: Vec<&str> = opts.filter.as_deref().into_iter().collect();
    step("unit tests");
    exec(
        xtask::cargo()
            .args([
                "test",
                "--package",
                "interceptor-common",
                "--package",
                "interceptor",
                "--package",
                "interceptor-lab",
            ])
            .args(["--package", "xtask", "--"])
            .args(&filter),
    )?;
    step("end-to-end tests on this kernel");
    let bin = workspace_root().join("target/debug/interceptor");
    let lab = workspace_root().join("target/debug/interceptor-lab");
    let e2e = || {
        let mut cmd = xtask::cargo();
        cmd.env("INTERCEPTOR_BIN", &bin)
            .env("INTERCEPTOR_LAB_BIN", &lab)
            .args(["test", "--package", "interceptor-e2e", "--"]);
        cmd
    };
    if opts.filter.is_none() {
        // Alone first: it needs the next namespace created to get a dead one's inode number,
        // which in the parallel suite stays taken (by what, not found yet; the test then
        // skips itself, saying so).
        exec(e2e().args(["--exact", ALONE]))?;
        exec(
            e2e()
                .arg(format!("--test-threads={}", opts.threads))
                .args(["--skip", ALONE]),
        )
    } else {
        exec(
            e2e()
                .arg(format!("--test-threads={}", opts.threads))
                .args(&filter),
        )
    }
}

/// The end-to-end test run on its own before the parallel suite.
const ALONE: &str =
    "tests::lifecycle::a_new_namespace_with_a_dead_pods_inode_number_is_not_that_pod";
