//! `cargo xtask fuzz`: the hostile-input properties (Istio-switch and CIDR parsers, annotation
//! decisions, proxy config, the spec↔rows codec, raw HTTP/1 heads on the proxy's listeners)
//! with many more cases than the test run gives them. proptest on the stable toolchain: no
//! nightly, no sanitizer runtime needed (cargo-fuzz needs both, these machines have neither).

use anyhow::Result;
use xtask::{exec, step};

#[derive(clap::Args)]
pub(crate) struct Options {
    /// Generated inputs per property (the test run uses proptest's default, 256, and 96 heads).
    #[arg(long, default_value_t = 20_000)]
    cases: u32,
}

pub(crate) fn run(opts: &Options) -> Result<()> {
    let cases = opts.cases.to_string();
    step(&format!(
        "parsers, annotations, config, spec codec: {cases} cases each"
    ));
    exec(
        xtask::cargo()
            .env("PROPTEST_CASES", &cases)
            .args(["test", "--package", "interceptor", "--lib", "hostile"])
            .args(["--", "--nocapture"]),
    )?;
    step(&format!(
        "raw HTTP/1 heads on the proxy's listeners: {cases} cases"
    ));
    exec(
        xtask::cargo()
            .env("PROPTEST_CASES", &cases)
            .args([
                "test",
                "--package",
                "interceptor",
                "--test",
                "hostile_input",
            ])
            .args(["--", "--nocapture"]),
    )
}
