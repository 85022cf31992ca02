//! The pod watcher's Prometheus metrics, served by the agent's health endpoint (`/metrics`):
//! how the watches fare (lists, errors) and what the controller did with this node's pods.

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Resource {
    Pods,
    Namespaces,
}

/// Where a pod of this node stands.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum PodState {
    /// Intercepted with eBPF.
    Ebpf,
    /// Intercepted with iptables.
    Iptables,
    /// To be intercepted, not yet (not running, or applying failed: see its events).
    Pending,
    /// Not part of the mesh, or turned off.
    Skipped,
    /// An annotation has a value the agent cannot honour.
    Invalid,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    pub resource: Resource,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: PodState,
}

#[derive(Clone, Debug, Default)]
pub struct KubeMetrics {
    pub lists: Family<ResourceLabels, Counter>,
    pub watch_errors: Family<ResourceLabels, Counter>,
    pub pods: Family<StateLabels, Gauge>,
    pub events: Counter,
}

impl KubeMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        let kube = registry.sub_registry_with_prefix("kube");
        kube.register(
            "lists",
            "Complete lists of a resource (the first, then one per re-list after a lost watch)",
            m.lists.clone(),
        );
        kube.register(
            "watch_errors",
            "Errors of a resource's watch (each followed by a backoff)",
            m.watch_errors.clone(),
        );
        kube.register("pods", "This node's pods by state", m.pods.clone());
        kube.register(
            "events",
            "Kubernetes Events posted on pods",
            m.events.clone(),
        );
        m
    }

    pub fn list(&self, resource: Resource) {
        self.lists.get_or_create(&ResourceLabels { resource }).inc();
    }

    pub fn watch_error(&self, resource: Resource) {
        self.watch_errors
            .get_or_create(&ResourceLabels { resource })
            .inc();
    }

    /// Sets the pod gauges after a pass.
    pub fn set_pods(&self, counts: &[(PodState, i64)]) {
        for (state, n) in counts {
            self.pods
                .get_or_create(&StateLabels { state: *state })
                .set(*n);
        }
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn metrics_are_exposed_with_their_labels() {
        let mut registry = Registry::with_prefix("interceptor_agent");
        let m = KubeMetrics::new(&mut registry);
        m.list(Resource::Pods);
        m.watch_error(Resource::Namespaces);
        m.set_pods(&[(PodState::Ebpf, 3), (PodState::Invalid, 1)]);
        let mut out = String::new();
        encode(&mut out, &registry).unwrap();
        for line in [
            "interceptor_agent_kube_lists_total{resource=\"Pods\"} 1",
            "interceptor_agent_kube_watch_errors_total{resource=\"Namespaces\"} 1",
            "interceptor_agent_kube_pods{state=\"Ebpf\"} 3",
            "interceptor_agent_kube_pods{state=\"Invalid\"} 1",
        ] {
            assert!(out.contains(line), "{line} in\n{out}");
        }
    }
}
