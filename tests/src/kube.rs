//! Kubernetes pods for the end-to-end tests: lab pods (netns + veth + cgroup) whose cgroup path
//! carries a pod UID the way kubelet names it, the pod and namespace objects the fake API
//! serves for them, and a kubeconfig pointing the agent at that fake.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use interceptor_lab::lab::LabPod;
use serde_json::{Value, json};

use crate::{Harness, fake_api::FakeApi};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// One test's API server, kubeconfig and node name.
pub struct KubeEnv {
    pub api: FakeApi,
    pub kubeconfig: PathBuf,
    pub node: String,
}

impl KubeEnv {
    pub fn new(h: &Harness) -> Self {
        let api = FakeApi::start();
        let kubeconfig = std::env::temp_dir().join(format!("{}-kubeconfig", h.lab.name));
        api.write_kubeconfig(&kubeconfig);
        Self {
            api,
            kubeconfig,
            node: format!("node-{}", h.lab.name),
        }
    }
}

impl Drop for KubeEnv {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// A fresh pod UID (a UUID, as the API server assigns).
pub fn new_uid() -> String {
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        std::process::id(),
        seq & 0xffff,
        (nanos >> 20) & 0xfff,
        (nanos >> 8) & 0xfff,
        u64::from(nanos) << 8 | u64::from(seq & 0xff)
    )
}

/// How kubelet names a pod's cgroup.
#[derive(Clone, Copy, Debug)]
pub enum Driver {
    /// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid with _>.slice/…`
    Systemd,
    /// `kubepods/besteffort/pod<uid>/…`
    Cgroupfs,
}

/// The same pod with its processes' cgroup under a kubelet-style path for `uid` (created inside
/// the lab pod's cgroup, so the lab removes it).
pub fn kubelet_cgroup(pod: &LabPod, uid: &str, driver: Driver) -> LabPod {
    let base = pod.cgroup.as_ref().expect("the lab needs cgroup v2");
    let container = format!("{:064x}", u128::from(SEQ.fetch_add(1, Ordering::Relaxed)));
    let dir = match driver {
        Driver::Systemd => {
            let u = uid.replace('-', "_");
            base.join("kubepods.slice")
                .join("kubepods-besteffort.slice")
                .join(format!("kubepods-besteffort-pod{u}.slice"))
                .join(format!("cri-containerd-{container}.scope"))
        }
        Driver::Cgroupfs => base
            .join("kubepods")
            .join("besteffort")
            .join(format!("pod{uid}"))
            .join(container),
    };
    std::fs::create_dir_all(&dir).expect("creating the kubelet-style cgroup");
    LabPod {
        cgroup: Some(dir),
        ..pod.clone()
    }
}

/// A Running pod object on `node` with these annotations and containers.
pub fn pod_object(
    namespace: &str,
    name: &str,
    uid: &str,
    node: &str,
    ip: Ipv4Addr,
    annotations: &[(&str, &str)],
    containers: &[&str],
) -> Value {
    let annotations: serde_json::Map<String, Value> = annotations
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    let containers: Vec<Value> = containers
        .iter()
        .map(|c| json!({"name": c, "image": format!("example/{c}:1")}))
        .collect();
    json!({
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "annotations": annotations},
        "spec": {"nodeName": node, "containers": containers},
        "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]},
    })
}

pub fn namespace_object(name: &str, labels: &[(&str, &str)]) -> Value {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    json!({"metadata": {"name": name, "labels": labels}, "spec": {}, "status": {"phase": "Active"}})
}

/// Sets (or with None removes) annotations of a pod object.
pub fn set_annotations(pod: &mut Value, changes: &[(&str, Option<&str>)]) {
    let map = pod["metadata"]["annotations"]
        .as_object_mut()
        .expect("annotations");
    for (k, v) in changes {
        match v {
            Some(v) => {
                map.insert((*k).to_owned(), json!(v));
            }
            None => {
                map.remove(*k);
            }
        }
    }
}
