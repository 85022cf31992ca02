//! Debian's cloud kernels for the VM matrix, fetched as VMTEST.md describes: `apt-get download`
//! with a private apt state (the machine's apt configuration is never touched), `dpkg -x` into a
//! cache directory (never installed on the host), modules decompressed and `depmod`ed so the
//! virtme-ng initramfs can load them.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use xtask::{exec, output, step};

/// The kernel series of the matrix: what real nodes run (Debian 11 and 12, and the 6.12 LTS).
pub(crate) const SERIES: &[&str] = &["5.10", "6.1", "6.12"];

/// A kernel unpacked in the cache.
pub(crate) struct Kernel {
    /// Its root: `boot/vmlinuz-<release>` and `lib/modules/<release>`.
    pub root: PathBuf,
    /// `uname -r`.
    pub release: String,
}

impl Kernel {
    pub(crate) fn vmlinuz(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }
}

/// Which Debian release ships a series, and the package names that are its cloud kernels.
fn distribution(series: &str) -> Result<(&'static str, regex_lite::Regex)> {
    let (dist, pattern) = match series {
        "5.10" => ("bullseye", r"^linux-image-(5\.10\.0-\d+)-cloud-amd64$"),
        "6.1" => ("bookworm", r"^linux-image-(6\.1\.0-\d+)-cloud-amd64$"),
        "6.12" => ("bookworm", r"^linux-image-(6\.12\.\d+\+deb12)-cloud-amd64$"),
        other => bail!("no Debian cloud kernel known for series {other}"),
    };
    Ok((dist, regex_lite::Regex::new(pattern)?))
}

/// Fetches (or finds in the cache) the newest cloud kernel of `series`.
pub(crate) fn fetch(series: &str, cache: &Path) -> Result<Kernel> {
    let ready = cache.join(format!("{series}.ready"));
    if let Ok(release) = fs::read_to_string(&ready) {
        let kernel = Kernel {
            root: cache.join(release.trim()),
            release: release.trim().to_owned(),
        };
        if kernel.vmlinuz().exists() {
            return Ok(kernel);
        }
    }
    let (dist, pattern) = distribution(series)?;
    let apt = PrivateApt::new(&cache.join("apt").join(dist), dist)?;
    let names = apt.search(r"^linux-image-.*-cloud-amd64$")?;
    let package = names
        .iter()
        .filter(|n| pattern.is_match(n))
        .max_by(|a, b| version_key(a).cmp(&version_key(b)))
        .with_context(|| format!("no {series} cloud kernel in Debian {dist}"))?
        .clone();
    step(&format!("downloading {package} from Debian {dist}"));
    let debs = cache.join("debs");
    fs::create_dir_all(&debs)?;
    apt.download(&package, &debs)?;
    let deb = fs::read_dir(&debs)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
        })
        .with_context(|| format!("apt-get download left no .deb for {package}"))?;

    let release = package
        .strip_prefix("linux-image-")
        .context("package name")?
        .to_owned();
    let root = cache.join(&release);
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root)?;
    exec(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    decompress_modules(&root)?;
    exec(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
    let kernel = Kernel { root, release };
    if !kernel.vmlinuz().exists() {
        bail!("{} is missing from {package}", kernel.vmlinuz().display());
    }
    fs::write(&ready, &kernel.release)?;
    Ok(kernel)
}

/// 6.12's modules ship as .ko.xz, which the virtme initramfs cannot load (VMTEST.md).
fn decompress_modules(root: &Path) -> Result<()> {
    let mut stack = vec![root.join("lib/modules")];
    let mut xz = Vec::new();
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "xz") {
                xz.push(path);
            }
        }
    }
    for chunk in xz.chunks(200) {
        exec(Command::new("unxz").arg("--force").args(chunk))?;
    }
    Ok(())
}

/// Numeric parts of a package name, for "newest" (5.10.0-46 > 5.10.0-9).
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// apt with its own sources, lists and cache: reads the machine's mirror addresses, writes
/// nothing outside `dir`.
struct PrivateApt {
    dir: PathBuf,
}

impl PrivateApt {
    fn new(dir: &Path, dist: &str) -> Result<Self> {
        let (main, security) = mirrors()?;
        fs::create_dir_all(dir.join("lists/partial"))?;
        fs::create_dir_all(dir.join("cache/archives/partial"))?;
        let sources = match dist {
            "bullseye" => format!(
                "deb {main} bullseye main\ndeb {main} bullseye-updates main\n\
                 deb {security} bullseye-security main\n"
            ),
            _ => format!(
                "deb {main} {dist} main\ndeb {main} {dist}-updates main\n\
                 deb {security} {dist}-security main\n"
            ),
        };
        fs::write(dir.join("sources.list"), sources)?;
        let apt = Self {
            dir: dir.to_owned(),
        };
        step(&format!("apt-get update (private state for Debian {dist})"));
        output(apt.command("apt-get").arg("update"))?;
        Ok(apt)
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        let opt = |k: &str, v: &Path| format!("{k}={}", v.display());
        cmd.arg("-o")
            .arg(opt("Dir::Etc::sourcelist", &self.dir.join("sources.list")))
            .args(["-o", "Dir::Etc::sourceparts=/nonexistent"])
            .arg("-o")
            .arg(opt("Dir::State::Lists", &self.dir.join("lists")))
            .arg("-o")
            .arg(opt("Dir::Cache", &self.dir.join("cache")))
            // Downloading into a root-owned directory: the _apt sandbox user could not write it.
            .args(["-o", "APT::Sandbox::User=root", "-q"]);
        cmd
    }

    fn search(&self, pattern: &str) -> Result<Vec<String>> {
        let out = output(
            self.command("apt-cache")
                .args(["search", "--names-only", pattern]),
        )?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect())
    }

    fn download(&self, package: &str, into: &Path) -> Result<()> {
        exec(
            self.command("apt-get")
                .arg("download")
                .arg(package)
                .current_dir(into),
        )
    }
}

/// The machine's Debian mirror and security mirror, read from its apt sources (deb822 or
/// one-line format) at run time, so no registry host is written into the project.
fn mirrors() -> Result<(String, String)> {
    let mut uris: Vec<(String, String)> = Vec::new(); // (uri, suites)
    if let Ok(text) = fs::read_to_string("/etc/apt/sources.list.d/debian.sources") {
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
            };
            if let (Some(u), Some(s)) = (field("URIs:"), field("Suites:")) {
                uris.push((u.split_whitespace().next().unwrap_or("").to_owned(), s));
            }
        }
    }
    if let Ok(text) = fs::read_to_string("/etc/apt/sources.list") {
        for line in text.lines().map(str::trim) {
            let mut f = line.split_whitespace();
            if f.next() != Some("deb") {
                continue;
            }
            let mut uri = f.next().unwrap_or("");
            if uri.starts_with('[') {
                uri = f
                    .find(|s| !s.contains('=') && !s.ends_with(']'))
                    .unwrap_or("");
            }
            if let Some(suite) = f.next() {
                uris.push((uri.to_owned(), suite.to_owned()));
            }
        }
    }
    let security = uris
        .iter()
        .find(|(_, s)| s.contains("-security"))
        .map(|(u, _)| u.clone());
    let main = uris
        .iter()
        .find(|(_, s)| s.split_whitespace().any(|s| !s.contains('-')))
        .map(|(u, _)| u.clone());
    match (main, security) {
        (Some(m), Some(s)) if !m.is_empty() && !s.is_empty() => Ok((m, s)),
        _ => bail!(
            "could not read Debian mirrors from /etc/apt/sources.list.d/debian.sources or \
             /etc/apt/sources.list (need a main and a -security entry)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_by_numbers_not_by_text() {
        let mut names = [
            "linux-image-5.10.0-9-cloud-amd64",
            "linux-image-5.10.0-46-cloud-amd64",
        ];
        names.sort_by_key(|n| version_key(n));
        assert_eq!(names[1], "linux-image-5.10.0-46-cloud-amd64");
    }

    #[test]
    fn series_patterns_pick_only_their_series() {
        let (_, p) = distribution("6.1").expect("6.1");
        assert!(p.is_match("linux-image-6.1.0-56-cloud-amd64"));
        assert!(!p.is_match("linux-image-6.12.117+deb12-cloud-amd64"));
        let (_, p) = distribution("6.12").expect("6.12");
        assert!(p.is_match("linux-image-6.12.117+deb12-cloud-amd64"));
        assert!(!p.is_match("linux-image-6.12-cloud-amd64"));
    }
}
