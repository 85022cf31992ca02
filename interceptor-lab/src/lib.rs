//! interceptor-lab: everything that exercises interceptor without being part of it. The
//! end-to-end tests, `cargo xtask demo` and `cargo xtask bench` use it; the deployed
//! `interceptor` binary contains none of it.
//!
//! - [`lab`]: pods on one machine (network namespace + veth + cgroup each), cleaned up on drop.
//! - [`testapp`]: small real applications (an HTTP server that says who called it, a client,
//!   a byte stream writer and sink).
//! - [`loadgen`]: the HTTP/1.1 load generator of the benchmarks.
//! - [`bench`]: the datapath benchmark (direct, iptables, eBPF with and without sk_msg).
//! - [`demo`]: two pods, sidecars in both, a request crossing both, narrated.
//! - [`bins`]: where the product binary and this lab's binary are.
//! - [`fixed_dst`]: an original-destination answer for running the proxy without interception.
//! - [`grpc_codec`]: a bytes codec for tonic, the gRPC peer of the proxy tests.
//! - [`loopback_proxy`]: settings to run the sidecar proxy in-process on loopback in a test.

pub mod bench;
pub mod bins;
pub mod demo;
pub mod fixed_dst;
pub mod grpc_codec;
pub mod lab;
pub mod loadgen;
pub mod loopback_proxy;
pub mod testapp;
