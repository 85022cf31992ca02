//! interceptor: eBPF traffic interception for sidecar service meshes.
//!
//! The node agent, by purpose:
//! - [`agent`]: the run loop (load or adopt the datapath, passes, events, exit), readiness and
//!   its HTTP endpoints.
//! - [`registry`]: which pods are intercepted and how: the per-pod spec (Istio's switches, one
//!   parser for flags and annotations), one [`registry::Mode`], writes with rollback.
//! - [`discovery`]: what the node says about a pod: network namespaces, /proc, listening sockets.
//! - [`kube`]: this node's pods from the Kubernetes API → the registry's desired state.
//! - [`bpf`]: the program family as user space sees it (load, attach, pin, typed map operations,
//!   probes).
//!
//! [`capabilities`]: what the agent needs of the kernel, checked at start.
//!
//! The sidecar: [`proxy`] ([`proxy::runtime`] is its composition root). [`iptables`]:
//! istio-iptables' rules. [`commands`]: what each subcommand does (`main.rs` only dispatches).
//!
//! Test scaffolding (pods on network namespaces, test apps, load generator, demo, benchmarks)
//! lives in the `interceptor-lab` crate: none of it ships in this binary.

pub mod agent;
pub mod bpf;
pub mod capabilities;
pub mod cli;
pub mod commands;
pub mod discovery;
pub mod http_server;
pub mod iptables;
pub mod kube;
pub mod privileges;
pub mod proxy;
pub mod registry;
pub mod signal;
pub mod socket;
pub mod status;
pub mod telemetry;
