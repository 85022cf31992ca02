//! Where the binaries are: the product (`interceptor`: agent, proxy, pod) and this lab's
//! (`interceptor-lab`: test apps). Environment variables win, so tests and VM guests can point
//! at a build anywhere; else both are expected side by side in cargo's target directory.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};

/// `$INTERCEPTOR_BIN`, else `interceptor` next to the running executable (or one directory up,
/// for test binaries under `target/*/deps/`).
pub fn product() -> Result<PathBuf> {
    find("INTERCEPTOR_BIN", "interceptor")
}

/// `$INTERCEPTOR_LAB_BIN`, else `interceptor-lab` found the same way.
pub fn lab() -> Result<PathBuf> {
    find("INTERCEPTOR_LAB_BIN", "interceptor-lab")
}

/// The "newer agent" of the upgrade test: `interceptor` built with `--features upgrade-probe`
/// (different sockops code, same ABI). `$INTERCEPTOR_UPGRADE_PROBE_BIN`, else
/// `interceptor-upgrade-probe` beside the product binary, where `cargo xtask test` and
/// `vm-test` put it.
pub fn upgrade_probe() -> Result<PathBuf> {
    probe_build(
        "INTERCEPTOR_UPGRADE_PROBE_BIN",
        UPGRADE_PROBE,
        "upgrade-probe",
    )
}

/// File name of the upgrade-probe build, beside `interceptor`.
pub const UPGRADE_PROBE: &str = "interceptor-upgrade-probe";

/// The "newer agent" of the ABI-migration test: `interceptor` built with `--features abi-probe`
/// (ABI 8: `COUNTERS` one slot longer, sockops counts `abi_probe`).
/// `$INTERCEPTOR_ABI_PROBE_BIN`, else `interceptor-abi-probe` beside the product binary, where
/// `cargo xtask test` and `vm-test` put it.
pub fn abi_probe() -> Result<PathBuf> {
    probe_build("INTERCEPTOR_ABI_PROBE_BIN", ABI_PROBE, "abi-probe")
}

/// File name of the abi-probe build, beside `interceptor`.
pub const ABI_PROBE: &str = "interceptor-abi-probe";

/// A test build of `interceptor` with `feature`: `$var`, else `file` beside the product binary.
fn probe_build(var: &str, file: &str, feature: &str) -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os(var) {
        return Ok(PathBuf::from(bin));
    }
    let candidate = product()?.with_file_name(file);
    if candidate.is_file() {
        return Ok(candidate);
    }
    bail!(
        "{} not found: run `cargo xtask test` (it builds `cargo build -p interceptor --features \
         {feature}` and copies the binary there) or set {var}",
        candidate.display()
    )
}

fn find(var: &str, name: &str) -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os(var) {
        return Ok(PathBuf::from(bin));
    }
    let exe = std::env::current_exe().context("finding the running executable")?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "{name} not found next to {}: build it (`cargo build -p interceptor -p interceptor-lab`) \
         or set {var}",
        exe.display()
    )
}
