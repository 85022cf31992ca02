//! `cargo xtask <command>`: everything a fresh machine needs, in one place.

mod bench;
mod bench_datapath;
mod bench_lab;
mod build_ebpf;
mod demo;
mod fuzz;
mod kernels;
mod lint;
mod setup;
mod test;
mod vm_test;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "interceptor project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what a fresh machine lacks (Debian packages, bpf-linker for LLVM 22, bpffs).
    /// Idempotent; quiet when everything is there.
    Setup(setup::Options),
    /// Build the eBPF object on its own and show its programs (never required: the
    /// interceptor build does it).
    BuildEbpf,
    /// Run every test: unit tests, then the end-to-end suite on this machine's kernel (root).
    Test(test::Options),
    /// Formatting, clippy (host crates and the eBPF crate), and the deployment checked with real
    /// Helm and the Kubernetes schemas.
    Lint(lint::Options),
    /// Build the release binary and run `interceptor-lab demo`.
    Demo(demo::Options),
    /// Run the end-to-end suite in virtme-ng guests on Debian's 5.10, 6.1 and 6.12 kernels,
    /// and on this machine's kernel (root).
    VmTest(vm_test::Options),
    /// Benchmarks; results go to bench/results/ with the command that produced them.
    Bench(bench::BenchArgs),
    /// The hostile-input properties with many more generated cases than `test` runs.
    Fuzz(fuzz::Options),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Setup(opts) => setup::run(&opts),
        Command::BuildEbpf => build_ebpf::run(),
        Command::Test(opts) => test::run(&opts),
        Command::Lint(opts) => lint::run(&opts),
        Command::Demo(opts) => demo::run(&opts),
        Command::VmTest(opts) => vm_test::run(&opts),
        Command::Fuzz(opts) => fuzz::run(&opts),
        Command::Bench(what) => {
            let args: Vec<String> = std::env::args().skip(1).collect();
            bench::run(&what, &format!("cargo xtask {}", args.join(" ")))
        }
    }
}
