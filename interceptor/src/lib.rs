//! interceptor: eBPF traffic interception for sidecar service meshes.
//!
//! - [`bpf`]: the program family as user space sees it (load, attach, pin, maps, probes).
//! - [`agent`]: the node agent that owns the datapath.
//! - [`pods`]: which pods are intercepted, and how (Istio's per-pod switches).
//! - [`kube`]: the pod watcher: this node's pods from the Kubernetes API, Istio's annotations.
//! - [`proxy`] + [`app`]: the sidecar proxy.
//! - [`lab`], [`testapp`], [`demo`]: pods on network namespaces for the demo, tests, benchmark.
//! - [`loadgen`]: the HTTP load generator of the benchmarks.

pub mod agent;
pub mod app;
pub mod bench;
pub mod bpf;
pub mod cli;
pub mod demo;
pub mod http_server;
pub mod iptables;
pub mod kube;
pub mod lab;
pub mod listeners;
pub mod loadgen;
pub mod netns;
pub mod pods;
pub mod privileges;
pub mod proxy;
pub mod signal;
pub mod socket;
pub mod status;
pub mod telemetry;
pub mod testapp;
