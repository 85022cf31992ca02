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
