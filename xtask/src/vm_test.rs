//! `cargo xtask vm-test`: the end-to-end suite on the kernels real nodes run — Debian's cloud
//! kernels 5.10 (bullseye), 6.1 and 6.12 (bookworm) in virtme-ng guests under TCG, plus this
//! machine's kernel — following VMTEST.md (the verified recipe for these machines).
//!
//! The interceptor binary and the test executable are built once on the host; every guest runs
//! those same files (virtme-ng shares the host's root read-only) and writes its log, exit code,
//! kernel release and `interceptor status --json` into a shared directory.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use xtask::{exec, is_root, output, render, step, workspace_root};

use crate::kernels::{self, Kernel};

#[derive(clap::Args)]
pub(crate) struct Options {
    /// Which kernels: 5.10, 6.1, 6.12, host, or all (the three guests and the host).
    #[arg(long, default_value = "all")]
    kernel: String,
    /// Only run tests whose name contains this.
    filter: Option<String>,
    /// Time limit per kernel, seconds: a guest still running then is killed and counted failed.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// Skip setup (machine prepared already).
    #[arg(long)]
    no_setup: bool,
    /// Rewrite README.md's "Kernel support" table from this run.
    #[arg(long)]
    update_readme: bool,
    /// Also run the host-only tests (see HOST_ONLY) in the guests.
    #[arg(long)]
    all_tests: bool,
}

/// Tests the guests skip unless `--all-tests`: they exercise user-space logic that does not
/// depend on the kernel (the Kubernetes control plane against the fake API; the registry's
/// rollback when a map is full, which needs 66000 map updates; the agent listing 300 pods and
/// collecting the gone ones, 443 s of a 774 s 6.12 guest run) and would take most of a TCG
/// guest's time. They run in the host suite (`cargo xtask test`) and in the matrix's host row.
const HOST_ONLY: &[&str] = &[
    "kube::",
    "lifecycle::a_failed_update_keeps_the_pod_as_it_was",
    "scale::",
];

/// Parallel tests in a guest: they spend much of their time waiting on processes and polls.
const GUEST_TEST_THREADS: u32 = 3;

/// One kernel's outcome: the list `target/vm-test/results.json` holds.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub(crate) struct KernelResult {
    /// `uname -r` as the suite saw it.
    pub kernel: String,
    pub passed: u32,
    pub failed: u32,
    pub skipped: u32,
    /// Tests not run on this kernel because they do not depend on it (`HOST_ONLY`, or a
    /// `--filter`): libtest's "filtered out".
    #[serde(default)]
    pub not_run: u32,
    pub seconds: f64,
    /// Datapath features the agent used on this kernel (from `interceptor status --json`).
    #[serde(default)]
    pub features: Vec<String>,
}

pub(crate) fn run(opts: &Options) -> Result<()> {
    if !is_root() {
        bail!("vm-test boots kernels and runs the suite as root inside them: run it as root");
    }
    let targets = select(&opts.kernel)?;
    if !opts.no_setup {
        crate::setup::run(&crate::setup::Options { vm: true })?;
    }
    let root = workspace_root();
    let cache = root.join("target/vm-kernels");
    let mut kernels = Vec::new();
    for target in &targets {
        match target {
            Target::Guest(series) => {
                step(&format!(
                    "kernel {series}: fetching (cached under {})",
                    cache.display()
                ));
                kernels.push((target.clone(), Some(kernels::fetch(series, &cache)?)));
            }
            Target::Host => kernels.push((target.clone(), None)),
        }
    }

    let out_root = root.join("target/vm-test");
    fs::create_dir_all(&out_root).with_context(|| format!("creating {}", out_root.display()))?;
    let suite = build_suite()?.snapshot(&out_root.join("bin"))?;
    if !opts.all_tests {
        step(&format!(
            "guests skip the kernel-independent tests {} (the host row runs them)",
            HOST_ONLY.join(", ")
        ));
    }

    let mut results = Vec::new();
    let mut failures = Vec::new();
    for (target, kernel) in &kernels {
        let label = target.label();
        let dir = out_root.join(&label);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let guest = matches!(target, Target::Guest(_));
        let run = Run {
            label: label.clone(),
            dir: dir.clone(),
            suite: &suite,
            filter: opts.filter.as_deref(),
            skip: if guest && !opts.all_tests {
                HOST_ONLY.to_vec()
            } else {
                Vec::new()
            },
            threads: if guest { GUEST_TEST_THREADS } else { 2 },
            timeout: Duration::from_secs(opts.timeout),
        };
        let result = match kernel {
            Some(k) => run.guest(k),
            None => run.host(),
        }?;
        if result.failed > 0 || result.passed == 0 {
            failures.push((label.clone(), dir.join("log")));
        }
        results.push(result);
    }

    let json = serde_json::to_string_pretty(&results)?;
    let results_path = out_root.join("results.json");
    fs::write(&results_path, format!("{json}\n"))
        .with_context(|| format!("writing {}", results_path.display()))?;
    println!("\n{}", table(&results));
    println!("results: {}", results_path.display());
    for (label, log) in &failures {
        eprintln!("\n==> {label}: last lines of {}", log.display());
        let text = fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for line in &lines[lines.len().saturating_sub(60)..] {
            eprintln!("  {line}");
        }
    }
    if opts.update_readme {
        update_readme(&root.join("README.md"), &results)?;
    }
    if !failures.is_empty() {
        let names: Vec<&str> = failures.iter().map(|(l, _)| l.as_str()).collect();
        bail!("the suite failed on: {}", names.join(", "));
    }
    Ok(())
}

#[derive(Clone, Debug, PartialEq)]
enum Target {
    Guest(&'static str),
    Host,
}

impl Target {
    fn label(&self) -> String {
        match self {
            Target::Guest(series) => series.to_string(),
            Target::Host => "host".into(),
        }
    }
}

fn select(which: &str) -> Result<Vec<Target>> {
    let mut targets = Vec::new();
    for part in which.split(',').map(str::trim) {
        match part {
            "all" => {
                targets.extend(kernels::SERIES.iter().map(|s| Target::Guest(s)));
                targets.push(Target::Host);
            }
            "host" => targets.push(Target::Host),
            s => match kernels::SERIES.iter().find(|k| **k == s) {
                Some(k) => targets.push(Target::Guest(k)),
                None => bail!(
                    "unknown kernel {s:?}: use one of {}, host or all",
                    kernels::SERIES.join(", ")
                ),
            },
        }
    }
    targets.dedup();
    Ok(targets)
}

/// The files every kernel runs: the interceptor binary, the lab binary (test apps) and the
/// end-to-end test executable.
struct Suite {
    interceptor: PathBuf,
    lab: PathBuf,
    tests: PathBuf,
}

impl Suite {
    /// Copies both files aside, so rebuilding the workspace while the matrix runs cannot swap
    /// them under a running guest, without their debug info: a guest under TCG pays for every
    /// page it maps, and the debug build is mostly DWARF (panic locations stay).
    fn snapshot(self, dir: &Path) -> Result<Suite> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let copy = |from: &Path, name: &str| -> Result<PathBuf> {
            let to = dir.join(name);
            let _ = fs::remove_file(&to);
            exec(
                Command::new("objcopy")
                    .arg("--strip-debug")
                    .arg(from)
                    .arg(&to),
            )?;
            Ok(to)
        };
        // Found beside `interceptor` by the upgrade and ABI-migration tests.
        for probe in ["interceptor-upgrade-probe", "interceptor-abi-probe"] {
            copy(&self.interceptor.with_file_name(probe), probe)?;
        }
        Ok(Suite {
            interceptor: copy(&self.interceptor, "interceptor")?,
            lab: copy(&self.lab, "interceptor-lab")?,
            tests: copy(&self.tests, "interceptor-e2e")?,
        })
    }
}

fn build_suite() -> Result<Suite> {
    xtask::build_upgrade_probe()?;
    step("building interceptor and the end-to-end test executable (once, on the host)");
    exec(xtask::cargo().args([
        "build",
        "--package",
        "interceptor",
        "--package",
        "interceptor-lab",
    ]))?;
    let json = output(xtask::cargo().args([
        "test",
        "--package",
        "interceptor-e2e",
        "--no-run",
        "--message-format=json",
    ]))?;
    let tests = json
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["profile"]["test"] == true)
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .context("cargo did not report the interceptor-e2e test executable")?;
    Ok(Suite {
        interceptor: workspace_root().join("target/debug/interceptor"),
        lab: workspace_root().join("target/debug/interceptor-lab"),
        tests,
    })
}

/// One kernel's run of the suite.
struct Run<'a> {
    label: String,
    /// Shared with the guest: its script, log, exit code, uname, status.
    dir: PathBuf,
    suite: &'a Suite,
    filter: Option<&'a str>,
    /// `--skip` patterns for the test executable.
    skip: Vec<&'static str>,
    threads: u32,
    timeout: Duration,
}

impl Run<'_> {
    /// The script the guest (or the host) runs; all output lands in `dir`.
    fn script(&self) -> String {
        let dir = self.dir.display();
        let mut filter = self.filter.map(shell_quote).unwrap_or_default();
        for skip in &self.skip {
            filter.push_str(&format!(" --skip {}", shell_quote(skip)));
        }
        let threads = self.threads;
        // The e2e tests' own switches (`INTERCEPTOR_E2E_*`) reach the guest as they are set
        // here: the guest does not inherit this environment.
        let switches: String = std::env::vars()
            .filter(|(k, _)| k.starts_with("INTERCEPTOR_E2E_"))
            .map(|(k, v)| format!("export {k}={}\n", shell_quote(&v)))
            .collect();
        format!(
            r#"#!/bin/sh
# Written by cargo xtask vm-test.
out={dir}
uname -r > "$out/uname"
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
ulimit -l unlimited 2>/dev/null
export INTERCEPTOR_BIN={bin} INTERCEPTOR_LAB_BIN={lab} RUST_BACKTRACE=1 RUST_LOG=warn
{switches}"$INTERCEPTOR_BIN" status --json > "$out/status.json" 2>&1
cd {root}
{tests} --test-threads={threads} {filter} > "$out/log" 2>&1
echo $? > "$out/rc"
"#,
            bin = shell_quote(&self.suite.interceptor.display().to_string()),
            lab = shell_quote(&self.suite.lab.display().to_string()),
            root = shell_quote(&workspace_root().display().to_string()),
            tests = shell_quote(&self.suite.tests.display().to_string()),
        )
    }

    fn write_script(&self) -> Result<PathBuf> {
        let path = self.dir.join("run.sh");
        fs::write(&path, self.script()).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    fn guest(&self, kernel: &Kernel) -> Result<KernelResult> {
        let script = self.write_script()?;
        let mut cmd = Command::new(crate::setup::vng_path());
        cmd.args(["--disable-kvm", "--disable-microvm", "--run"])
            .arg(kernel.vmlinuz())
            .args(["--user", "root", "--memory", "2G", "--cpus", "2", "--rwdir"])
            .arg(&self.dir)
            .arg("--exec")
            .arg(format!("sh {}", script.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        step(&format!(
            "{}: booting {} under TCG",
            self.label, kernel.release
        ));
        self.supervise(cmd)
    }

    fn host(&self) -> Result<KernelResult> {
        let script = self.write_script()?;
        let mut cmd = Command::new("sh");
        cmd.arg(&script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        step(&format!("{}: this machine's kernel", self.label));
        self.supervise(cmd)
    }

    /// Runs `cmd` with the time limit, printing one live line, and reads the results back.
    fn supervise(&self, mut cmd: Command) -> Result<KernelResult> {
        let line = render(&cmd);
        let started = Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("running `{line}`"))?;
        // Drain stderr so the child never blocks on a full pipe; keep it for the failure report.
        let stderr = child.stderr.take();
        let stderr_log = self.dir.join("console");
        let drain = thread::spawn(move || {
            let mut text = String::new();
            if let Some(stderr) = stderr {
                for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                    text.push_str(&l);
                    text.push('\n');
                }
            }
            let _ = fs::write(stderr_log, text);
        });
        let mut timed_out = false;
        // One live line: rewritten in place on a terminal, a new line per change in CI logs.
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let mut last = (u32::MAX, u32::MAX);
        let mut last_print = Instant::now();
        loop {
            if child.try_wait()?.is_some() {
                break;
            }
            let elapsed = started.elapsed();
            if elapsed > self.timeout {
                let _ = child.kill();
                let _ = child.wait();
                timed_out = true;
                break;
            }
            let counts = count_so_far(&self.dir.join("log"));
            if tty || counts != last || last_print.elapsed() > Duration::from_secs(60) {
                let line = format!(
                    "    {:<6} {:>4}s  {} passed, {} failed so far",
                    self.label,
                    elapsed.as_secs(),
                    counts.0,
                    counts.1
                );
                if tty {
                    eprint!("\r{line}   ");
                } else {
                    eprintln!("{line}");
                }
                last = counts;
                last_print = Instant::now();
            }
            thread::sleep(Duration::from_millis(500));
        }
        if tty {
            eprintln!();
        }
        let _ = drain.join();
        let seconds = started.elapsed().as_secs_f64();
        let mut result = self.read_result(seconds);
        if timed_out {
            eprintln!(
                "    {}: killed after the {}s time limit",
                self.label,
                self.timeout.as_secs()
            );
            result.failed = result.failed.max(1);
        }
        eprintln!(
            "    {:<6} {}: {} passed, {} failed, {} skipped in {:.0}s",
            self.label, result.kernel, result.passed, result.failed, result.skipped, seconds
        );
        Ok(result)
    }

    fn read_result(&self, seconds: f64) -> KernelResult {
        let log = fs::read_to_string(self.dir.join("log")).unwrap_or_default();
        let summary = parse_log(&log);
        let rc = fs::read_to_string(self.dir.join("rc"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        let kernel = fs::read_to_string(self.dir.join("uname"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| format!("{} (did not boot)", self.label));
        let features = fs::read_to_string(self.dir.join("status.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .map(|v| features_in_use(&v))
            .unwrap_or_default();
        let mut failed = summary.failed;
        // A suite that exited non-zero (or never wrote its exit code) failed, whatever it printed.
        if rc != Some(0) && failed == 0 {
            failed = 1;
        }
        KernelResult {
            kernel,
            passed: summary.passed,
            failed,
            skipped: summary.skipped,
            not_run: summary.filtered_out,
            seconds: (seconds * 10.0).round() / 10.0,
            features,
        }
    }
}

#[derive(Debug, Default, PartialEq)]
struct Summary {
    passed: u32,
    failed: u32,
    skipped: u32,
    filtered_out: u32,
}

/// Counts libtest's per-test lines. A test that skips for a missing kernel feature prints
/// `interceptor-e2e: skipped <test>: <feature>` (see tests/src/lib.rs) and counts as skipped,
/// not passed.
fn parse_log(log: &str) -> Summary {
    let mut s = Summary::default();
    let skips = log
        .lines()
        .filter(|l| l.contains("interceptor-e2e: skipped "))
        .count() as u32;
    for line in log.lines() {
        // `test result: ok. 42 passed; 0 failed; 0 ignored; 0 measured; 13 filtered out; …`
        if let Some(result) = line.strip_prefix("test result: ") {
            s.filtered_out += result
                .split(';')
                .filter_map(|part| part.trim().strip_suffix(" filtered out"))
                .filter_map(|n| n.trim().parse::<u32>().ok())
                .sum::<u32>();
            continue;
        }
        let Some(rest) = line.strip_prefix("test ") else {
            continue;
        };
        if rest.ends_with(" ... ok") {
            s.passed += 1;
        } else if rest.ends_with(" ... FAILED") {
            s.failed += 1;
        } else if rest.ends_with(" ... ignored") || rest.contains(" ... ignored, ") {
            // `#[ignore = "reason"]` prints `... ignored, reason`.
            s.skipped += 1;
        }
    }
    let skips = skips.min(s.passed);
    s.passed -= skips;
    s.skipped += skips;
    s
}

fn count_so_far(log: &Path) -> (u32, u32) {
    let s = parse_log(&fs::read_to_string(log).unwrap_or_default());
    (s.passed + s.skipped, s.failed)
}

/// The datapath pieces `interceptor status --json` says this kernel runs.
fn features_in_use(status: &serde_json::Value) -> Vec<String> {
    status["features"]["in_use"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn table(results: &[KernelResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<28} {:>6} {:>6} {:>7} {:>7} {:>8}",
        "kernel", "passed", "failed", "skipped", "not run", "seconds"
    );
    for r in results {
        let _ = writeln!(
            out,
            "{:<28} {:>6} {:>6} {:>7} {:>7} {:>8.0}",
            r.kernel, r.passed, r.failed, r.skipped, r.not_run, r.seconds
        );
    }
    out
}

const README_START: &str = "<!-- kernel-support:start -->";
const README_END: &str = "<!-- kernel-support:end -->";

/// Replaces the README's kernel support table (between the markers) with this run's results.
fn update_readme(path: &Path, results: &[KernelResult]) -> Result<()> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let (Some(start), Some(end)) = (text.find(README_START), text.find(README_END)) else {
        bail!(
            "{} has no {README_START} … {README_END} section to update",
            path.display()
        );
    };
    let mut table = String::from(
        "| kernel | passed | failed | skipped | host-only, not run | seconds | features in use |\n|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {} | {:.0} | {} |",
            r.kernel,
            r.passed,
            r.failed,
            r.skipped,
            r.not_run,
            r.seconds,
            r.features.join(", ")
        );
    }
    let updated = format!("{}{README_START}\n{table}{}", &text[..start], &text[end..]);
    fs::write(path, updated).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("updated the kernel support table in {}", path.display());
    Ok(())
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_libtest_lines_and_named_skips() {
        let log = "running 4 tests\n\
                   test a ... ok\n\
                   interceptor-e2e: skipped b: sk_lookup (Linux >= 5.9)\n\
                   test b ... ok\n\
                   test c ... FAILED\n\
                   test d ... ignored\n\
                   test e ... ignored, a known bug (issue 15)\n\
                   test result: FAILED. 2 passed; 1 failed; 2 ignored; 0 measured; 13 filtered out; finished in 1.00s\n";
        assert_eq!(
            parse_log(log),
            Summary {
                passed: 1,
                failed: 1,
                skipped: 3,
                filtered_out: 13,
            }
        );
    }

    #[test]
    fn kernel_selection() {
        assert_eq!(select("6.1").expect("6.1"), vec![Target::Guest("6.1")]);
        assert_eq!(select("all").expect("all").len(), kernels::SERIES.len() + 1);
        assert!(select("4.19").is_err());
    }
}
