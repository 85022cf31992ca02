//! The benchmark's crowd: thousands of pods that are real network namespaces (a bridge device
//! with one IPv4 address in 198.19.128.0/17, so the agent finds a pod address) enabled through
//! the same registry call `interceptor pod enable` makes, each with a listener on the inbound
//! port held by this process (a sidecar's socket, without a process per pod). No veth, no
//! traffic: they fill the maps and the agent's passes. Everything goes on drop.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use interceptor::{
    bpf::{Maps, Pins},
    discovery::netns::Netns,
    registry::{PodRef, PodSource, Registry, spec::PodSpec},
};

use crate::lab::{PREFIX, ip_batch};

/// Istio's inbound capture port, where each filler's "sidecar" listens.
const INBOUND_PORT: u16 = 15006;

pub(super) struct Fillers {
    tag: String,
    /// Namespaces created so far (enabled or not), in order.
    names: Vec<String>,
    /// Enabled filler count (a prefix of `names`).
    enabled: usize,
    listeners: Vec<TcpListener>,
    /// Seconds each `enable` took, in order (every filler, re-enables included).
    pub(super) enable_seconds: Vec<f64>,
}

impl Fillers {
    pub(super) fn new() -> Self {
        Self {
            // `icpt-scalef-<pid>-<n>`: `lab::sweep_stale` removes them if this process dies.
            tag: format!("{PREFIX}-scalef-{}", std::process::id()),
            names: Vec::new(),
            enabled: 0,
            listeners: Vec::new(),
            enable_seconds: Vec::new(),
        }
    }

    pub(super) fn enabled(&self) -> usize {
        self.enabled
    }

    /// Namespaces created so far, enabled or not.
    pub(super) fn namespaces(&self) -> usize {
        self.names.len()
    }

    fn address(i: usize) -> Ipv4Addr {
        // 250 per /24 from 198.19.128.0: at most 128 × 250 = 32 000 fillers.
        Ipv4Addr::new(198, 19, 128 + (i / 250) as u8, (i % 250) as u8 + 1)
    }

    /// Creates the fillers' namespaces up to `to` (enabled or not).
    fn create_up_to(&mut self, to: usize) -> Result<()> {
        if to > 32_000 {
            bail!("at most 32 000 filler pods (their addresses are 198.19.128.0/17)");
        }
        let from = self.names.len();
        if to > from {
            self.create(from, to)?;
        }
        Ok(())
    }

    /// Creates and enables fillers until `to` are enabled; says how it goes on stderr.
    pub(super) fn grow(&mut self, to: usize, pins: &Pins) -> Result<()> {
        self.create_up_to(to)?;
        let mut maps = Maps::open(pins)?;
        let started = Instant::now();
        let mut last_report = Instant::now();
        for i in self.enabled..to {
            let netns = Netns::by_name(&self.names[i])?;
            let t = Instant::now();
            Registry::lock(pins, &mut maps)?
                .enable(
                    &netns,
                    &PodSource::Netns(self.names[i].clone()),
                    &PodSpec::default(),
                )
                .with_context(|| format!("enabling filler pod {} of {to}", i + 1))?;
            self.enable_seconds.push(t.elapsed().as_secs_f64());
            self.enabled = i + 1;
            if i >= self.listeners.len() {
                // After enable, as a sidecar starting in an enabled pod: sockops registers it.
                let l = netns
                    .run(|| TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], INBOUND_PORT))))??;
                self.listeners.push(l);
            }
            if last_report.elapsed() > Duration::from_secs(5) {
                eprintln!(
                    "  {} / {to} pods enabled ({:.0} s, last enable {:.1} ms)",
                    i + 1,
                    started.elapsed().as_secs_f64(),
                    self.enable_seconds.last().copied().unwrap_or(0.0) * 1e3
                );
                last_report = Instant::now();
            }
        }
        Ok(())
    }

    /// Creates fillers up to `to` and enables them all under one registry lock (as an agent's
    /// first pass after a restart does), then binds their listeners: a quick way to reach a
    /// node-scale pod count (`interceptor-lab scale-fillers`). How long the enables took.
    pub(super) fn grow_one_lock(&mut self, to: usize, pins: &Pins) -> Result<Duration> {
        self.create_up_to(to)?;
        let mut maps = Maps::open(pins)?;
        let started = Instant::now();
        let mut registry = Registry::lock(pins, &mut maps)?;
        for i in self.enabled..to {
            let netns = Netns::by_name(&self.names[i])?;
            registry
                .enable(
                    &netns,
                    &PodSource::Netns(self.names[i].clone()),
                    &PodSpec::default(),
                )
                .with_context(|| format!("enabling filler pod {} of {to}", i + 1))?;
            self.enabled = i + 1;
        }
        drop(registry);
        let took = started.elapsed();
        for i in self.listeners.len()..to {
            let netns = Netns::by_name(&self.names[i])?;
            let l = netns
                .run(|| TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], INBOUND_PORT))))??;
            self.listeners.push(l);
        }
        Ok(took)
    }

    /// Enables every enabled filler again under one registry lock, as an agent's first pass
    /// after a restart does (it knows no pod yet, so it enables each it finds). How long it took.
    pub(super) fn reenable_all(&self, pins: &Pins) -> Result<Duration> {
        let mut maps = Maps::open(pins)?;
        let started = Instant::now();
        let mut registry = Registry::lock(pins, &mut maps)?;
        for name in &self.names[..self.enabled] {
            let netns = Netns::by_name(name)?;
            registry
                .enable(&netns, &PodSource::Netns(name.clone()), &PodSpec::default())
                .with_context(|| format!("enabling filler pod {name} again"))?;
        }
        drop(registry);
        Ok(started.elapsed())
    }

    /// Creates namespaces up to `to` with their listener on the inbound port, without enabling
    /// them: the kernel holds the same namespaces and sockets as at `to` enabled pods, the
    /// datapath's maps hold none of them (`bench-connect`'s "created" stage). `grow` closes
    /// these listeners and binds them again after each enable, as the benchmark does.
    pub(super) fn create_unenabled(&mut self, to: usize) -> Result<()> {
        self.create_up_to(to)?;
        for i in self.listeners.len()..to {
            let netns = Netns::by_name(&self.names[i])?;
            let l = netns
                .run(|| TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], INBOUND_PORT))))??;
            self.listeners.push(l);
        }
        Ok(())
    }

    /// Closes the listeners of fillers that are not enabled (the next `grow` binds them again).
    pub(super) fn close_unenabled_listeners(&mut self) {
        self.listeners.truncate(self.enabled);
    }

    /// Disables the last `n` enabled fillers (their namespaces and listeners stay).
    pub(super) fn disable_last(&mut self, n: usize, pins: &Pins) -> Result<()> {
        let mut maps = Maps::open(pins)?;
        let to = self.enabled.saturating_sub(n);
        for i in (to..self.enabled).rev() {
            Registry::lock(pins, &mut maps)?.disable(&PodRef::Netns(self.names[i].clone()))?;
            self.enabled = i;
        }
        Ok(())
    }

    /// Namespaces `from..to`, a bridge with an address in each: `ip -batch` for the namespaces
    /// and devices (one process), `ip -n … -batch` per namespace for loopback and the address.
    fn create(&mut self, from: usize, to: usize) -> Result<()> {
        let t = Instant::now();
        let mut batch = String::new();
        for i in from..to {
            let name = format!("{}-{i}", self.tag);
            batch += &format!("netns add {name}\nlink add e0 netns {name} type bridge\n");
            self.names.push(name);
        }
        ip_batch(&[], &batch)?;
        for i in from..to {
            // Loopback up (a pod's own sockets, the netns-cookie probe) and the pod address.
            let lines = format!("link set lo up\naddr add {}/32 dev e0\n", Self::address(i));
            ip_batch(&["-n", &self.names[i]], &lines)?;
        }
        eprintln!(
            "  created {} pod namespaces in {:.1} s",
            to - from,
            t.elapsed().as_secs_f64()
        );
        Ok(())
    }
}

impl Drop for Fillers {
    fn drop(&mut self) {
        // Listeners first (they keep their namespaces' sockets), then the namespaces: the
        // agent's next pass disables the pods whose namespace is gone.
        self.listeners.clear();
        let batch: String = self
            .names
            .iter()
            .map(|n| format!("netns del {n}\n"))
            .collect();
        if !batch.is_empty() {
            let _ = ip_batch(&[], &batch);
        }
    }
}
