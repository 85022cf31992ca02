//! What a pod's metadata says about its interception: Istio's own annotations and labels (so the
//! agent drops into an existing mesh) plus `interceptor.dev/*` overrides, turned into one
//! [`Decision`]. Pure functions of the pod and its namespace: no I/O, unit-tested below.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Namespace, Pod};
use serde::Serialize;

use crate::registry::{
    Mode,
    spec::{PodSpec, SpecError, Switch},
};

/// Istio: whether the injector should add a sidecar (label preferred, annotation accepted).
pub const INJECT: &str = "sidecar.istio.io/inject";
/// Istio: written by the injector on every pod it injected.
pub const STATUS: &str = "sidecar.istio.io/status";
/// Istio: `REDIRECT` (default), `TPROXY` or `NONE`.
pub const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
pub const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
/// Istio: the pod's ProxyConfig overrides (YAML); `proxyMetadata.ISTIO_META_DNS_CAPTURE`
/// turns DNS capture on.
pub const PROXY_CONFIG: &str = "proxy.istio.io/config";
/// Ours: `ebpf`, `iptables` or `off`; wins over everything Istio's metadata says.
pub const MODE: &str = "interceptor.dev/mode";
/// Ours: `off` keeps the pod's app↔proxy hop on loopback TCP (see README, sockmap reads).
pub const SOCKMAP: &str = "interceptor.dev/sockmap";
/// Ours: `open` lets a connect the datapath cannot send through the proxy go direct; `closed`
/// (the default) refuses it, as Istio never lets such a connection bypass the sidecar.
pub const FAILURE_POLICY: &str = "interceptor.dev/failurePolicy";
/// Namespace label: `enabled` or `disabled`.
pub const NAMESPACE_INJECTION: &str = "istio-injection";
/// Namespace label: revision-based injection.
pub const NAMESPACE_REVISION: &str = "istio.io/rev";
/// The container Istio's injector adds.
pub const PROXY_CONTAINER: &str = "istio-proxy";
/// A container declaring this port is a proxy following Istio's conventions.
pub const PROXY_OUTBOUND_PORT: i32 = 15001;
/// Istio's default proxy identity.
pub const DEFAULT_PROXY_ID: u32 = 1337;

/// Why a pod is intercepted (logged, so an operator can tell which rule matched).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Because {
    /// `interceptor.dev/mode` named the mode.
    ModeAnnotation,
    /// Istio's injector marked it (`sidecar.istio.io/status`).
    Injected,
    /// It has an `istio-proxy` container (or native sidecar).
    ProxyContainer,
    /// A container declares the proxy's outbound port 15001.
    ProxyPort,
    /// `sidecar.istio.io/inject` asks for a sidecar on the pod itself.
    InjectRequested,
}

/// Why a pod is left alone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// `spec.hostNetwork`: its sockets are the node's; never intercepted, whatever it asks.
    HostNetwork,
    /// `status.phase` Succeeded or Failed.
    Finished,
    /// `interceptor.dev/mode: off`.
    ModeOff,
    /// `sidecar.istio.io/interceptionMode: NONE`.
    InterceptionNone,
    /// Its namespace asks for injection, but the pod has no sidecar (it was created before the
    /// label, or the injector was not running): capturing it would send its traffic to a proxy
    /// that does not exist.
    NotInjected { policy: String },
    /// Nothing marks it as part of the mesh.
    NotMeshed,
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkipReason::HostNetwork => f.write_str("host network pod"),
            SkipReason::Finished => f.write_str("pod has finished"),
            SkipReason::ModeOff => write!(f, "{MODE}: off"),
            SkipReason::InterceptionNone => write!(f, "{INTERCEPTION_MODE}: NONE"),
            SkipReason::NotInjected { policy } => write!(
                f,
                "{policy} asks for a sidecar but the pod has none (created before injection was \
                 enabled?): restart it to get one"
            ),
            SkipReason::NotMeshed => f.write_str("no sidecar"),
        }
    }
}

/// What to do with one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Intercept {
        mode: Mode,
        spec: Box<PodSpec>,
        because: Because,
    },
    Skip {
        reason: SkipReason,
    },
    /// A value the agent cannot honour: the pod is left un-intercepted (never half-configured).
    Invalid {
        annotation: &'static str,
        value: String,
        error: String,
    },
}

/// The namespace's injection policy, as Istio's webhooks select namespaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamespacePolicy {
    /// `istio-injection=enabled`, or `istio.io/rev` without an `istio-injection` label.
    Enabled(String),
    /// `istio-injection=disabled` (or any other value): never injected.
    Disabled,
    /// No label: only pods that ask (`sidecar.istio.io/inject: "true"`) are injected.
    Unset,
}

pub fn namespace_policy(ns: Option<&Namespace>) -> NamespacePolicy {
    let labels = ns.and_then(|n| n.metadata.labels.as_ref());
    let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    match (label(NAMESPACE_INJECTION), label(NAMESPACE_REVISION)) {
        (Some("enabled"), _) => {
            NamespacePolicy::Enabled(format!("namespace label {NAMESPACE_INJECTION}=enabled"))
        }
        (Some(_), _) => NamespacePolicy::Disabled,
        (None, Some(rev)) => {
            NamespacePolicy::Enabled(format!("namespace label {NAMESPACE_REVISION}={rev}"))
        }
        (None, None) => NamespacePolicy::Unset,
    }
}

/// `sidecar.istio.io/inject`, read as Istio's injector reads it: the label wins over the
/// annotation; y/yes/true/on (any case) is true, empty is "unset", anything else is false.
fn inject_request(pod: &Pod) -> Option<bool> {
    let meta = &pod.metadata;
    let value = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(INJECT))
        .or_else(|| meta.annotations.as_ref().and_then(|a| a.get(INJECT)))?;
    match value.to_ascii_lowercase().as_str() {
        "" => None,
        "y" | "yes" | "true" | "on" => Some(true),
        _ => Some(false),
    }
}

fn containers(pod: &Pod) -> impl Iterator<Item = &Container> {
    let spec = pod.spec.as_ref();
    let main = spec.map(|s| s.containers.iter()).into_iter().flatten();
    // Native sidecars (Istio >= 1.27 can inject istio-proxy as an init container that keeps
    // running).
    let init = spec
        .and_then(|s| s.init_containers.as_ref())
        .map(|c| c.iter())
        .into_iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    main.chain(init)
}

/// Evidence that the pod really runs a sidecar proxy.
fn sidecar_evidence(pod: &Pod, annotations: &BTreeMap<String, String>) -> Option<Because> {
    if annotations.contains_key(STATUS) {
        return Some(Because::Injected);
    }
    if containers(pod).any(|c| c.name == PROXY_CONTAINER) {
        return Some(Because::ProxyContainer);
    }
    containers(pod)
        .any(|c| {
            c.ports
                .iter()
                .flatten()
                .any(|p| p.container_port == PROXY_OUTBOUND_PORT)
        })
        .then_some(Because::ProxyPort)
}

/// Where the proxy identity comes from, named in the event when it cannot be used.
pub const PROXY_SECURITY_CONTEXT: &str = "istio-proxy securityContext runAsUser/runAsGroup";

/// The proxy's UID/GID: the `istio-proxy` container's `runAsUser`/`runAsGroup` (OpenShift and
/// other platforms pick their own), else Istio's 1337. Never root: a root proxy (Istio's
/// TPROXY mode: `runAsUser: 0`, `runAsGroup: 1337`) is exempted by its group, and its UID slot
/// keeps 1337 as istio-iptables' `--uid-owner 1337`; one running as UID 0 *and* GID 0 cannot
/// be told from the app's root processes, so the pod is refused rather than left open.
fn proxy_identity(pod: &Pod) -> Result<(u32, u32), (&'static str, String, String)> {
    let ctx = containers(pod)
        .find(|c| c.name == PROXY_CONTAINER)
        .and_then(|c| c.security_context.as_ref());
    let id = |v: Option<i64>| {
        v.and_then(|v| u32::try_from(v).ok())
            .unwrap_or(DEFAULT_PROXY_ID)
    };
    let (uid, gid) = (
        id(ctx.and_then(|c| c.run_as_user)),
        id(ctx.and_then(|c| c.run_as_group)),
    );
    match (uid, gid) {
        (0, 0) => Err((
            PROXY_SECURITY_CONTEXT,
            "0/0".to_owned(),
            "the proxy runs as root with group 0: exempting it would let every root process \
             of the pod bypass the sidecar; run it with runAsGroup: 1337 (Istio's default)"
                .to_owned(),
        )),
        (0, gid) => Ok((DEFAULT_PROXY_ID, gid)),
        (uid, 0) => Ok((uid, DEFAULT_PROXY_ID)),
        ids => Ok(ids),
    }
}

fn parse_mode(value: &str) -> Result<Option<Mode>, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "off" => Ok(None),
        other => other
            .parse()
            .map(Some)
            .map_err(|e: String| format!("{e}, off")),
    }
}

/// Decides what to do with `pod`, given its namespace (None while the namespace is unknown).
pub fn decide(pod: &Pod, namespace: Option<&Namespace>) -> Decision {
    decide_with(pod, namespace, false)
}

/// [`decide`], with the mesh-wide DNS capture default (`agent --dns-capture`).
pub fn decide_with(pod: &Pod, namespace: Option<&Namespace>, mesh_dns_capture: bool) -> Decision {
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return Decision::Skip {
            reason: SkipReason::HostNetwork,
        };
    }
    if let Some("Succeeded" | "Failed") = pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
        return Decision::Skip {
            reason: SkipReason::Finished,
        };
    }
    let invalid = |annotation: &'static str, value: &str, error: String| Decision::Invalid {
        annotation,
        value: value.to_owned(),
        error,
    };

    let (mode, because) = match annotations.get(MODE) {
        Some(value) => match parse_mode(value) {
            Ok(Some(mode)) => (mode, Because::ModeAnnotation),
            Ok(None) => {
                return Decision::Skip {
                    reason: SkipReason::ModeOff,
                };
            }
            Err(error) => return invalid(MODE, value, error),
        },
        None => {
            if let Some(value) = annotations.get(INTERCEPTION_MODE) {
                match value.trim().to_ascii_uppercase().as_str() {
                    "NONE" => {
                        return Decision::Skip {
                            reason: SkipReason::InterceptionNone,
                        };
                    }
                    // TPROXY keeps the client's address on the inbound hop; sk_lookup does too.
                    "REDIRECT" | "TPROXY" => {}
                    _ => {
                        return invalid(
                            INTERCEPTION_MODE,
                            value,
                            "expected one of REDIRECT, TPROXY, NONE".into(),
                        );
                    }
                }
            }
            let because = match (sidecar_evidence(pod, annotations), inject_request(pod)) {
                (Some(evidence), _) => evidence,
                (None, Some(true)) if namespace_policy(namespace) != NamespacePolicy::Disabled => {
                    Because::InjectRequested
                }
                (None, request) => {
                    let reason = match namespace_policy(namespace) {
                        NamespacePolicy::Enabled(policy) if request != Some(false) => {
                            SkipReason::NotInjected { policy }
                        }
                        _ => SkipReason::NotMeshed,
                    };
                    return Decision::Skip { reason };
                }
            };
            (Mode::Ebpf, because)
        }
    };

    match pod_spec(pod, annotations, mesh_dns_capture) {
        Ok(spec) => Decision::Intercept {
            mode,
            spec: Box::new(spec),
            because,
        },
        Err((annotation, value, error)) => invalid(annotation, &value, error),
    }
}

/// The capture settings from the `traffic.sidecar.istio.io/*` annotations (Istio's defaults
/// for what is absent), or the first annotation that does not parse.
fn pod_spec(
    pod: &Pod,
    annotations: &BTreeMap<String, String>,
    mesh_dns_capture: bool,
) -> Result<PodSpec, (&'static str, String, String)> {
    let get = |k: &str| annotations.get(k).map(String::as_str);
    let bad = |annotation: &'static str| {
        move |e: SpecError| {
            (
                annotation,
                annotations.get(annotation).cloned().unwrap_or_default(),
                e.to_string(),
            )
        }
    };
    let mut spec = PodSpec::default();
    for (switch, annotation) in [
        (Switch::IncludeInboundPorts, INCLUDE_INBOUND_PORTS),
        (Switch::ExcludeInboundPorts, EXCLUDE_INBOUND_PORTS),
        (Switch::IncludeOutboundPorts, INCLUDE_OUTBOUND_PORTS),
        (Switch::ExcludeOutboundPorts, EXCLUDE_OUTBOUND_PORTS),
        (Switch::IncludeOutboundCidrs, INCLUDE_OUTBOUND_IP_RANGES),
        (Switch::ExcludeOutboundCidrs, EXCLUDE_OUTBOUND_IP_RANGES),
        (Switch::Sockmap, SOCKMAP),
        (Switch::FailurePolicy, FAILURE_POLICY),
    ] {
        if let Some(v) = get(annotation) {
            spec.set(switch, annotation, v).map_err(bad(annotation))?;
        }
    }
    spec.dns.enabled = mesh_dns_capture;
    if let Some(v) = get(PROXY_CONFIG)
        && let Some(on) = dns_capture(v).map_err(|e| (PROXY_CONFIG, v.to_owned(), e))?
    {
        spec.dns.enabled = on;
    }
    (spec.proxy_uid, spec.proxy_gid) = proxy_identity(pod)?;
    Ok(spec)
}

/// `proxyMetadata.ISTIO_META_DNS_CAPTURE` of a `proxy.istio.io/config` value (Istio reads it
/// as a Go bool); None when the pod does not say.
fn dns_capture(proxy_config: &str) -> Result<Option<bool>, String> {
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(proxy_config)
        .map_err(|e| format!("not a YAML ProxyConfig: {e}"))?;
    let value = doc
        .get("proxyMetadata")
        .and_then(|m| m.get("ISTIO_META_DNS_CAPTURE"));
    let text = match value {
        None | Some(serde_yaml_ng::Value::Null) => return Ok(None),
        Some(serde_yaml_ng::Value::Bool(b)) => return Ok(Some(*b)),
        Some(serde_yaml_ng::Value::String(s)) => s.trim().to_ascii_lowercase(),
        Some(other) => format!("{other:?}"),
    };
    match text.as_str() {
        "true" | "1" | "t" => Ok(Some(true)),
        "false" | "0" | "f" => Ok(Some(false)),
        "" => Ok(None),
        _ => Err(format!(
            "proxyMetadata.ISTIO_META_DNS_CAPTURE: {text:?} is not true or false"
        )),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{ContainerPort, PodSpec as K8sPodSpec, PodStatus};
    use kube::api::ObjectMeta;

    use super::*;
    use crate::registry::spec::Selection;

    fn pod(annotations: &[(&str, &str)], containers: &[&str]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("shop".into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| ((*k).into(), (*v).into()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(K8sPodSpec {
                containers: containers
                    .iter()
                    .map(|n| Container {
                        name: (*n).into(),
                        ..Container::default()
                    })
                    .collect(),
                ..K8sPodSpec::default()
            }),
            status: None,
        }
    }

    fn ns(labels: &[(&str, &str)]) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some("shop".into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).into(), (*v).into()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        }
    }

    fn intercepted(d: &Decision) -> Option<(Mode, PodSpec, Because)> {
        match d {
            Decision::Intercept {
                mode,
                spec,
                because,
            } => Some((*mode, (**spec).clone(), *because)),
            _ => None,
        }
    }

    #[test]
    fn istio_injected_pods_are_intercepted_with_istio_defaults() {
        let p = pod(&[(STATUS, "{}")], &["app", "istio-proxy"]);
        let (mode, spec, because) = intercepted(&decide(&p, None)).expect("intercepted");
        assert_eq!(mode, Mode::Ebpf);
        assert_eq!(because, Because::Injected);
        assert_eq!(spec, PodSpec::default());
        let p = pod(&[], &["app", "istio-proxy"]);
        assert_eq!(
            intercepted(&decide(&p, None)).map(|i| i.2),
            Some(Because::ProxyContainer)
        );
    }

    #[test]
    fn a_container_declaring_15001_is_a_proxy() {
        let mut p = pod(&[], &["app", "mesh-proxy"]);
        p.spec.as_mut().unwrap().containers[1].ports = Some(vec![ContainerPort {
            container_port: 15001,
            ..ContainerPort::default()
        }]);
        assert_eq!(
            intercepted(&decide(&p, None)).map(|i| i.2),
            Some(Because::ProxyPort)
        );
    }

    #[test]
    fn native_sidecar_init_container_counts_but_plain_init_does_not() {
        let mut p = pod(&[], &["app"]);
        p.spec.as_mut().unwrap().init_containers = Some(vec![Container {
            name: PROXY_CONTAINER.into(),
            ..Container::default()
        }]);
        assert!(
            intercepted(&decide(&p, None)).is_none(),
            "runs to completion"
        );
        p.spec.as_mut().unwrap().init_containers.as_mut().unwrap()[0].restart_policy =
            Some("Always".into());
        assert!(intercepted(&decide(&p, None)).is_some());
    }

    #[test]
    fn inject_annotation_and_label_follow_istio() {
        for v in ["true", "TRUE", "yes", "y", "on"] {
            let p = pod(&[(INJECT, v)], &["app"]);
            assert_eq!(
                intercepted(&decide(&p, None)).map(|i| i.2),
                Some(Because::InjectRequested),
                "{v}"
            );
        }
        for v in ["false", "no", "nonsense"] {
            let p = pod(&[(INJECT, v)], &["app"]);
            assert_eq!(
                decide(&p, None),
                Decision::Skip {
                    reason: SkipReason::NotMeshed
                },
                "{v}"
            );
        }
        // The label wins over the annotation.
        let mut p = pod(&[(INJECT, "true")], &["app"]);
        p.metadata.labels = Some([(INJECT.to_owned(), "false".to_owned())].into());
        assert!(intercepted(&decide(&p, None)).is_none());
        // A namespace with injection disabled is never injected, whatever the pod asks.
        let p = pod(&[(INJECT, "true")], &["app"]);
        let disabled = ns(&[(NAMESPACE_INJECTION, "disabled")]);
        assert!(intercepted(&decide(&p, Some(&disabled))).is_none());
    }

    #[test]
    fn namespace_label_without_a_sidecar_is_reported_not_intercepted() {
        let p = pod(&[], &["app"]);
        for labels in [
            &[(NAMESPACE_INJECTION, "enabled")][..],
            &[(NAMESPACE_REVISION, "canary")][..],
        ] {
            match decide(&p, Some(&ns(labels))) {
                Decision::Skip {
                    reason: SkipReason::NotInjected { policy },
                } => assert!(policy.contains(labels[0].0), "{policy}"),
                other => panic!("{other:?}"),
            }
        }
        // Opted out: nothing to report.
        let p = pod(&[(INJECT, "false")], &["app"]);
        assert_eq!(
            decide(&p, Some(&ns(&[(NAMESPACE_INJECTION, "enabled")]))),
            Decision::Skip {
                reason: SkipReason::NotMeshed
            }
        );
        // With the sidecar injected by the namespace label, it is intercepted.
        let p = pod(&[(STATUS, "{}")], &["app", PROXY_CONTAINER]);
        assert!(intercepted(&decide(&p, Some(&ns(&[(NAMESPACE_INJECTION, "enabled")])))).is_some());
    }

    #[test]
    fn interception_mode_none_and_our_override() {
        let p = pod(&[(STATUS, "{}"), (INTERCEPTION_MODE, "NONE")], &["app"]);
        assert_eq!(
            decide(&p, None),
            Decision::Skip {
                reason: SkipReason::InterceptionNone
            }
        );
        for m in ["REDIRECT", "TPROXY"] {
            let p = pod(&[(STATUS, "{}"), (INTERCEPTION_MODE, m)], &["app"]);
            assert!(intercepted(&decide(&p, None)).is_some(), "{m}");
        }
        let p = pod(&[(STATUS, "{}"), (INTERCEPTION_MODE, "BPF")], &["app"]);
        assert!(matches!(
            decide(&p, None),
            Decision::Invalid { annotation: INTERCEPTION_MODE, ref value, .. } if value == "BPF"
        ));
        // interceptor.dev/mode wins, both ways.
        let p = pod(&[(STATUS, "{}"), (MODE, "off")], &["app"]);
        assert_eq!(
            decide(&p, None),
            Decision::Skip {
                reason: SkipReason::ModeOff
            }
        );
        let p = pod(&[(INTERCEPTION_MODE, "NONE"), (MODE, "ebpf")], &["app"]);
        assert_eq!(
            intercepted(&decide(&p, None)).map(|i| (i.0, i.2)),
            Some((Mode::Ebpf, Because::ModeAnnotation))
        );
        let p = pod(&[(MODE, "iptables")], &["app"]);
        assert_eq!(
            intercepted(&decide(&p, None)).map(|i| i.0),
            Some(Mode::Iptables)
        );
        let p = pod(&[(MODE, "bpf")], &["app"]);
        assert!(matches!(
            decide(&p, None),
            Decision::Invalid {
                annotation: MODE,
                ..
            }
        ));
    }

    #[test]
    fn host_network_and_finished_pods_are_never_intercepted() {
        let mut p = pod(&[(MODE, "ebpf")], &["app", PROXY_CONTAINER]);
        p.spec.as_mut().unwrap().host_network = Some(true);
        assert_eq!(
            decide(&p, None),
            Decision::Skip {
                reason: SkipReason::HostNetwork
            }
        );
        let mut p = pod(&[(STATUS, "{}")], &["app"]);
        p.status = Some(PodStatus {
            phase: Some("Succeeded".into()),
            ..PodStatus::default()
        });
        assert_eq!(
            decide(&p, None),
            Decision::Skip {
                reason: SkipReason::Finished
            }
        );
    }

    #[test]
    fn traffic_annotations_become_the_spec() {
        let p = pod(
            &[
                (STATUS, "{}"),
                (INCLUDE_INBOUND_PORTS, "8080, 9090"),
                (EXCLUDE_INBOUND_PORTS, "8081"),
                (INCLUDE_OUTBOUND_PORTS, "443"),
                (EXCLUDE_OUTBOUND_PORTS, "5432,6379"),
                (INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/8,fd00::/8"),
                (EXCLUDE_OUTBOUND_IP_RANGES, "10.96.0.1/32"),
                (SOCKMAP, "off"),
            ],
            &["app"],
        );
        let (_, spec, _) = intercepted(&decide(&p, None)).expect("intercepted");
        assert_eq!(
            spec.include_inbound_ports,
            Selection::List(vec![8080, 9090])
        );
        assert_eq!(spec.exclude_inbound_ports, vec![8081]);
        assert_eq!(spec.include_outbound_ports, vec![443]);
        assert_eq!(spec.exclude_outbound_ports, vec![5432, 6379]);
        assert_eq!(
            spec.include_outbound_cidrs,
            Selection::List(vec![
                "10.0.0.0/8".parse().unwrap(),
                "fd00::/8".parse().unwrap()
            ])
        );
        assert_eq!(
            spec.exclude_outbound_cidrs,
            vec!["10.96.0.1/32".parse().unwrap()]
        );
        assert!(!spec.sockmap);
        // Empty values mean what they mean for istio-iptables: no inbound capture, only the
        // included ports outbound.
        let p = pod(
            &[
                (STATUS, "{}"),
                (INCLUDE_INBOUND_PORTS, ""),
                (INCLUDE_OUTBOUND_IP_RANGES, ""),
            ],
            &["app"],
        );
        let (_, spec, _) = intercepted(&decide(&p, None)).expect("intercepted");
        assert!(!spec.inbound());
        assert_eq!(spec.include_outbound_cidrs, Selection::List(vec![]));
    }

    #[test]
    fn every_bad_value_names_its_annotation_and_value() {
        for (annotation, value) in [
            (INCLUDE_INBOUND_PORTS, "80,*"),
            (EXCLUDE_INBOUND_PORTS, "http"),
            (INCLUDE_OUTBOUND_PORTS, "70000"),
            (EXCLUDE_OUTBOUND_PORTS, "*"),
            (INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/33"),
            (EXCLUDE_OUTBOUND_IP_RANGES, "not-a-cidr"),
            (SOCKMAP, "maybe"),
        ] {
            let p = pod(&[(STATUS, "{}"), (annotation, value)], &["app"]);
            match decide(&p, None) {
                Decision::Invalid {
                    annotation: a,
                    value: v,
                    error,
                } => {
                    assert_eq!((a, v.as_str()), (annotation, value));
                    assert!(!error.is_empty());
                }
                other => panic!("{annotation}={value}: {other:?}"),
            }
        }
    }

    #[test]
    fn proxy_identity_comes_from_the_istio_proxy_container() {
        let mut p = pod(&[], &["app", PROXY_CONTAINER]);
        p.spec.as_mut().unwrap().containers[1].security_context =
            Some(k8s_openapi::api::core::v1::SecurityContext {
                run_as_user: Some(1000650000),
                run_as_group: Some(1000650001),
                ..Default::default()
            });
        let (_, spec, _) = intercepted(&decide(&p, None)).expect("intercepted");
        assert_eq!((spec.proxy_uid, spec.proxy_gid), (1000650000, 1000650001));
        let p = pod(&[(STATUS, "{}")], &["app"]);
        let (_, spec, _) = intercepted(&decide(&p, None)).expect("intercepted");
        assert_eq!((spec.proxy_uid, spec.proxy_gid), (1337, 1337));
    }

    fn proxy_running_as(uid: Option<i64>, gid: Option<i64>) -> Decision {
        let mut p = pod(&[], &["app", PROXY_CONTAINER]);
        p.spec.as_mut().unwrap().containers[1].security_context =
            Some(k8s_openapi::api::core::v1::SecurityContext {
                run_as_user: uid,
                run_as_group: gid,
                ..Default::default()
            });
        decide(&p, None)
    }

    #[test]
    fn root_is_never_the_exempt_identity() {
        // Istio's TPROXY injection: the proxy is root, exempted by its group alone.
        let (_, spec, _) = intercepted(&proxy_running_as(Some(0), Some(1337))).expect("tproxy");
        assert_eq!((spec.proxy_uid, spec.proxy_gid), (1337, 1337));
        let (_, spec, _) = intercepted(&proxy_running_as(Some(0), None)).expect("root");
        assert_eq!((spec.proxy_uid, spec.proxy_gid), (1337, 1337));
        let (_, spec, _) = intercepted(&proxy_running_as(Some(2000), Some(0))).expect("gid 0");
        assert_eq!((spec.proxy_uid, spec.proxy_gid), (2000, 1337));
        // Root and group 0: nothing tells the proxy from the app's root processes.
        assert!(matches!(
            proxy_running_as(Some(0), Some(0)),
            Decision::Invalid {
                annotation: PROXY_SECURITY_CONTEXT,
                ..
            }
        ));
    }

    #[test]
    fn dns_capture_comes_from_proxy_metadata() {
        let spec_of = |config: &str| {
            let p = pod(&[(STATUS, "{}"), (PROXY_CONFIG, config)], &["istio-proxy"]);
            match decide(&p, None) {
                Decision::Intercept { spec, .. } => Ok(spec.dns.enabled),
                Decision::Invalid {
                    annotation, error, ..
                } => Err((annotation, error)),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(
            spec_of("proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n"),
            Ok(true)
        );
        assert_eq!(
            spec_of("proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"false\"\n"),
            Ok(false)
        );
        assert_eq!(
            spec_of("proxyMetadata:\n  ISTIO_META_DNS_AUTO_ALLOCATE: \"true\"\n"),
            Ok(false)
        );
        assert_eq!(
            spec_of("holdApplicationUntilProxyStarts: true\n"),
            Ok(false)
        );
        let err = spec_of("proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"yes please\"\n")
            .expect_err("bad bool");
        assert_eq!(err.0, PROXY_CONFIG);
        assert!(err.1.contains("ISTIO_META_DNS_CAPTURE"), "{}", err.1);
        assert!(spec_of("proxyMetadata: [").is_err());
        // The mesh-wide default, and a pod turning it off for itself.
        let mesh = |annotations: &[(&str, &str)]| {
            let p = pod(&[&[(STATUS, "{}")], annotations].concat(), &["istio-proxy"]);
            match decide_with(&p, None, true) {
                Decision::Intercept { spec, .. } => spec.dns.enabled,
                other => panic!("{other:?}"),
            }
        };
        assert!(mesh(&[]));
        assert!(!mesh(&[(
            PROXY_CONFIG,
            "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"false\"\n"
        )]));
    }

    /// Hostile input: any annotation values (and keys) on a pod the agent would intercept give
    /// a decision, never a panic; a refused value names its annotation.
    mod hostile {
        use proptest::prelude::*;

        use super::*;

        const KEYS: [&str; 13] = [
            INJECT,
            STATUS,
            INTERCEPTION_MODE,
            INCLUDE_INBOUND_PORTS,
            EXCLUDE_INBOUND_PORTS,
            INCLUDE_OUTBOUND_PORTS,
            EXCLUDE_OUTBOUND_PORTS,
            INCLUDE_OUTBOUND_IP_RANGES,
            EXCLUDE_OUTBOUND_IP_RANGES,
            PROXY_CONFIG,
            MODE,
            SOCKMAP,
            FAILURE_POLICY,
        ];

        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("true".to_owned()),
                Just("off".to_owned()),
                Just("*".to_owned()),
                Just("TPROXY".to_owned()),
                "[0-9, ]{0,20}",
                "[0-9a-f:./, ]{0,40}",
                "proxyMetadata:\\n  ISTIO_META_DNS_CAPTURE: \"[a-zA-Z]{0,6}\"",
                "[{}\\[\\]:\\n -~]{0,40}",
                any::<String>(),
            ]
        }

        proptest! {
            #[test]
            fn any_annotations_give_a_decision(
                pairs in prop::collection::vec((0..KEYS.len() + 1, value()), 0..8),
                extra_key in "[ -~]{0,20}",
                dns in any::<bool>(),
            ) {
                let mut annotations: Vec<(String, String)> = pairs
                    .into_iter()
                    .map(|(k, v)| (KEYS.get(k).map_or(extra_key.clone(), |k| (*k).to_owned()), v))
                    .collect();
                // Injected, so the values are really read.
                annotations.push((STATUS.to_owned(), "{}".to_owned()));
                let refs: Vec<(&str, &str)> =
                    annotations.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let p = pod(&refs, &["app", PROXY_CONTAINER]);
                match decide_with(&p, Some(&ns(&[(NAMESPACE_INJECTION, "enabled")])), dns) {
                    Decision::Invalid { annotation, error, .. } => {
                        prop_assert!(annotations.iter().any(|(k, _)| k == annotation), "{annotation}");
                        prop_assert!(!error.is_empty());
                    }
                    Decision::Intercept { spec, .. } => {
                        prop_assert!(spec.proxy_uid != 0 || spec.proxy_gid != 0);
                    }
                    Decision::Skip { .. } => {}
                }
            }
        }
    }
}
