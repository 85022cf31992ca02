//! `interceptor agent --kube`: learns which pods of this node are meshed, and how, from the
//! Kubernetes API with Istio's own annotations, and keeps the pod registry equal to that.
//!
//! - [`watch`]: this node's pods and all namespaces, watched and reflected into stores.
//! - [`annotations`]: pod + namespace metadata → a [`Decision`].
//! - [`events`]: Kubernetes Events on pods that cannot be intercepted as asked.
//!
//! [`PodController::reconcile`] compares the latest complete snapshot with what is applied and
//! fixes the difference, so a missed watch event, a re-list, an agent restart or a pod sandbox
//! restart all converge the same way.

pub mod annotations;
pub mod events;
pub mod metrics;
pub mod owner;
pub mod watch;

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Client, Config, ResourceExt as _,
    config::{KubeConfigOptions, Kubeconfig},
};
use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::{
    annotations::{Decision, SkipReason},
    events::{EventSink, reason},
    metrics::{KubeMetrics, PodState as MetricState},
    watch::Watch,
};
use crate::{
    bpf::{Maps, Pins},
    discovery::procfs::{self, NsId, ProcIndex},
    iptables::BackendChoice,
    registry::{self, Mode, PodRef, PodSource, Registry, spec::PodSpec},
};
use interceptor_common::pod::SOURCE_KUBERNETES;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "--kube needs this node's name: pass --node-name or set NODE_NAME (the DaemonSet sets it \
         from spec.nodeName)"
    )]
    NoNodeName,
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes configuration: not running in a cluster and no kubeconfig found \
         ({0}); pass --kubeconfig"
    )]
    Infer(#[source] kube::config::InferConfigError),
    #[error("creating the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// How the agent reaches the API and finds pods.
#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// A kubeconfig file; None: in-cluster service account (or $KUBECONFIG, ~/.kube/config).
    pub kubeconfig: Option<PathBuf>,
    pub node_name: String,
    /// Where the node's processes are (`/proc` with `hostPID: true`).
    pub proc_root: PathBuf,
    /// The DaemonSet running this agent: a stop uninstalls only when it is gone or being
    /// deleted (see `owner`). None: every stop keeps the datapath.
    pub daemonset: Option<owner::DaemonSetRef>,
    /// Mesh-wide DNS capture (meshConfig's `proxyMetadata.ISTIO_META_DNS_CAPTURE`); a pod's
    /// `proxy.istio.io/config` says otherwise for itself.
    pub dns_capture: bool,
}

/// Builds the API client from a kubeconfig or the in-cluster service account.
pub async fn client(opts: &KubeOptions) -> Result<Client, Error> {
    let config = match &opts.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig {
                path: path.clone(),
                source,
            })?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|source| Error::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
        None => Config::infer().await.map_err(Error::Infer)?,
    };
    info!(server = %config.cluster_url, "using the Kubernetes API");
    Client::try_from(config).map_err(Error::Client)
}

/// The registry name of a Kubernetes pod: `namespace/name`, shortened with a hash of the full
/// name when it would not fit the datapath's name field.
pub fn registry_name(namespace: &str, name: &str) -> String {
    use interceptor_common::pod::POD_NAME_LEN;
    let full = format!("{namespace}/{name}");
    if full.len() <= POD_NAME_LEN {
        return full;
    }
    // FNV-1a: stable across runs and versions (the name is matched again after a restart).
    let hash = full.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let suffix = format!("~{hash:016x}");
    let mut end = POD_NAME_LEN - suffix.len();
    while !full.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{suffix}", &full[..end])
}

/// What this agent applied for one pod.
#[derive(Clone, Debug)]
struct Applied {
    id: u32,
    mode: Mode,
    pid: u32,
    netns: NsId,
    spec: PodSpec,
}

/// Per-pod memory between passes (keyed by pod UID).
#[derive(Debug, Default)]
struct PodState {
    name: String,
    /// The registry entry this agent made for the pod (eBPF or iptables mode).
    applied: Option<Applied>,
    /// The last problem reported (log + event), so each is reported once, not every pass.
    problem: Option<String>,
    /// Locating or enabling failed: when to try again, and how many times it failed.
    retry_at: Option<Instant>,
    failures: u32,
    /// The pod's resourceVersion at the last failure: a change retries at once.
    failed_version: Option<String>,
}

const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Keeps the registry equal to what the API says about this node's pods.
pub struct PodController {
    pub watch: Watch,
    events: EventSink,
    node: String,
    proc_root: PathBuf,
    dns_capture: bool,
    pods: HashMap<String, PodState>,
    metrics: KubeMetrics,
    _events_task: JoinHandle<()>,
}

impl PodController {
    pub fn start(client: Client, opts: &KubeOptions, metrics: KubeMetrics) -> Self {
        let watch = Watch::start(client.clone(), &opts.node_name, &metrics);
        let (events, task) = EventSink::start(
            client,
            format!("interceptor-{}", opts.node_name),
            metrics.clone(),
        );
        Self {
            watch,
            events,
            node: opts.node_name.clone(),
            proc_root: opts.proc_root.clone(),
            dns_capture: opts.dns_capture,
            pods: HashMap::new(),
            metrics,
            _events_task: task,
        }
    }

    /// One pass: every pod of the snapshot to its decided state, and every Kubernetes entry of
    /// the registry that no pod wants removed. Does nothing before the first complete list (an
    /// empty store would look like "every pod is gone").
    pub fn reconcile(&mut self, pins: &Pins, maps: &mut Maps, stop: &CancellationToken) {
        if !self.watch.synced() || stop.is_cancelled() {
            return;
        }
        let mut registry = match Registry::lock(pins, maps) {
            Ok(r) => r.until(stop),
            Err(err) => {
                warn!(%err, "cannot lock the pod registry");
                return;
            }
        };
        let entries = entries(&registry);
        let snapshot = self.watch.pods.state();
        let live: HashSet<String> = snapshot.iter().filter_map(|p| p.uid()).collect();
        self.pods.retain(|uid, state| {
            let keep = live.contains(uid);
            if !keep && state.applied.is_some() {
                info!(pod = %state.name, "pod deleted");
            }
            keep
        });

        // Decide every pod first: entries nobody wants go before any pod is enabled, so a new
        // pod can take over an address a deleted one still holds (IP reuse).
        let mut decided = Vec::with_capacity(snapshot.len());
        for pod in &snapshot {
            let (Some(uid), Some(namespace)) = (pod.uid(), pod.namespace()) else {
                continue;
            };
            // The field selector already does this; a wrong server must not make us touch
            // another node's pods by IP.
            if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(self.node.as_str()) {
                continue;
            }
            let name = registry_name(&namespace, &pod.name_any());
            let decision = annotations::decide_with(
                pod,
                self.watch.namespace(&namespace).as_deref(),
                self.dns_capture,
            );
            decided.push((pod, uid, name, decision));
        }
        let wanted: HashSet<&str> = decided
            .iter()
            .filter(|(.., d)| matches!(d, Decision::Intercept { .. }))
            .map(|(_, _, name, _)| name.as_str())
            .collect();
        // Deleted pods, pods turned off or made invalid, pods deleted while no agent (or no
        // watch) ran.
        let unwanted: Vec<&Entry> = entries
            .iter()
            .filter(|e| e.kubernetes && !wanted.contains(e.name.as_str()))
            .collect();
        for entry in unwanted {
            // Each removal is whole on its own; the next agent finds the rest unwanted again.
            if registry.stopping() {
                info!("stopping: the rest of the pass is left to the next agent");
                return;
            }
            remove(&mut registry, entry);
        }

        let mut index: Option<ProcIndex> = None;
        let mut counts = [
            (MetricState::Ebpf, 0),
            (MetricState::Iptables, 0),
            (MetricState::Pending, 0),
            (MetricState::Skipped, 0),
            (MetricState::Invalid, 0),
        ];
        for (pod, uid, name, decision) in &decided {
            if registry.stopping() {
                // The agent is stopping: the pods not reached yet are the next agent's.
                info!("stopping: the rest of the pass is left to the next agent");
                return;
            }
            let pod: &Pod = pod;
            let state = self.pods.entry(uid.clone()).or_default();
            state.name.clone_from(name);
            let ctx = Ctx {
                pod,
                uid,
                proc_root: &self.proc_root,
                events: &self.events,
            };
            match decision {
                Decision::Intercept {
                    mode,
                    spec,
                    because,
                } => {
                    // Switching modes, the registry removes what the old mode applied.
                    if ctx.ensure(state, *mode, spec, &mut registry, &mut index) {
                        debug!(pod = %name, ?because, "intercepted");
                    }
                }
                Decision::Skip { reason } => {
                    if state.applied.take().is_some() {
                        info!(pod = %name, %reason, "interception turned off");
                    }
                    if let SkipReason::NotInjected { .. } = reason {
                        report(
                            &self.events,
                            pod,
                            state,
                            reason::SIDECAR_MISSING,
                            reason.to_string(),
                        );
                    } else {
                        state.problem = None;
                    }
                }
                Decision::Invalid {
                    annotation,
                    value,
                    error,
                } => {
                    state.applied = None;
                    let problem = format!(
                        "annotation {annotation}={value:?} is invalid ({error}); the pod is left \
                         un-intercepted until it is fixed"
                    );
                    report(
                        &self.events,
                        pod,
                        state,
                        reason::INVALID_ANNOTATION,
                        problem,
                    );
                }
            }
            let counted = match (decision, &state.applied) {
                (Decision::Intercept { .. }, Some(a)) if a.mode == Mode::Ebpf => MetricState::Ebpf,
                (Decision::Intercept { .. }, Some(_)) => MetricState::Iptables,
                (Decision::Intercept { .. }, None) => MetricState::Pending,
                (Decision::Skip { .. }, _) => MetricState::Skipped,
                (Decision::Invalid { .. }, _) => MetricState::Invalid,
            };
            if let Some(c) = counts.iter_mut().find(|(s, _)| *s == counted) {
                c.1 += 1;
            }
        }
        self.metrics.set_pods(&counts);
        // Read once after the loop, not after every pod it enabled (that was a copy of every
        // entry per pod: O(pods²) in an agent's first pass after a restart).
        let entries = self::entries(&registry);

        // Stale duplicates: an older entry under the name of a pod now applied elsewhere (its
        // sandbox was recreated while no agent ran).
        let current: HashSet<u32> = self
            .pods
            .values()
            .filter_map(|s| s.applied.as_ref().map(|a| a.id))
            .collect();
        let applied_names: HashSet<&str> = self
            .pods
            .values()
            .filter(|s| s.applied.is_some())
            .map(|s| s.name.as_str())
            .collect();
        for entry in &entries {
            if registry.stopping() {
                return;
            }
            if entry.kubernetes
                && !current.contains(&entry.id)
                && applied_names.contains(entry.name.as_str())
            {
                remove(&mut registry, entry);
            }
        }
    }
}

fn remove(registry: &mut Registry<'_>, entry: &Entry) {
    match registry.disable(&PodRef::Id(entry.id)) {
        Ok(_) => info!(pod = %entry.name, id = entry.id, "interception removed"),
        Err(err) => warn!(pod = %entry.name, %err, "removing interception"),
    }
}

/// What the controller needs to know of a registry entry.
struct Entry {
    id: u32,
    name: String,
    kubernetes: bool,
}

/// The registry's entries, read cheaply (names only, not their rules): every pass reads them.
fn entries(registry: &Registry<'_>) -> Vec<Entry> {
    registry
        .infos()
        .into_iter()
        .map(|(id, info)| Entry {
            id,
            name: registry::pod_name(&info),
            kubernetes: info.source == SOURCE_KUBERNETES,
        })
        .collect()
}

struct Ctx<'a> {
    pod: &'a Pod,
    uid: &'a str,
    proc_root: &'a Path,
    events: &'a EventSink,
}

impl Ctx<'_> {
    /// Makes sure the pod is enabled in `mode` with `spec` in its current network namespace.
    /// Returns whether the registry changed.
    fn ensure(
        &self,
        state: &mut PodState,
        mode: Mode,
        spec: &PodSpec,
        registry: &mut Registry<'_>,
        index: &mut Option<ProcIndex>,
    ) -> bool {
        // Its entry as the registry holds it now (one lookup: an enable earlier in this pass
        // may have taken over this pod's addresses and removed it).
        if let Some(applied) = &state.applied
            && applied.mode == mode
            && applied.spec == *spec
            && registry
                .info(applied.id)
                .is_some_and(|i| registry::pod_name(&i) == state.name)
            && procfs::still_in(self.proc_root, applied.pid, applied.netns)
        {
            return false;
        }
        let Some(located) = self.locate(state, index) else {
            return false;
        };
        // The sandbox was recreated (new namespace): drop the old entry first so the new one
        // can take over its addresses.
        if let Some(old) = &state.applied
            && old.netns != (located.netns.dev, located.netns.ino)
        {
            info!(pod = %state.name, "pod network namespace changed (sandbox restart)");
            let _ = registry.disable(&PodRef::Id(old.id));
            state.applied = None;
        }
        let source = PodSource::Kubernetes {
            name: state.name.clone(),
            pid: located.pid,
        };
        let registry_mode = match mode {
            // DNS capture needs the datapath's sendmsg/recvmsg programs: auto keeps eBPF when
            // they are attached and falls back to istio-iptables' rules when not.
            Mode::Ebpf if spec.dns.enabled => Mode::Auto,
            mode => mode,
        };
        // The nameservers of the pod's own resolv.conf; unreadable → every port-53
        // destination, as istio-cni does.
        let mut effective = spec.clone();
        if let Err(err) = effective
            .dns
            .fill_nameservers(&registry::spec::pod_resolv_conf(None, Some(located.pid)))
        {
            debug!(pod = %state.name, %err, "DNS capture of every port-53 destination");
        }
        // The backend the pod's namespace already uses, as istio-iptables would.
        match registry.enable_with(
            &located.netns,
            &source,
            &effective,
            registry_mode,
            BackendChoice::Auto,
        ) {
            Ok(entry) => {
                info!(
                    pod = %state.name,
                    id = entry.id,
                    mode = entry.mode,
                    pid = located.pid,
                    by_ip = located.by_ip,
                    addresses = ?entry.addresses,
                    inbound = entry.inbound,
                    "pod intercepted"
                );
                warn_if_ip_missing(self.pod, &state.name, &entry.addresses);
                state.applied = Some(Applied {
                    id: entry.id,
                    mode,
                    pid: located.pid,
                    netns: (located.netns.dev, located.netns.ino),
                    spec: spec.clone(),
                });
                state.problem = None;
                state.retry_at = None;
                state.failures = 0;
                true
            }
            Err(err) => {
                let problem = format!("enabling interception ({mode:?} mode) failed: {err}");
                report(
                    self.events,
                    self.pod,
                    state,
                    reason::INTERCEPTION_FAILED,
                    problem,
                );
                self.failed(state);
                false
            }
        }
    }

    /// Finds the pod on the node, unless a recent attempt failed and the pod did not change
    /// since (backoff). Reports what is worth reporting.
    fn locate(
        &self,
        state: &mut PodState,
        index: &mut Option<ProcIndex>,
    ) -> Option<procfs::Located> {
        let version = self.pod.resource_version();
        if let Some(at) = state.retry_at
            && Instant::now() < at
            && version == state.failed_version
        {
            return None;
        }
        let index = index.get_or_insert_with(|| ProcIndex::scan(self.proc_root));
        match index.locate(self.uid, &pod_ips(self.pod)) {
            Ok(located) => Some(located),
            Err(err) => {
                // Not running yet is the normal state of a starting pod: no event for that.
                if matches!(err, procfs::Error::NotRunning { .. }) {
                    debug!(pod = %state.name, %err, "pod not found on this node yet");
                } else {
                    let problem = format!("cannot find the pod on this node: {err}");
                    report(
                        self.events,
                        self.pod,
                        state,
                        reason::INTERCEPTION_FAILED,
                        problem,
                    );
                }
                self.failed(state);
                None
            }
        }
    }

    fn failed(&self, state: &mut PodState) {
        state.failures = state.failures.saturating_add(1);
        let delay = RETRY_FIRST
            .saturating_mul(1 << state.failures.min(8))
            .min(RETRY_MAX);
        state.retry_at = Some(Instant::now() + delay);
        state.failed_version = self.pod.resource_version();
    }
}

/// Logs and posts a problem once (until it changes or goes away).
fn report(
    events: &EventSink,
    pod: &Pod,
    state: &mut PodState,
    reason: &'static str,
    problem: String,
) {
    if state.problem.as_deref() == Some(problem.as_str()) {
        return;
    }
    warn!(pod = %state.name, reason, "{problem}");
    events.warn(pod, reason, &problem);
    state.problem = Some(problem);
}

fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let status = pod.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if let Some(ip) = status
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|s| s.parse().ok())
        && !ips.contains(&ip)
    {
        ips.push(ip);
    }
    ips
}

/// The API's pod IP should be one of the namespace's addresses; if not, something (CNI still
/// configuring, or a wrong namespace) deserves a look.
fn warn_if_ip_missing(pod: &Pod, name: &str, addresses: &[IpAddr]) {
    let missing: Vec<IpAddr> = pod_ips(pod)
        .into_iter()
        .filter(|ip| !addresses.contains(ip))
        .collect();
    if !missing.is_empty() {
        warn!(pod = %name, ?missing, ?addresses, "the pod's API address is not in its network namespace (yet)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_names_fit_and_stay_stable() {
        assert_eq!(registry_name("shop", "web-0"), "shop/web-0");
        let long = "x".repeat(253);
        let a = registry_name("default", &long);
        let b = registry_name("default", &long);
        assert_eq!(a, b);
        assert_eq!(a.len(), interceptor_common::pod::POD_NAME_LEN);
        let c = registry_name("default", &format!("{}y", &long[1..]));
        assert_ne!(a, c, "different pods, different names");
    }
}
