//! interceptor: eBPF traffic interception for sidecar service meshes.
//!
//! - [`bpf`]: the program family as user space sees it (load, attach, pin, maps, probes).
//! - [`agent`]: the node agent that owns the datapath.
//! - [`pods`]: which pods are intercepted, and how (Istio's per-pod switches).
//! - [`kube`]: the pod watcher: this node's pods from the Kubernetes API, Istio's annotations.
//! - [`proxy`] + [`app`]: the sidecar proxy.
//! - [`commands`]: what each subcommand does (`main.rs` only dispatches).
//!
//! Test scaffolding (pods on network namespaces, test apps, load generator, demo, benchmarks)
//! lives in the `interceptor-lab` crate: none of it ships in this binary.

pub mod agent;
pub mod app;
pub mod bpf;
pub mod cli;
pub mod commands;
pub mod http_server;
pub mod iptables;
pub mod kube;
pub mod listeners;
pub mod netns;
pub mod pods;
pub mod privileges;
pub mod proxy;
pub mod signal;
pub mod socket;
pub mod status;
pub mod telemetry;
