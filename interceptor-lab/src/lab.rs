//! Pods on one machine, for the demo, the end-to-end tests and the benchmark: each pod is a
//! network namespace with a veth into a private "node" namespace (a bridge there joins them)
//! and a cgroup of its own. Nothing is created in the host's network namespace, so a bug here
//! cannot cut the host's networking. Addresses come from 198.18.0.0/15 and fd00:198:18::/48.
//!
//! Names carry the creating process id: `sweep_stale` removes what a crashed run left behind,
//! and parallel runs never collide.

#![allow(unsafe_code, reason = "setns and cgroup moves between fork and exec")]

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    net::{Ipv4Addr, Ipv6Addr},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use tracing::{debug, warn};

use interceptor::{
    bpf::{Maps, Pins, features::cgroup2_mount},
    discovery::netns::{self, Netns},
};

/// Every lab object's name starts with this.
pub const PREFIX: &str = "icpt";
const LEASES: &str = "/run/interceptor-lab/subnets";
/// 198.18.0.0/15 holds 512 /24 subnets.
const SUBNETS: u32 = 512;

static SEQ: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("running `ip` (iproute2; `cargo xtask setup` installs it): {0}")]
    IpMissing(#[source] io::Error),
    #[error("all {SUBNETS} lab subnets of 198.18.0.0/15 are in use")]
    NoSubnet,
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Netns(#[from] netns::Error),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Runs `ip ARGS`, with stderr in the error.
pub fn ip(args: &[&str]) -> Result<(), Error> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(Error::IpMissing)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Runs `ip ARGS -batch -` with `batch` (one command per line) on its standard input: many
/// namespaces or devices in one process. Stderr in the error.
pub fn ip_batch(args: &[&str], batch: &str) -> Result<(), Error> {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(args)
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(Error::IpMissing)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(batch.as_bytes())
            .map_err(Error::IpMissing)?;
    }
    let out = child.wait_with_output().map_err(Error::IpMissing)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Ip {
            args: format!("{} -batch -", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// A private node: a network namespace holding a bridge that joins the pods.
#[derive(Debug)]
pub struct Lab {
    pub name: String,
    node: String,
    subnet: u32,
    lease: PathBuf,
    cgroup: Option<PathBuf>,
    pods: Vec<String>,
    next_host: u8,
}

/// One pod of a lab.
#[derive(Clone, Debug)]
pub struct LabPod {
    pub name: String,
    /// Name of its network namespace (`ip netns`).
    pub netns: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// Its cgroup (v2) directory, when cgroup v2 is mounted.
    pub cgroup: Option<PathBuf>,
}

impl Lab {
    /// A new lab with its own subnet. `tag` names it (letters, digits, dashes).
    pub fn create(tag: &str) -> Result<Self, Error> {
        let pid = std::process::id();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}-{tag}-{pid}-{seq}");
        let (subnet, lease) = lease_subnet()?;
        let node = format!("{name}-node");
        let mut lab = Self {
            name,
            node,
            subnet,
            lease,
            cgroup: None,
            pods: Vec::new(),
            next_host: 2,
        };
        // From here on, Drop cleans up whatever was made.
        ip(&["netns", "add", &lab.node])?;
        let n = lab.node.clone();
        ip(&["-n", &n, "link", "set", "lo", "up"])?;
        ip(&["-n", &n, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &n, "link", "set", "br0", "up"])?;
        let gw = format!("{}/24", lab.gateway());
        ip(&["-n", &n, "addr", "add", &gw, "dev", "br0"])?;
        let gw6 = format!("{}/64", lab.v6(1));
        ip(&["-n", &n, "-6", "addr", "add", &gw6, "dev", "br0", "nodad"])?;
        if let Some(root) = cgroup2_mount() {
            let dir = root.join("interceptor-lab").join(&lab.name);
            match fs::create_dir_all(&dir) {
                Ok(()) => lab.cgroup = Some(dir),
                Err(err) => warn!(%err, dir = %dir.display(), "no lab cgroup"),
            }
        }
        Ok(lab)
    }

    /// The node's address on the bridge (an "outside" host for the pods).
    pub fn gateway(&self) -> Ipv4Addr {
        self.v4(1)
    }

    /// The node namespace's name (a place outside every pod, but not the host).
    pub fn node_netns(&self) -> &str {
        &self.node
    }

    fn v4(&self, host: u8) -> Ipv4Addr {
        let second = 18 + (self.subnet / 256) as u8;
        let third = (self.subnet % 256) as u8;
        Ipv4Addr::new(198, second, third, host)
    }

    fn v6(&self, host: u8) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd00,
            0x198,
            0x18,
            self.subnet as u16,
            0,
            0,
            0,
            u16::from(host),
        )
    }

    /// Adds a pod: netns, veth to the bridge, IPv4 and IPv6 addresses, default routes, cgroup.
    pub fn add_pod(&mut self, short: &str) -> Result<LabPod, Error> {
        let host = self.next_host;
        self.next_host += 1;
        let netns = format!("{}-{short}", self.name);
        ip(&["netns", "add", &netns])?;
        self.pods.push(netns.clone());
        let (ip4, ip6) = (self.v4(host), self.v6(host));
        let n = self.node.clone();
        let veth = format!("v{host}");
        ip(&[
            "-n", &n, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ])?;
        ip(&["-n", &n, "link", "set", &veth, "master", "br0", "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{ip4}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&[
            "-n",
            &netns,
            "-6",
            "addr",
            "add",
            &format!("{ip6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            &self.gateway().to_string(),
        ])?;
        // No ::6 on lo here: enabling the pod adds Istio's IPv6 passthrough source itself.
        let cgroup = match &self.cgroup {
            Some(dir) => {
                let c = dir.join(short);
                fs::create_dir_all(&c).map_err(io_err("creating", &c))?;
                Some(c)
            }
            None => None,
        };
        Ok(LabPod {
            name: short.to_owned(),
            netns,
            ip: ip4,
            ip6,
            cgroup,
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.pods.iter().chain(std::iter::once(&self.node)) {
            if let Err(err) = ip(&["netns", "del", ns]) {
                debug!(%err, "removing lab netns");
            }
        }
        if let Some(dir) = &self.cgroup {
            remove_cgroup_tree(dir);
            // The shared parent goes once the last lab is gone (rmdir fails while it is used).
            if let Some(parent) = dir.parent() {
                let _ = fs::remove_dir(parent);
            }
        }
        let _ = fs::remove_file(&self.lease);
    }
}

impl LabPod {
    pub fn open_netns(&self) -> Result<Netns, netns::Error> {
        Netns::by_name(&self.netns)
    }

    /// Runs `f` on a thread inside the pod.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, netns::Error> {
        self.open_netns()?.run(f)
    }

    /// Starts a process inside the pod (its network namespace and cgroup).
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<Child> {
        let ns = File::open(Path::new(netns::NETNS_RUN_DIR).join(&self.netns))?;
        let procs = match &self.cgroup {
            Some(dir) => Some(
                OpenOptions::new()
                    .write(true)
                    .open(dir.join("cgroup.procs"))?,
            ),
            None => None,
        };
        let ns_fd = ns.as_raw_fd();
        let procs_fd = procs.as_ref().map(AsRawFd::as_raw_fd);
        // SAFETY: only async-signal-safe syscalls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if let Some(fd) = procs_fd
                    && libc::write(fd, b"0\n".as_ptr().cast(), 2) < 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn();
        drop((ns, procs));
        child
    }

    /// Waits until something accepts connections on 127.0.0.1:`port` inside the pod, failing
    /// early if `process` (the one expected to listen) exits.
    pub fn wait_listening(
        &self,
        port: u16,
        timeout: std::time::Duration,
        mut process: Option<&mut Managed>,
    ) -> io::Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        let addr = std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        while std::time::Instant::now() < deadline {
            let up = self
                .run(|| {
                    std::net::TcpStream::connect_timeout(
                        &addr,
                        std::time::Duration::from_millis(200),
                    )
                    .is_ok()
                })
                .map_err(io::Error::other)?;
            if up {
                return Ok(());
            }
            if let Some(status) = process.as_mut().and_then(|p| p.stop_if_exited()) {
                let name = process.as_ref().map_or("", |p| p.name.as_str());
                return Err(io::Error::other(format!(
                    "{name} exited ({status}) before listening on {port} in {}",
                    self.name
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "nothing listened on {port} in {} within {timeout:?}",
                self.name
            ),
        ))
    }

    /// CPU time (user + system, µs) of the pod's cgroup: everything its processes ran.
    pub fn cpu_usec(&self) -> Option<u64> {
        let stat = fs::read_to_string(self.cgroup.as_ref()?.join("cpu.stat")).ok()?;
        stat.lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse().ok())
    }
}

/// Removes a cgroup directory tree, children first (a cgroup is removed with rmdir, and only
/// once it has no processes).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.filter_map(Result::ok) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    if let Err(err) = fs::remove_dir(dir) {
        debug!(%err, dir = %dir.display(), "removing lab cgroup");
    }
}

/// Takes a free /24 of 198.18.0.0/15 for this process (O_EXCL lease files; leases of dead
/// processes are taken over).
fn lease_subnet() -> Result<(u32, PathBuf), Error> {
    let dir = Path::new(LEASES);
    fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    let pid = std::process::id();
    // Start at a pid-dependent place so parallel runs rarely contend.
    let start = pid % SUBNETS;
    for i in 0..SUBNETS {
        let n = (start + i) % SUBNETS;
        let path = dir.join(n.to_string());
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut f) => {
                let _ = writeln!(f, "{pid}");
                return Ok((n, path));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let owner: Option<u32> = fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse().ok());
                if owner.is_some_and(|p| !alive(p)) {
                    let _ = fs::remove_file(&path);
                    if let Ok(mut f) = OpenOptions::new().write(true).create_new(true).open(&path) {
                        let _ = writeln!(f, "{pid}");
                        return Ok((n, path));
                    }
                }
            }
            Err(e) => return Err(io_err("creating", &path)(e)),
        }
    }
    Err(Error::NoSubnet)
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes lab namespaces, cgroups, leases and datapath instances (pin roots named after a lab,
/// with their run directories) whose creating process is gone: a crashed run must not leave
/// programs attached to the machine's cgroup root. Returns how many namespaces were removed.
pub fn sweep_stale() -> usize {
    let mut removed = 0;
    if let Ok(entries) = fs::read_dir(interceptor::bpf::features::BPFFS) {
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            if owner_pid(&name).is_some_and(|p| !alive(p)) {
                let pins = interceptor::bpf::Pins::new(e.path());
                if let Err(err) = interceptor::bpf::teardown(&pins) {
                    warn!(%err, root = %e.path().display(), "removing a crashed run's pins");
                }
            }
        }
    }
    if let Ok(entries) = fs::read_dir(netns::NETNS_RUN_DIR) {
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            if owner_pid(&name).is_some_and(|p| !alive(p)) && ip(&["netns", "del", &name]).is_ok() {
                removed += 1;
            }
        }
    }
    if let Some(root) = cgroup2_mount() {
        let base = root.join("interceptor-lab");
        if let Ok(entries) = fs::read_dir(&base) {
            for e in entries.filter_map(Result::ok) {
                let name = e.file_name().to_string_lossy().into_owned();
                if owner_pid(&name).is_some_and(|p| !alive(p)) {
                    remove_cgroup_tree(&e.path());
                }
            }
        }
    }
    if let Ok(entries) = fs::read_dir(LEASES) {
        for e in entries.filter_map(Result::ok) {
            let owner: Option<u32> = fs::read_to_string(e.path())
                .ok()
                .and_then(|s| s.trim().parse().ok());
            if owner.is_some_and(|p| !alive(p)) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    removed
}

/// `icpt-<tag>-<pid>-<seq>[-<pod>]` → pid.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?.strip_prefix('-')?;
    rest.split('-')
        .collect::<Vec<_>>()
        .windows(2)
        .find_map(|w| {
            let pid = w[0].parse::<u32>().ok()?;
            w[1].parse::<u32>().ok()?;
            Some(pid)
        })
}

/// Waits until the pod enabled from network namespace `netns_name` can have inbound
/// connections steered to its proxy (its listener is registered).
pub fn wait_inbound_ready(
    pins: &Pins,
    netns_name: &str,
    timeout: std::time::Duration,
) -> Result<bool, interceptor::registry::Error> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let maps = Maps::open(pins)?;
        if interceptor::registry::list(pins, &maps)?
            .iter()
            .any(|p| p.name == netns_name && p.inbound_ready)
        {
            return Ok(true);
        }
        if std::time::Instant::now() > deadline {
            return Ok(false);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_names() {
        assert_eq!(owner_pid("icpt-demo-1234-0-node"), Some(1234));
        assert_eq!(owner_pid("icpt-e2e-inbound-99-3-client"), Some(99));
        assert_eq!(owner_pid("other-1234-0"), None);
        assert_eq!(owner_pid("icpt-demo"), None);
    }
}

/// A child process that is stopped (SIGTERM, then SIGKILL after a grace period) when dropped.
#[derive(Debug)]
pub struct Managed {
    pub name: String,
    child: Option<Child>,
    lines: Option<std::sync::mpsc::Receiver<String>>,
}

impl Managed {
    /// Wraps a spawned child; its stdout (when piped) is read line by line in the background.
    pub fn new(name: impl Into<String>, mut child: Child) -> Self {
        let lines = child.stdout.take().map(|out| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                use std::io::BufRead as _;
                for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        });
        Self {
            name: name.into(),
            child: Some(child),
            lines,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits until a stdout line contains `needle`; fails if the process exits first or the
    /// time runs out.
    pub fn wait_for_line(
        &mut self,
        needle: &str,
        timeout: std::time::Duration,
    ) -> io::Result<String> {
        let deadline = std::time::Instant::now() + timeout;
        let Some(rx) = &self.lines else {
            return Err(io::Error::other("stdout is not piped"));
        };
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{} did not print {needle:?} in {timeout:?}", self.name),
                ));
            }
            match rx.recv_timeout(left.min(std::time::Duration::from_millis(200))) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.as_mut().and_then(|c| c.wait().ok());
                    return Err(io::Error::other(format!(
                        "{} exited ({status:?}) before printing {needle:?}",
                        self.name
                    )));
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(io::Error::other(format!(
                    "{} exited ({status}) before printing {needle:?}",
                    self.name
                )));
            }
        }
    }

    /// SIGTERM, then waits up to `grace` before SIGKILL. Returns the exit status.
    pub fn stop(&mut self, grace: std::time::Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        warn!(name = %self.name, "did not stop in {grace:?}; killing it");
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        self.stop(std::time::Duration::from_secs(10));
    }
}

impl Managed {
    /// The exit status if the process has already exited.
    pub fn stop_if_exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }
}
