//! How a pod is intercepted — the one `Mode` the CLI, the annotations and the Kubernetes
//! controller share — and enabling a pod in a mode.

use serde::Serialize;
use tracing::info;

use super::{Error, PodEntry, PodSource, Registry, display_name, spec::PodSpec};
use crate::{
    bpf::attach::{dns_capture_available, sk_lookup_available},
    discovery::netns::Netns,
    iptables::BackendChoice,
};

/// How a pod is intercepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The in-kernel datapath.
    Ebpf,
    /// istio-iptables' rules in the pod's namespace.
    Iptables,
    /// The datapath when this kernel can do everything the pod asks, else iptables.
    Auto,
}

impl Mode {
    /// The value as flags and annotations spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Ebpf => "ebpf",
            Mode::Iptables => "iptables",
            Mode::Auto => "auto",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        match value.trim().to_ascii_lowercase().as_str() {
            "ebpf" => Ok(Mode::Ebpf),
            "iptables" => Ok(Mode::Iptables),
            "auto" => Ok(Mode::Auto),
            _ => Err("expected one of ebpf, iptables, auto".into()),
        }
    }
}

impl Registry<'_> {
    /// Enables a pod in the given mode; `backend` is the iptables backend when the mode is, or
    /// turns out to be, iptables.
    pub fn enable_with(
        &mut self,
        netns: &Netns,
        source: &PodSource,
        spec: &PodSpec,
        mode: Mode,
        backend: BackendChoice,
    ) -> Result<PodEntry, Error> {
        match mode {
            Mode::Ebpf => self.enable(netns, source, spec),
            Mode::Iptables => self.enable_iptables(netns, source, spec, backend),
            Mode::Auto => {
                if spec.dns.enabled && !dns_capture_available(self.pins) {
                    info!(
                        pod = %display_name(source),
                        "DNS capture asked but no cgroup sendmsg/recvmsg programs attached \
                         (Linux < 5.2?): intercepting with iptables (istio-iptables' DNS rules)"
                    );
                    self.enable_iptables(netns, source, spec, backend)
                } else if spec.inbound() && !sk_lookup_available(self.pins) {
                    info!(
                        pod = %display_name(source),
                        "no sk_lookup on this kernel (< 5.9): intercepting with iptables"
                    );
                    self.enable_iptables(netns, source, spec, backend)
                } else {
                    self.enable(netns, source, spec)
                }
            }
        }
    }
}
