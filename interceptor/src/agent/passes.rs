//! What the agent's periodic pass costs, as metrics: `interceptor_agent_pass_seconds` (a
//! histogram of how long each pass over the pods took) and `interceptor_agent_pods` (how many
//! pods the last pass looked at). At node scale the pass is the agent's own CPU cost; the
//! node-scale benchmark reads these.

use std::time::Duration;

use prometheus_client::{
    metrics::{
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry as MetricsRegistry,
};

#[derive(Clone)]
pub(super) struct PassMetrics {
    seconds: Histogram,
    pods: Gauge,
}

impl PassMetrics {
    pub(super) fn new(registry: &mut MetricsRegistry) -> Self {
        // 100 µs … ~1.6 min: a pass over a handful of pods up to a pathological one.
        let seconds = Histogram::new(exponential_buckets(0.0001, 4.0, 11));
        let pods = Gauge::default();
        registry.register(
            "pass_seconds",
            "How long one pass over the pods took (gone namespaces, proxy listeners)",
            seconds.clone(),
        );
        registry.register(
            "pods",
            "Pods enabled on this node at the last pass",
            pods.clone(),
        );
        Self { seconds, pods }
    }

    pub(super) fn observe(&self, took: Duration, pods: usize) {
        self.seconds.observe(took.as_secs_f64());
        self.pods.set(i64::try_from(pods).unwrap_or(i64::MAX));
    }
}
