//! `cargo xtask setup`: installs what a fresh machine lacks, following TOOLCHAIN.md (the recipe
//! verified on these machines). Idempotent: checks first, installs only what is missing, prints
//! one line when nothing was needed.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result, bail};
use xtask::{exec, is_root, output, step};

/// Debian packages for building and testing: Debian's rustc-web with the prebuilt `core` for
/// the BPF targets, LLVM 22 for bpf-linker, and the network tools the tests and the iptables
/// mode use.
pub(crate) const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "bpftool",
    "iproute2",
    "iptables",
    "nftables",
    // The DNS tests' peers: dnsmasq as the pods' resolver, dig as a client.
    "dnsmasq-base",
    "bind9-dnsutils",
    // Third-party peers of the datapath matrix (bench and end-to-end tests): nginx with
    // sendfile as the app, haproxy and a Python asyncio proxy as sidecars, wrk as the client.
    "nginx-light",
    "haproxy",
    "python3",
    "wrk",
    // h2load: the gRPC client of the proxy benchmark (h2c, gRPC-framed request bodies).
    "nghttp2-client",
    // setpriv: the privilege tests drop one capability at a time (tests/src/tests/privileges.rs).
    "util-linux",
];

/// The bpf-linker version verified with LLVM 22 (newer ones may drop the llvm-22 feature).
const BPF_LINKER_VERSION: &str = "0.13.0";

#[derive(clap::Args, Default)]
pub(crate) struct Options {
    /// Also install what `cargo xtask vm-test` needs.
    #[arg(long)]
    pub vm: bool,
}

pub(crate) fn run(opts: &Options) -> Result<()> {
    if !is_root() {
        bail!("setup installs Debian packages and mounts bpffs: run it as root");
    }
    let mut did = Vec::new();
    let mut packages: Vec<&str> = PACKAGES.to_vec();
    if opts.vm {
        packages.extend_from_slice(VM_PACKAGES);
    }
    let missing = missing_packages(&packages)?;
    if !missing.is_empty() {
        install_packages(&missing)?;
        did.push(format!("installed {}", missing.join(" ")));
    }
    if !bpf_linker_ok() {
        install_bpf_linker()?;
        did.push(format!(
            "installed bpf-linker {BPF_LINKER_VERSION} (LLVM 22)"
        ));
    }
    if !deploy_tools_ok() {
        install_deploy_tools()?;
        did.push(format!("installed {}", DEPLOY_TOOLS.join(" ")));
    }
    if opts.vm {
        did.extend(setup_vm_tools()?);
    }
    if mount_bpffs()? {
        did.push("mounted bpffs at /sys/fs/bpf".into());
    }
    if did.is_empty() {
        eprintln!("setup: everything is in place");
    } else {
        eprintln!("setup: {}", did.join("; "));
    }
    Ok(())
}

/// PyPI packages for the deployment checks (deploy/check.py): Helm v4's library, to lint and
/// render the chart with real Helm, and the Kubernetes schemas to validate what it renders.
pub(crate) const DEPLOY_TOOLS: &[&str] = &["helm-python-sdk==0.2.2", "kubernetes-validate==1.37.0"];

fn deploy_tools_ok() -> bool {
    // Imported as modules (deploy/check.py runs `python3 -m kubernetes_validate`), so no
    // console script needs to be on PATH.
    Command::new("python3")
        .args(["-c", "import helm_python, kubernetes_validate"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn install_deploy_tools() -> Result<()> {
    step(&format!("pip install {}", DEPLOY_TOOLS.join(" ")));
    exec(
        Command::new("python3")
            .args(["-m", "pip", "install", "-q"])
            .args(DEPLOY_TOOLS),
    )?;
    if !deploy_tools_ok() {
        bail!(
            "{} installed but `python3 -c 'import helm_python, kubernetes_validate'` fails",
            DEPLOY_TOOLS.join(" ")
        );
    }
    Ok(())
}

/// Extra packages for the virtme-ng kernel matrix (VMTEST.md).
pub(crate) const VM_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "kmod",
    "libcap-ng-dev",
    "libseccomp-dev",
];

/// virtme-ng and virtiofsd, at the versions VMTEST.md verified.
const VIRTME_NG_VERSION: &str = "1.42";
const VIRTIOFSD_VERSION: &str = "1.14.0";

fn setup_vm_tools() -> Result<Vec<String>> {
    let mut did = Vec::new();
    if !version_output(&vng_path(), VIRTME_NG_VERSION) {
        step(&format!("pip install virtme-ng=={VIRTME_NG_VERSION}"));
        exec(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "-q",
            &format!("virtme-ng=={VIRTME_NG_VERSION}"),
        ]))?;
        if !version_output(&vng_path(), VIRTME_NG_VERSION) {
            bail!(
                "virtme-ng {VIRTME_NG_VERSION} installed but `vng --version` does not report \
                 it; is python3's scripts directory on PATH?"
            );
        }
        did.push(format!("installed virtme-ng {VIRTME_NG_VERSION}"));
    }
    if !version_output(&cargo_bin("virtiofsd"), VIRTIOFSD_VERSION) {
        step(&format!(
            "cargo install virtiofsd {VIRTIOFSD_VERSION} (a few minutes, once)"
        ));
        exec(
            xtask::cargo()
                .args(["install", "virtiofsd", "--version", VIRTIOFSD_VERSION])
                .arg("--locked"),
        )?;
        did.push(format!("installed virtiofsd {VIRTIOFSD_VERSION}"));
    }
    Ok(did)
}

/// `vng`, from python3's scripts directory (pip installs it there), else from PATH.
pub(crate) fn vng_path() -> std::path::PathBuf {
    let scripts = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    match scripts {
        Some(dir) if Path::new(&dir).join("vng").exists() => Path::new(&dir).join("vng"),
        _ => "vng".into(),
    }
}

/// A binary cargo installed: $CARGO_HOME/bin/NAME.
fn cargo_bin(name: &str) -> std::path::PathBuf {
    let home = std::env::var("CARGO_HOME")
        .unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap_or_default()));
    Path::new(&home).join("bin").join(name)
}

/// Whether `program --version` runs and mentions `version`.
fn version_output(program: &Path, version: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && (String::from_utf8_lossy(&o.stdout).contains(version)
                    || String::from_utf8_lossy(&o.stderr).contains(version))
        })
}

pub(crate) fn missing_packages(packages: &[&str]) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    for pkg in packages {
        let out = Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", pkg])
            .output()
            .context("running dpkg-query (is this Debian?)")?;
        let status = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !status.contains("install ok installed") {
            missing.push((*pkg).to_owned());
        }
    }
    Ok(missing)
}

pub(crate) fn install_packages(missing: &[String]) -> Result<()> {
    step(&format!("apt-get install {}", missing.join(" ")));
    exec(Command::new("apt-get").args(["update", "-q"]))?;
    exec(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(missing),
    )
}

fn bpf_linker_ok() -> bool {
    version_output(Path::new("bpf-linker"), BPF_LINKER_VERSION)
        || version_output(&cargo_bin("bpf-linker"), BPF_LINKER_VERSION)
}

fn install_bpf_linker() -> Result<()> {
    step(&format!(
        "cargo install bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"
    ));
    let path = format!(
        "/usr/lib/llvm-22/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    exec(
        xtask::cargo()
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .env("PATH", path)
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--locked", "--no-default-features", "--features", "llvm-22"]),
    )
}

/// Mounts bpffs at /sys/fs/bpf if it is not. Returns whether it mounted.
fn mount_bpffs() -> Result<bool> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == "/sys/fs/bpf" && f[2] == "bpf"
    });
    if mounted {
        return Ok(false);
    }
    if !Path::new("/sys/fs/bpf").exists() {
        std::fs::create_dir_all("/sys/fs/bpf").context("creating /sys/fs/bpf")?;
    }
    output(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    Ok(true)
}
