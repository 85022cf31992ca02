//! Config reload: on SIGHUP, or when the file changes (checked every `config_poll`), the file is
//! read and validated; a valid one becomes the next snapshot, an invalid one is logged with its
//! line and field and the running config stays. Connections are never dropped: each request
//! uses the snapshot current when it started.

use std::{path::Path, time::Duration};

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{
    metrics::{ProxyMetrics, ReloadResult},
    snapshot::ConfigSource,
};

/// A cheap fingerprint of the file: changes when it is rewritten or replaced (ConfigMap updates
/// swap a symlink, so the content is hashed rather than trusting mtime alone).
fn fingerprint(path: &Path) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let bytes = std::fs::read(path).ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    Some(h.finish())
}

/// Runs until `stop`: reloads on SIGHUP and on file changes.
pub async fn watch(
    source: ConfigSource,
    metrics: ProxyMetrics,
    poll: Duration,
    stop: CancellationToken,
) {
    let Some(path) = source.path.clone() else {
        return;
    };
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(err) => {
            warn!(%err, "no SIGHUP handler; reloading on file changes only");
            None
        }
    };
    let mut last = fingerprint(&path);
    let mut tick = tokio::time::interval(poll.max(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => false,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
        };
        let now = fingerprint(&path);
        if !forced && now == last {
            continue;
        }
        last = now;
        apply(&source, &metrics);
    }
}

/// Reloads once and records the result.
pub fn apply(source: &ConfigSource, metrics: &ProxyMetrics) {
    match source.reload() {
        Ok(true) => {
            metrics.reload(ReloadResult::Applied);
            info!(generation = source.snapshot().generation, "config reloaded");
        }
        Ok(false) => {}
        Err(err) => {
            metrics.reload(ReloadResult::Rejected);
            error!(%err, "config rejected; keeping the running one");
        }
    }
}
