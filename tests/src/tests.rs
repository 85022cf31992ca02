//! The suite, one module per area of the datapath.

mod cli;
mod demo;
mod host_safety;
mod inbound;
mod iptables;
mod ipv6;
mod isolation;
mod kube;
mod lifecycle;
mod outbound;
mod policy;
mod proxy_l7;
mod sidecars;
mod sockmap;
