//! The suite, one module per area of the datapath.

mod bypass;
mod cli;
mod demo;
mod dns;
mod host_safety;
mod inbound;
mod iptables;
mod ipv6;
mod isolation;
mod kube;
mod lifecycle;
mod outbound;
mod policy;
mod privileges;
mod protocols;
mod proxy_l7;
mod restarts;
mod scale;
mod sidecars;
mod sockmap;
