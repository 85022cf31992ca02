//! What the node says about a pod, read without the Kubernetes API: its network namespace and
//! what can be read from inside it ([`netns`]), which processes and namespace belong to a
//! Kubernetes pod UID ([`procfs`]), and which socket is its proxy's inbound listener
//! ([`listeners`]).

pub mod held;
pub mod listeners;
pub mod netns;
pub mod procfs;
