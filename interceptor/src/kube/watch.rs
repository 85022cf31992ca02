//! The agent's view of the API: this node's pods (`spec.nodeName` field selector) and every
//! namespace (for the `istio-injection` / `istio.io/rev` labels), each a kube-rs `watcher` →
//! `default_backoff` → `modify` (drop what we never read) → `reflect` into a store, as kube's
//! `examples/pod_reflector.rs` does.
//!
//! The watcher re-lists on its own when a watch expires (410 Gone) or the API server restarts;
//! the reflector swaps the whole store at the re-list's `InitDone`, so a pod deleted while the
//! watch was down simply is not in the new snapshot, and the controller — which always compares
//! the snapshot with what is applied — removes it (the statemanager-against-snapshot approach).

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::{sync::Notify, task::JoinHandle};
use tracing::{debug, info, warn};

use super::metrics::{KubeMetrics, Resource as MetricResource};

/// One resource's watch state (its counters are in [`super::metrics`]).
#[derive(Debug, Default)]
pub struct WatchStats {
    /// Set at the first complete list.
    pub synced: AtomicBool,
    /// Complete lists (the first, and every re-list after an expiry or a restart).
    pub lists: AtomicU64,
}

/// Both watches, their stores, and a wake-up for the controller.
pub struct Watch {
    pub pods: Store<Pod>,
    pub namespaces: Store<Namespace>,
    pub pod_stats: Arc<WatchStats>,
    pub namespace_stats: Arc<WatchStats>,
    changed: Arc<Notify>,
    tasks: Vec<JoinHandle<()>>,
}

impl Watch {
    /// Starts watching the pods of `node` and all namespaces.
    pub fn start(client: Client, node: &str, metrics: &KubeMetrics) -> Self {
        let changed = Arc::new(Notify::new());
        let pod_config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let (pods, pod_stats, pod_task) = run(
            Api::<Pod>::all(client.clone()),
            pod_config,
            (MetricResource::Pods, metrics.clone()),
            changed.clone(),
            |pod: &mut Pod| {
                pod.managed_fields_mut().clear();
                // Container statuses and conditions churn and are never read.
                if let Some(status) = pod.status.as_mut() {
                    status.conditions = None;
                    status.container_statuses = None;
                    status.init_container_statuses = None;
                    status.ephemeral_container_statuses = None;
                }
            },
        );
        let (namespaces, namespace_stats, ns_task) = run(
            Api::<Namespace>::all(client),
            watcher::Config::default(),
            (MetricResource::Namespaces, metrics.clone()),
            changed.clone(),
            |ns: &mut Namespace| {
                ns.managed_fields_mut().clear();
                ns.annotations_mut().clear();
            },
        );
        Self {
            pods,
            namespaces,
            pod_stats,
            namespace_stats,
            changed,
            tasks: vec![pod_task, ns_task],
        }
    }

    /// Both resources have been listed completely at least once.
    pub fn synced(&self) -> bool {
        self.pod_stats.synced.load(Ordering::Acquire)
            && self.namespace_stats.synced.load(Ordering::Acquire)
    }

    /// Notified (coalesced) whenever a store changed.
    pub fn notifier(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    /// The namespace object named `name`, if known.
    pub fn namespace(&self, name: &str) -> Option<Arc<Namespace>> {
        self.namespaces.get(&reflector::ObjectRef::new(name))
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn run<K>(
    api: Api<K>,
    config: watcher::Config,
    what: (MetricResource, KubeMetrics),
    changed: Arc<Notify>,
    prune: impl FnMut(&mut K) + Send + 'static,
) -> (Store<K>, Arc<WatchStats>, JoinHandle<()>)
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stats = Arc::new(WatchStats::default());
    let stream = watcher(api, config)
        .default_backoff()
        .modify(prune)
        .reflect(writer);
    let task = tokio::spawn(drive(stream, what, stats.clone(), changed));
    (reader, stats, task)
}

async fn drive<K: Resource>(
    stream: impl Stream<Item = watcher::Result<watcher::Event<K>>>,
    (resource, metrics): (MetricResource, KubeMetrics),
    stats: Arc<WatchStats>,
    changed: Arc<Notify>,
) {
    let what = match resource {
        MetricResource::Pods => "pods",
        MetricResource::Namespaces => "namespaces",
    };
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::InitDone) => {
                let lists = stats.lists.fetch_add(1, Ordering::Relaxed) + 1;
                metrics.list(resource);
                if !stats.synced.swap(true, Ordering::AcqRel) {
                    info!(what, "listed: watching for changes");
                } else {
                    info!(what, lists, "re-listed after the watch was lost");
                }
                changed.notify_one();
            }
            // The store only changes at InitDone during a list.
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => changed.notify_one(),
            Err(err) => {
                metrics.watch_error(resource);
                // The backoff delays the retry; 410 Gone is the watcher's cue to re-list.
                match &err {
                    watcher::Error::WatchError(status) if status.code == 410 => {
                        debug!(what, "watch expired (410 Gone): re-listing");
                    }
                    _ => warn!(what, %err, "Kubernetes API watch failed; retrying with backoff"),
                }
            }
        }
    }
}
