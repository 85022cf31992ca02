//! gRPC unary load with h2load (nghttp2's, a third-party client): h2c prior knowledge, a
//! gRPC-framed request body on every stream, `--log-file` for every request's latency (h2load
//! prints only min/mean/max itself).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use tokio::process::Command;

use super::Measured;
use crate::loadgen::Histogram;

/// The request message: 64 bytes, behind gRPC's 5-byte length prefix (uncompressed).
pub(super) fn request_file(dir: &Path) -> Result<PathBuf> {
    let message = [b'x'; 64];
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(message.len())?.to_be_bytes());
    frame.extend_from_slice(&message);
    let path = dir.join("grpc-request.bin");
    std::fs::write(&path, frame).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// What one h2load run does.
pub(super) struct GrpcLoad<'a> {
    pub(super) target: SocketAddr,
    pub(super) connections: usize,
    /// Streams at once per connection.
    pub(super) streams: usize,
    pub(super) seconds: f64,
    pub(super) warmup_seconds: f64,
    pub(super) request: &'a Path,
    pub(super) scratch: &'a Path,
}

pub(super) async fn run(load: &GrpcLoad<'_>) -> Result<Measured> {
    let log = load.scratch.join("h2load-requests.tsv");
    let _ = std::fs::remove_file(&log);
    let mut cmd = Command::new("h2load");
    cmd.arg(format!("http://{}/bench.Echo/Unary", load.target))
        .args(["-c", &load.connections.to_string()])
        .args(["-m", &load.streams.to_string()])
        .args(["-t", "1"])
        .args(["-D", &format!("{}", load.seconds.max(1.0).round())])
        .args([
            "--warm-up-time",
            &format!("{}", load.warmup_seconds.max(0.0).round()),
        ])
        .arg("-d")
        .arg(load.request)
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg(format!("--log-file={}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // Bounded: the run's own duration plus warm-up, with room to connect and finish.
    let limit = Duration::from_secs_f64(load.seconds + load.warmup_seconds + 20.0);
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .with_context(|| format!("h2load ran past {limit:?}"))?
        .context("running h2load (Debian's nghttp2-client; `cargo xtask setup` installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "h2load failed ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let summary = parse_summary(&text)?;
    let tsv =
        std::fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
    let mut histogram = Histogram::default();
    let mut non_2xx = 0u64;
    for line in tsv.lines() {
        let mut cols = line.split('\t');
        let (Some(_start), Some(status), Some(us)) = (cols.next(), cols.next(), cols.next()) else {
            continue;
        };
        let (Ok(status), Ok(us)) = (status.trim().parse::<i64>(), us.trim().parse::<u64>()) else {
            continue;
        };
        if !(200..300).contains(&status) {
            non_2xx += 1;
        }
        histogram.record(Duration::from_micros(us));
    }
    Ok(Measured {
        per_second: summary.per_second,
        latency_us: histogram.percentiles(),
        operations: summary.succeeded,
        errors: summary.failed + non_2xx,
        proxy_cpu_us_per_op: None,
    })
}

struct Summary {
    per_second: f64,
    succeeded: u64,
    failed: u64,
}

/// `finished in 4.00s, 12345.67 req/s, …` and
/// `requests: 100 total, 100 started, 100 done, 98 succeeded, 2 failed, 0 errored, 0 timeout`.
fn parse_summary(text: &str) -> Result<Summary> {
    let per_second = text
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|v| v.strip_suffix(" req/s"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no `finished in …, N req/s` in h2load's output:\n{text}"))?;
    let requests = text
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .with_context(|| format!("no `requests:` line in h2load's output:\n{text}"))?;
    let count = |what: &str| -> u64 {
        requests
            .split(", ")
            .find_map(|part| part.strip_suffix(what)?.trim().parse().ok())
            .unwrap_or(0)
    };
    Ok(Summary {
        per_second,
        succeeded: count(" succeeded"),
        failed: count(" failed") + count(" errored") + count(" timeout"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h2load_summary_is_read() {
        let text = "finished in 4.00s, 12345.67 req/s, 1.2MB/s\n\
                    requests: 100 total, 100 started, 100 done, 98 succeeded, 2 failed, 1 errored, 0 timeout\n";
        let s = parse_summary(text).expect("parsed");
        assert!((s.per_second - 12345.67).abs() < 1e-6);
        assert_eq!((s.succeeded, s.failed), (98, 3));
    }
}
