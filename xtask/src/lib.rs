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

/// Builds the release `interceptor` and `interceptor-lab` (the demo and every benchmark run
/// the lab binary, which runs the product binary) and returns the lab binary's path.
pub fn build_release_lab() -> Result<PathBuf> {
    step("building interceptor (release)");
    exec(cargo().args([
        "build",
        "--release",
        "--package",
        "interceptor",
        "--package",
        "interceptor-lab",
    ]))?;
    Ok(workspace_root().join("target/release/interceptor-lab"))
}

/// The newest entry of `dir` whose name starts with `prefix` (and ends with `suffix`): result
/// names carry a sortable UTC timestamp.
pub fn newest_result(dir: &Path, prefix: &str, suffix: &str) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(suffix))
        })
        .max()
}

/// Replaces what stands between `start` and `end` in `readme` with `body`.
pub fn replace_readme_section(readme: &Path, start: &str, end: &str, body: &str) -> Result<()> {
    let text =
        std::fs::read_to_string(readme).with_context(|| format!("reading {}", readme.display()))?;
    let (Some(from), Some(to)) = (text.find(start), text.find(end)) else {
        bail!("{} has no {start} … {end} section", readme.display());
    };
    let updated = format!("{}{start}\n{body}\n{}", &text[..from], &text[to..]);
    std::fs::write(readme, updated).with_context(|| format!("writing {}", readme.display()))
}

/// Builds the test builds of `interceptor` and copies each beside it in `target/debug`:
/// `--features upgrade-probe` (different sockops code, same ABI: the upgrade test's newer agent)
/// as `interceptor-upgrade-probe`, and `--features abi-probe` (ABI 8 with a layout change: the
/// ABI-migration test's newer agent) as `interceptor-abi-probe`. Same target dir as the normal
/// build: dependencies are shared, only the interceptor crate and the eBPF crate (and, for
/// abi-probe, interceptor-common) are compiled again. Run before the normal build, which then
/// puts its own `interceptor` back.
pub fn build_upgrade_probe() -> Result<()> {
    let dir = workspace_root().join("target/debug");
    for (feature, bin) in [
        ("upgrade-probe", "interceptor-upgrade-probe"),
        ("abi-probe", "interceptor-abi-probe"),
    ] {
        step(&format!(
            "building the {feature} agent (interceptor --features {feature})"
        ));
        exec(cargo().args(["build", "--package", "interceptor", "--features", feature]))?;
        std::fs::copy(dir.join("interceptor"), dir.join(bin))
            .with_context(|| format!("copying target/debug/interceptor to {bin}"))?;
    }
    Ok(())
}
