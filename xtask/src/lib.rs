//! Helpers shared by the xtask commands.

#![allow(unsafe_code, reason = "geteuid")]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// Runs a command, inheriting stdio; the error names the whole command line.
pub fn exec(cmd: &mut Command) -> Result<()> {
    let line = render(cmd);
    let status = cmd.status().with_context(|| format!("running `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs a command and returns its stdout; the error names the command and shows stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let line = render(cmd);
    let out = cmd.output().with_context(|| format!("running `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn render(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The cargo that runs xtask (rustup's), for host builds.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A progress line: tasks that take time say so.
pub fn step(msg: &str) {
    eprintln!("==> {msg}");
}

/// Builds `interceptor` with `--features upgrade-probe` (different sockops code, same ABI: the
/// upgrade test's newer agent) and copies it to `target/debug/interceptor-upgrade-probe`. Same
/// target dir as the normal build: dependencies are shared, only the interceptor crate and the
/// eBPF crate are compiled twice. Run before the normal build, which then puts its own
/// `interceptor` back.
pub fn build_upgrade_probe() -> Result<()> {
    step("building the upgrade-probe agent (interceptor --features upgrade-probe)");
    exec(cargo().args([
        "build",
        "--package",
        "interceptor",
        "--features",
        "upgrade-probe",
    ]))?;
    let dir = workspace_root().join("target/debug");
    std::fs::copy(
        dir.join("interceptor"),
        dir.join("interceptor-upgrade-probe"),
    )
    .context("copying target/debug/interceptor to interceptor-upgrade-probe")?;
    Ok(())
}
