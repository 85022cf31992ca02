//! `cargo xtask build-ebpf`: builds the object exactly as interceptor's build.rs does and lists
//! its programs and maps, for inspection.

use std::process::Command;

use anyhow::Result;
use xtask::{exec, output, step, workspace_root};

pub(crate) fn run() -> Result<()> {
    crate::setup::run(&crate::setup::Options::default())?;
    step("building interceptor (its build script compiles interceptor-ebpf)");
    exec(xtask::cargo().args(["build", "--package", "interceptor"]))?;
    let object = workspace_root().join("target/ebpf/bpfel-unknown-none/release/interceptor-ebpf");
    println!("object: {}", object.display());
    let sections =
        output(Command::new("readelf").args(["-S", "-W"]).arg(&object)).unwrap_or_default();
    for line in sections.lines().filter(|l| {
        ["cgroup/", "sockops", "sk_msg", "sk_lookup", "maps"]
            .iter()
            .any(|s| l.contains(s))
            && !l.contains(".rel")
    }) {
        println!("  {}", line.trim());
    }
    Ok(())
}
