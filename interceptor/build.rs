//! Builds the eBPF object (`interceptor-ebpf`) and leaves it in `OUT_DIR` for
//! `include_bytes_aligned!`, the way aya-build does, but with the toolchain recipe that works on
//! these machines (TOOLCHAIN.md): Debian's rustc 1.96 with its prebuilt `core` for
//! `bpfel-unknown-none`, `RUSTC_BOOTSTRAP=1`, and bpf-linker built against LLVM 22 — no nightly,
//! no `-Z build-std`.
//!
//! `INTERCEPTOR_EBPF_STUB=1` writes an empty object instead, for `cargo check`/docs on machines
//! without that toolchain; such a binary refuses to load with a message saying so.

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const TARGET: &str = "bpfel-unknown-none";
const PACKAGE: &str = "interceptor-ebpf";

fn main() -> Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir.parent().context("workspace root")?.to_owned();
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let object = out_dir.join("interceptor.bpf.o");

    println!("cargo:rerun-if-env-changed=INTERCEPTOR_EBPF_STUB");
    for dir in ["interceptor-ebpf", "interceptor-common"] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join(dir).join("src").display()
        );
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join(dir).join("Cargo.toml").display()
        );
    }

    if env::var_os("INTERCEPTOR_EBPF_STUB").is_some_and(|v| v != "0") {
        println!("cargo:warning=INTERCEPTOR_EBPF_STUB set: building without the eBPF object");
        fs::write(&object, b"")?;
        return Ok(());
    }

    let linker = find_bpf_linker().context(
        "bpf-linker not found on PATH or in $CARGO_HOME/bin: run `cargo xtask setup` \
         (or set INTERCEPTOR_EBPF_STUB=1 to build without the eBPF programs)",
    )?;
    if !Path::new(DEBIAN_RUSTC).exists() {
        bail!(
            "{DEBIAN_RUSTC} not found: the eBPF programs are built with Debian's rustc-web \
             (TOOLCHAIN.md). Run `cargo xtask setup`."
        );
    }

    // Shared by every host profile, so debug and release builds compile the programs once.
    let target_dir = shared_target_dir(&out_dir).join("ebpf");
    let mut cmd = Command::new(DEBIAN_CARGO);
    cmd.current_dir(&workspace)
        .args([
            "build",
            "--release",
            "--package",
            PACKAGE,
            "--bins",
            "--target",
            TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .args(["--config", "profile.release.lto=true"])
        .args(["--config", "profile.release.panic=\"abort\""]);
    // The test build with different program code (see the feature in Cargo.toml). Same target
    // dir: cargo keeps both variants' artifacts, so switching rebuilds only the eBPF crate.
    if env::var_os("CARGO_FEATURE_UPGRADE_PROBE").is_some() {
        cmd.args(["--features", "upgrade-probe"]);
    }
    // The ABI test build: one ABI newer, with a layout change (see the feature in Cargo.toml).
    if env::var_os("CARGO_FEATURE_ABI_PROBE").is_some() {
        cmd.args(["--features", "abi-probe"]);
    }
    // The outer (rustup) cargo's settings must not leak into the Debian toolchain's build; the
    // jobserver (CARGO_MAKEFLAGS) and the registry (CARGO_HOME) are shared on purpose.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        let keep = key == "CARGO_HOME" || key == "CARGO_MAKEFLAGS";
        if !keep
            && (key.starts_with("CARGO_")
                || key.starts_with("RUSTC")
                || key.starts_with("RUSTDOC")
                || key == "RUSTFLAGS"
                || key == "RUSTUP_TOOLCHAIN")
        {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd.env("RUSTC", DEBIAN_RUSTC)
        // aya-ebpf uses #![feature(asm_experimental_arch)].
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker)
        // BTF from debug info: lets aya and bpftool show typed maps. Warnings are errors: the
        // programs get no clippy run of their own, so rustc's lints are their gate.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-C\x1fdebuginfo=2\x1f-C\x1flink-arg=--btf\x1f-D\x1fwarnings",
        );

    let status = cmd.status().with_context(|| {
        format!("running {DEBIAN_CARGO} (Debian cargo-web; `cargo xtask setup`)")
    })?;
    if !status.success() {
        bail!("building {PACKAGE} for {TARGET} failed ({status}); see the errors above");
    }
    let built = target_dir.join(TARGET).join("release").join(PACKAGE);
    fs::copy(&built, &object)
        .with_context(|| format!("copying {} to {}", built.display(), object.display()))?;
    Ok(())
}

fn find_bpf_linker() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect())
        .unwrap_or_default();
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(home) = cargo_home {
        dirs.push(home.join("bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.is_file())
}

/// `<target>` from `<target>/[<triple>/]<profile>/build/<pkg>-<hash>/out`.
fn shared_target_dir(out_dir: &Path) -> PathBuf {
    out_dir
        .ancestors()
        .find(|p| p.file_name() == Some(&OsString::from("build")))
        .and_then(|build| build.parent()?.parent())
        .map(Path::to_owned)
        .unwrap_or_else(|| out_dir.to_owned())
}
