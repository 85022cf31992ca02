//! The deployment manifests, checked the way the API server would: every document parses into
//! its k8s-openapi type *and nothing is dropped on the way* (serde ignores unknown fields, so a
//! typo such as `hostPid` would otherwise pass), plus the rules of this agent's deployment:
//! least-privilege RBAC, named capabilities instead of `privileged`, the host mounts, probes,
//! node placement. The Helm chart is rendered by real Helm (the binary, or Helm v4's library from
//! PyPI via deploy/check.py) and checked the same way. `cargo xtask lint` also lints the chart
//! strictly and validates everything against the Kubernetes schemas.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Namespace, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|doc| {
            let value: Value = serde::Deserialize::deserialize(doc).expect("valid YAML");
            value
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Every field of `original` must survive the typed round trip, with the same value.
fn assert_nothing_dropped(original: &Value, typed: &Value, path: &str) {
    match (original, typed) {
        (Value::Object(o), Value::Object(t)) => {
            for (k, v) in o {
                let here = format!("{path}.{k}");
                let Some(tv) = t.get(k) else {
                    panic!("{here}: not a field of this Kubernetes type (typo or wrong place?)");
                };
                assert_nothing_dropped(v, tv, &here);
            }
        }
        (Value::Array(o), Value::Array(t)) => {
            assert_eq!(o.len(), t.len(), "{path}: list length changed");
            for (i, (ov, tv)) in o.iter().zip(t).enumerate() {
                assert_nothing_dropped(ov, tv, &format!("{path}[{i}]"));
            }
        }
        // Numbers written as strings where the type is IntOrString/Quantity round-trip as-is.
        (o, t) => assert_eq!(o, t, "{path}: value changed in the typed round trip"),
    }
}

fn strict<T: DeserializeOwned + Serialize>(doc: &Value) -> T {
    let kind = doc["kind"].as_str().unwrap_or("?");
    let name = doc["metadata"]["name"].as_str().unwrap_or("?");
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{kind} {name} does not parse: {e}"));
    let back = serde_json::to_value(&typed).expect("serialise");
    assert_nothing_dropped(doc, &back, &format!("{kind}/{name}"));
    typed
}

#[derive(Default)]
struct Objects {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    ns_roles: Vec<Role>,
    ns_bindings: Vec<RoleBinding>,
    daemonsets: Vec<DaemonSet>,
}

fn parse(yaml: &str) -> Objects {
    let mut out = Objects::default();
    for doc in documents(yaml) {
        match (doc["apiVersion"].as_str(), doc["kind"].as_str()) {
            (Some("v1"), Some("Namespace")) => out.namespaces.push(strict(&doc)),
            (Some("v1"), Some("ServiceAccount")) => out.service_accounts.push(strict(&doc)),
            (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRole")) => {
                out.roles.push(strict(&doc))
            }
            (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRoleBinding")) => {
                out.bindings.push(strict(&doc))
            }
            (Some("rbac.authorization.k8s.io/v1"), Some("Role")) => out.ns_roles.push(strict(&doc)),
            (Some("rbac.authorization.k8s.io/v1"), Some("RoleBinding")) => {
                out.ns_bindings.push(strict(&doc))
            }
            (Some("apps/v1"), Some("DaemonSet")) => out.daemonsets.push(strict(&doc)),
            other => panic!("unexpected object {other:?} in the manifests"),
        }
    }
    out
}

/// The rules the agent's deployment must follow, whichever way it is rendered.
fn check(objects: &Objects) {
    // RBAC: read pods and namespaces, create events; nothing else, no wildcards.
    assert_eq!(objects.roles.len(), 1);
    let rules = objects.roles[0].rules.as_ref().expect("rules");
    let mut granted = BTreeSet::new();
    for rule in rules {
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    assert_ne!(verb, "*", "no wildcard verbs");
                    assert_ne!(resource, "*", "no wildcard resources");
                    granted.insert(format!("{group}/{resource}:{verb}"));
                }
            }
        }
    }
    let expected: BTreeSet<String> = [
        "/pods:get",
        "/pods:list",
        "/pods:watch",
        "/namespaces:get",
        "/namespaces:list",
        "/namespaces:watch",
        "events.k8s.io/events:create",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    assert_eq!(granted, expected);

    assert_eq!(objects.daemonsets.len(), 1);
    let ds = &objects.daemonsets[0];

    // In its own namespace: get its own DaemonSet, by name, and nothing else (the stop-time
    // "is this an uninstall?" question).
    assert_eq!(objects.ns_roles.len(), 1);
    assert_eq!(objects.ns_bindings.len(), 1);
    let role = &objects.ns_roles[0];
    assert_eq!(role.metadata.namespace, ds.metadata.namespace);
    let rules = role.rules.as_ref().expect("rules");
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0].api_groups.as_deref(),
        Some(&["apps".to_owned()][..])
    );
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["daemonsets".to_owned()][..])
    );
    assert_eq!(rules[0].verbs, ["get", "list", "watch"]);
    assert_eq!(
        rules[0].resource_names.as_deref(),
        Some(std::slice::from_ref(
            ds.metadata.name.as_ref().expect("name")
        ))
    );
    let ns_binding = &objects.ns_bindings[0];
    assert_eq!(ns_binding.role_ref.kind, "Role");
    assert_eq!(Some(&ns_binding.role_ref.name), role.metadata.name.as_ref());
    let sa = &objects.service_accounts[0];
    let binding = &objects.bindings[0];
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(
        Some(&binding.role_ref.name),
        objects.roles[0].metadata.name.as_ref()
    );
    let subject = &binding.subjects.as_ref().expect("subjects")[0];
    assert_eq!(subject.kind, "ServiceAccount");
    assert_eq!(Some(&subject.name), sa.metadata.name.as_ref());
    assert_eq!(subject.namespace, sa.metadata.namespace);
    assert_eq!(ds.metadata.namespace, sa.metadata.namespace);

    let spec = ds.spec.as_ref().expect("spec");
    let template_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone());
    for (k, v) in spec.selector.match_labels.as_ref().expect("selector") {
        assert_eq!(
            template_labels.as_ref().and_then(|l| l.get(k)),
            Some(v),
            "selector label {k} on the pod template"
        );
    }
    assert_eq!(
        template_labels
            .as_ref()
            .and_then(|l| l.get("sidecar.istio.io/inject"))
            .map(String::as_str),
        Some("false"),
        "the agent is never meshed itself"
    );
    let rolling = spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.rolling_update.as_ref())
        .expect("rolling update");
    assert_eq!(
        rolling.max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(0)),
        "upgrades never leave a node without an agent"
    );

    let pod = spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.host_pid, Some(true), "hostPID: pods' /proc entries");
    assert_ne!(pod.host_network, Some(true), "no host network needed");
    assert_eq!(pod.service_account_name, sa.metadata.name);
    let terms = &pod
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .expect("kernel affinity")
        .node_selector_terms;
    let keys: BTreeSet<&str> = terms
        .iter()
        .flat_map(|t| t.match_expressions.iter().flatten())
        .map(|e| e.key.as_str())
        .collect();
    assert!(keys.contains("feature.node.kubernetes.io/kernel-version.major"));
    assert!(keys.contains("feature.node.kubernetes.io/kernel-version.minor"));

    assert_eq!(pod.containers.len(), 1);
    let agent = &pod.containers[0];
    let args = agent.args.as_ref().expect("args");
    assert_eq!(args[0], "agent");
    assert!(args.iter().any(|a| a == "--kube"));
    let health_port = args
        .iter()
        .find_map(|a| a.strip_prefix("--health-addr=0.0.0.0:"))
        .and_then(|p| p.parse::<i32>().ok())
        .expect("--health-addr");
    let named = agent
        .ports
        .as_ref()
        .and_then(|p| p.iter().find(|p| p.name.as_deref() == Some("health")))
        .expect("health port");
    assert_eq!(named.container_port, health_port);
    let probe = agent
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("readiness probe");
    assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
    let node_name = agent
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(node_name, Some("spec.nodeName"));
    // The agent knows its DaemonSet, so a stop uninstalls only when the DaemonSet goes.
    let daemonset = agent
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "INTERCEPTOR_DAEMONSET")
        .and_then(|e| e.value.clone());
    assert_eq!(
        daemonset,
        Some(format!(
            "{}/{}",
            ds.metadata.namespace.as_deref().unwrap_or_default(),
            ds.metadata.name.as_deref().unwrap_or_default()
        ))
    );

    let sc = agent.security_context.as_ref().expect("securityContext");
    assert_ne!(
        sc.privileged,
        Some(true),
        "named capabilities, not privileged"
    );
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert_eq!(
        added,
        // interceptor::capabilities: BPF and PERFMON are covered by SYS_ADMIN.
        [
            "NET_ADMIN",
            "SYS_ADMIN",
            "SYS_RESOURCE",
            "SYS_PTRACE",
            "NET_RAW"
        ]
        .into_iter()
        .collect()
    );
    // The API server's own rule (ValidateSecurityContext).
    assert!(
        !(sc.allow_privilege_escalation == Some(false) && added.contains("SYS_ADMIN")),
        "allowPrivilegeEscalation: false is rejected together with SYS_ADMIN"
    );

    // Host mounts: bpffs (pins), the cgroup v2 root (attach point, passed as --cgroup), the
    // shared run directory (locks).
    let volumes = pod.volumes.as_ref().expect("volumes");
    let mounts = agent.volume_mounts.as_ref().expect("mounts");
    let mount_of = |path: &str| {
        mounts
            .iter()
            .find(|m| m.mount_path == path)
            .and_then(|m| volumes.iter().find(|v| v.name == m.name))
            .and_then(|v| v.host_path.as_ref())
            .map(|h| h.path.clone())
            .unwrap_or_else(|| panic!("no hostPath mounted at {path}"))
    };
    assert!(mount_of("/sys/fs/bpf").starts_with("/sys/fs/bpf"));
    assert!(mount_of("/run/interceptor").starts_with("/run/interceptor"));
    let cgroup_arg = args
        .iter()
        .find_map(|a| a.strip_prefix("--cgroup="))
        .expect("--cgroup");
    assert!(mount_of(cgroup_arg).starts_with("/sys/fs/cgroup"));
    for m in mounts {
        assert!(
            volumes.iter().any(|v| v.name == m.name),
            "mount {} has a volume",
            m.name
        );
    }
}

#[test]
fn plain_manifests_parse_into_kubernetes_types_and_follow_the_rules() {
    let yaml = std::fs::read_to_string(deploy_dir().join("kubernetes/interceptor.yaml"))
        .expect("deploy/kubernetes/interceptor.yaml");
    let objects = parse(&yaml);
    assert_eq!(objects.namespaces.len(), 1);
    let ns = &objects.namespaces[0];
    let labels = ns.metadata.labels.as_ref().expect("labels");
    assert_eq!(
        labels.get("istio-injection").map(String::as_str),
        Some("disabled")
    );
    check(&objects);
}

#[test]
fn the_strict_parse_catches_a_misspelt_field() {
    // The check above is only worth something if it fails on a schema mistake.
    let yaml = std::fs::read_to_string(deploy_dir().join("kubernetes/interceptor.yaml"))
        .expect("manifest");
    let broken = yaml.replace("hostPID: true", "hostPid: true");
    assert_ne!(broken, yaml);
    let result = std::panic::catch_unwind(|| parse(&broken));
    assert!(result.is_err(), "a misspelt field must fail the parse");
}

#[test]
fn helm_chart_renders_the_same_rules() {
    let chart = deploy_dir().join("helm/interceptor");
    // What can be checked without helm: the chart's own files.
    let meta: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(chart.join("Chart.yaml")).expect("Chart.yaml"),
    )
    .expect("Chart.yaml is YAML");
    assert_eq!(meta["apiVersion"], "v2");
    assert_eq!(meta["name"], "interceptor");
    let _: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(chart.join("values.yaml")).expect("values.yaml"),
    )
    .expect("values.yaml is YAML");

    // Real Helm: the helm binary when installed, else Helm v4's library from PyPI
    // (helm-python-sdk, which `cargo xtask setup` installs) through deploy/check.py.
    let rendered = match Command::new("helm")
        .args([
            "template",
            "interceptor",
            "--namespace",
            "interceptor-system",
        ])
        .arg(&chart)
        .output()
    {
        Ok(out) => out,
        Err(_) => match Command::new("python3")
            .arg(deploy_dir().join("check.py"))
            .arg("render")
            .output()
        {
            Ok(out) => out,
            Err(err) => {
                eprintln!(
                    "NOTE: neither helm nor python3 is here ({err}); the chart was not rendered. \
                     Run `cargo xtask setup` (installs helm-python-sdk)."
                );
                return;
            }
        },
    };
    let out = rendered;
    assert!(
        out.status.success(),
        "rendering the chart failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let objects = parse(&String::from_utf8_lossy(&out.stdout));
    check(&objects);
}
