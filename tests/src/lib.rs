//! End-to-end tests of interceptor on the real kernel: the real `interceptor` binary (agent, CLI,
//! sidecar proxy), the real BPF programs attached at the cgroup v2 root, and real TCP traffic
//! between pods made of network namespaces, veths and cgroups.
//!
//! Every test gets its own pin root (its own instance of the datapath) and its own lab, so tests
//! run in parallel and never touch a real agent. They need root and panic without it: a skip
//! would pass silently.

#![allow(unsafe_code, reason = "poll(2) on a child's pipe with a timeout")]

use std::{
    io::{Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use interceptor_lab::lab::{Lab, LabPod, Managed};
use serde_json::Value;

pub mod fake_api;
pub mod kube;
#[cfg(test)]
mod tests;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Held by tests that create namespaces by the hundred (`scale`) and by the one that needs the
/// next namespace created to get a freed inode number (`lifecycle`'s inode-reuse test): run
/// together, the first takes every freed number and the second can only skip.
pub static NAMESPACE_CHURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Takes `NAMESPACE_CHURN` (a panicked holder does not poison it for the others).
pub fn namespace_churn() -> std::sync::MutexGuard<'static, ()> {
    NAMESPACE_CHURN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Panics unless running as root (the suite loads BPF programs and creates namespaces).
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the end-to-end tests need root: run `cargo xtask test` as root"
    );
}

/// The interceptor binary under test: $INTERCEPTOR_BIN, or the one next to this test binary.
pub fn binary() -> PathBuf {
    interceptor_lab::bins::product().expect("the interceptor binary")
}

/// The lab binary (test apps): $INTERCEPTOR_LAB_BIN, or the one next to this test binary.
pub fn lab_binary() -> PathBuf {
    interceptor_lab::bins::lab().expect("the interceptor-lab binary")
}

/// Runs an iptables tool (`iptables-nft-save`, `ip6tables-legacy`, …) inside the pod's network
/// namespace with `stdin` fed in, and returns its stdout; panics with its error on failure.
/// Every test goes through this, the product's runner: it retries the kernel's getsockopt EFAULT
/// race (iptables reads tables with getsockopt, and parallel tests attach and detach
/// cgroup/getsockopt programs all the time).
pub fn iptables_tool(pod: &LabPod, tool: &str, args: &[&str], stdin: Option<String>) -> String {
    let netns = interceptor::discovery::netns::Netns::by_name(&pod.netns).expect("the pod's netns");
    interceptor::iptables::run_tool(&netns, tool, args, stdin)
        .unwrap_or_else(|err| panic!("{tool} {}: {err}", args.join(" ")))
}

/// [`iptables_tool`] in the node's (this process's) network namespace.
pub fn host_iptables_tool(tool: &str, args: &[&str]) -> String {
    let netns =
        interceptor::discovery::netns::Netns::by_pid(std::process::id()).expect("this netns");
    interceptor::iptables::run_tool(&netns, tool, args, None)
        .unwrap_or_else(|err| panic!("{tool} {}: {err}", args.join(" ")))
}

/// One test's world: an instance of the datapath (pin root + agent) and a lab of pods.
pub struct Harness {
    pub bin: PathBuf,
    pub pin_root: PathBuf,
    pub lab: Lab,
    agents: Vec<Managed>,
    sidecars: Vec<Managed>,
    /// Other processes started in pods (stopped before the lab goes).
    processes: Vec<Managed>,
    /// Apps started in pods (stopped before the pods go).
    pub apps: Vec<Managed>,
    temp_files: Vec<PathBuf>,
}

impl Harness {
    pub fn new(tag: &str) -> Self {
        require_root();
        interceptor_lab::lab::sweep_stale();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let pin_root = PathBuf::from(format!(
            "/sys/fs/bpf/icpt-test-{tag}-{}-{seq}",
            std::process::id()
        ));
        let lab = Lab::create(tag).expect("creating the lab");
        Self {
            bin: binary(),
            pin_root,
            lab,
            agents: Vec::new(),
            sidecars: Vec::new(),
            processes: Vec::new(),
            apps: Vec::new(),
            temp_files: Vec::new(),
        }
    }

    pub fn pod(&mut self, name: &str) -> LabPod {
        self.lab.add_pod(name).expect("adding a pod")
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--pin-root").arg(&self.pin_root);
        cmd.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
        cmd
    }

    /// Starts an agent on this instance and waits until it is ready.
    pub fn start_agent(&mut self, args: &[&str]) -> &mut Managed {
        let agent = self.spawn_agent(args);
        agent
            .wait_for_line("agent ready", Duration::from_secs(60))
            .expect("agent ready");
        agent
    }

    /// Starts an agent on this instance without waiting for it to be ready.
    pub fn spawn_agent(&mut self, args: &[&str]) -> &mut Managed {
        let cmd = self.command();
        self.spawn_agent_with(cmd, args)
    }

    /// `interceptor --pin-root <this>` run through `wrapper` (e.g. `setpriv` with its
    /// options, ending in `--`), with `env` added.
    pub fn command_via(&self, wrapper: &[&str], env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(wrapper[0]);
        cmd.args(&wrapper[1..])
            .arg(&self.bin)
            .arg("--pin-root")
            .arg(&self.pin_root)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied());
        cmd
    }

    /// Starts `cmd` (an `interceptor` command line up to its subcommand) as this instance's
    /// agent, without waiting for it to be ready.
    pub fn spawn_agent_with(&mut self, mut cmd: Command, args: &[&str]) -> &mut Managed {
        let child = cmd
            .args(["agent", "--reconcile-seconds", "0.2"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning the agent");
        self.agents.push(Managed::new("agent", child));
        self.agents.last_mut().expect("just pushed")
    }

    /// The most recently started agent.
    pub fn agent_mut(&mut self) -> &mut Managed {
        self.agents.last_mut().expect("an agent")
    }

    /// Stops the most recently started agent (SIGTERM) and returns whether it exited cleanly.
    pub fn stop_agent(&mut self) -> bool {
        self.stop_agent_within(Duration::from_secs(20))
    }

    /// Stops the newest agent with SIGTERM, killing it after `grace`; whether it exited with
    /// success. A longer grace for tests that stop agents under load in slow (TCG) guests.
    pub fn stop_agent_within(&mut self, grace: Duration) -> bool {
        let mut agent = self.agents.pop().expect("an agent to stop");
        agent.stop(grace).is_some_and(|s| s.success())
    }

    /// Stops the agent started `index`-th among those still running.
    pub fn stop_agent_at(&mut self, index: usize) -> bool {
        let mut agent = self.agents.remove(index);
        agent
            .stop(Duration::from_secs(20))
            .is_some_and(|s| s.success())
    }

    /// Runs `interceptor --pin-root <this> ARGS`.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running interceptor")
    }

    /// `pod enable --netns` for a lab pod, which must succeed.
    pub fn enable(&self, pod: &LabPod, extra: &[&str]) {
        let out = self.cli(&[&["pod", "enable", "--netns", &pod.netns], extra].concat());
        assert!(
            out.status.success(),
            "pod enable failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn disable(&self, pod: &LabPod) {
        let out = self.cli(&["pod", "disable", "--netns", &pod.netns]);
        assert!(
            out.status.success(),
            "pod disable failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `status --json`.
    pub fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.status()["counters"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name}"))
    }

    pub fn counters(&self) -> Counters {
        Counters(self.status()["counters"].clone())
    }

    /// Starts a sidecar proxy in the pod (dropping to UID 1337) and waits for its health port.
    pub fn sidecar(&mut self, pod: &LabPod) {
        self.sidecar_with(pod, &[]);
    }

    /// Starts a sidecar with a routing config (written where UID 1337 can read it).
    pub fn sidecar_with_config(&mut self, pod: &LabPod, yaml: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("{}-proxy.yaml", pod.netns));
        std::fs::write(&path, yaml).expect("writing the proxy config");
        let _ =
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644));
        self.temp_files.push(path.clone());
        let arg = path.to_string_lossy().into_owned();
        self.sidecar_with(pod, &["--config", &arg]);
        path
    }

    /// Starts a sidecar with extra `interceptor proxy` arguments.
    pub fn sidecar_with(&mut self, pod: &LabPod, args: &[&str]) {
        let mut cmd = Command::new(&self.bin);
        cmd.args(["proxy"]).args(args);
        self.start_sidecar(pod, cmd);
    }

    /// Starts `cmd` (an `interceptor proxy` command line) as the pod's sidecar and waits for
    /// its health port.
    pub fn start_sidecar(&mut self, pod: &LabPod, mut cmd: Command) {
        let child = pod
            .spawn(cmd.env("RUST_LOG", "warn").stdout(Stdio::null()))
            .expect("spawning the sidecar");
        let mut proxy = Managed::new(format!("{} sidecar", pod.name), child);
        wait_until(Duration::from_secs(20), || {
            assert!(proxy.stop_if_exited().is_none(), "sidecar exited early");
            pod.run(|| {
                TcpStream::connect_timeout(
                    &SocketAddr::from(([127, 0, 0, 1], 15021)),
                    Duration::from_millis(200),
                )
                .is_ok()
            })
            .expect("netns")
        });
        self.sidecars.push(proxy);
    }

    /// Starts a long-lived process in the pod (its network namespace and cgroup), stopped when
    /// the harness goes; returns its pid.
    pub fn keep_running(&mut self, pod: &LabPod) -> u32 {
        let child = pod
            .spawn(Command::new("sleep").arg("3600").stdout(Stdio::null()))
            .expect("spawning a pod process");
        let process = Managed::new(format!("{} process", pod.name), child);
        let pid = process.pid().expect("pid");
        self.processes.push(process);
        pid
    }

    /// Stops the pod processes started by [`Harness::keep_running`] and [`Harness::sidecar`]
    /// in `pod` (a pod's containers exiting).
    pub fn stop_processes_of(&mut self, pod: &LabPod) {
        let own = |m: &Managed| m.name.starts_with(&format!("{} ", pod.name));
        self.processes.retain(|m| !own(m));
        self.sidecars.retain(|m| !own(m));
    }

    /// Starts an agent that learns its pods from the Kubernetes API at `kubeconfig`.
    pub fn start_kube_agent(&mut self, kubeconfig: &Path, node: &str, extra: &[&str]) {
        let kubeconfig = kubeconfig.to_str().expect("utf-8 path");
        let args = [
            &["--kube", "--kubeconfig", kubeconfig, "--node-name", node][..],
            extra,
        ]
        .concat();
        self.start_agent(&args);
    }

    /// Starts `interceptor-lab testapp http-server` in the pod on `listen`, answering as `name`.
    pub fn http_app(&mut self, pod: &LabPod, listen: SocketAddr, name: &str) {
        let child = pod
            .spawn(
                Command::new(lab_binary())
                    .args(["testapp", "http-server", "--listen"])
                    .arg(listen.to_string())
                    .args(["--name", name])
                    .env("RUST_LOG", "warn")
                    .stdout(Stdio::piped()),
            )
            .expect("spawning the app");
        let mut app = Managed::new(format!("{name} app"), child);
        app.wait_for_line("listening", Duration::from_secs(20))
            .expect("app listening");
        self.apps.push(app);
    }

    /// Waits until the pod's inbound listener is registered for steering.
    pub fn wait_inbound_ready(&self, pod: &LabPod) {
        wait_until(Duration::from_secs(20), || {
            self.status()["pods"].as_array().is_some_and(|pods| {
                pods.iter()
                    .any(|p| p["name"] == pod.netns.as_str() && p["inbound_ready"] == true)
            })
        });
    }

    /// A sidecar's Prometheus sample, read from inside its pod.
    pub fn proxy_metric(&self, pod: &LabPod, series: &str) -> f64 {
        let body = pod
            .run(|| {
                interceptor_lab::testapp::http_get(
                    SocketAddr::from(([127, 0, 0, 1], 15090)),
                    "/stats/prometheus",
                    Duration::from_secs(5),
                )
            })
            .expect("netns")
            .expect("metrics");
        let text = String::from_utf8_lossy(&body.body).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.apps.clear();
        self.sidecars.clear();
        self.processes.clear();
        for f in &self.temp_files {
            let _ = std::fs::remove_file(f);
        }
        while let Some(mut agent) = self.agents.pop() {
            agent.stop(Duration::from_secs(20));
        }
        // Whatever a failed test left: unpin so nothing stays attached.
        if self.pin_root.exists() {
            let _ = std::fs::remove_dir_all(&self.pin_root);
        }
        // And its lock and state files under /run: agents that keep the datapath on stop
        // (Kubernetes mode, `--keep-pinned`) leave them by design; a removed instance needs
        // none.
        let run_dir = interceptor::bpf::pins::Pins::new(&self.pin_root).run_dir();
        let _ = std::fs::remove_dir_all(run_dir);
    }
}

/// A snapshot of the datapath counters.
#[derive(Clone, Debug)]
pub struct Counters(Value);

impl Counters {
    pub fn get(&self, name: &str) -> u64 {
        self.0[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name}"))
    }

    /// How much `name` grew since `earlier`.
    pub fn since(&self, earlier: &Counters, name: &str) -> u64 {
        self.get(name) - earlier.get(name)
    }

    /// Asserts that connections to a pod were steered onto its sidecar since `earlier`, and none
    /// was refused. Not "exactly once per connection": sk_lookup runs for every listener lookup,
    /// so a retransmitted SYN (a loaded TCG guest) or a segment that arrives after the accepted
    /// socket is gone counts again. Tests show the count of connections on the app's side.
    pub fn assert_steered_inbound(&self, earlier: &Counters) {
        assert!(
            self.since(earlier, "inbound_assigned") >= 1,
            "no connection was steered onto the sidecar"
        );
        assert_eq!(self.since(earlier, "inbound_assign_failed"), 0);
        assert_eq!(self.since(earlier, "inbound_no_listener"), 0);
    }
}

/// Waits until thread `tid` of this process sleeps in the kernel (state S in its stat), e.g.
/// blocked in `read()`: a test about a wakeup must not act before the sleeper sleeps.
pub fn wait_blocked(tid: i32) {
    wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
            .ok()
            .and_then(|s| {
                // The state follows the command, which is in parentheses and may hold spaces.
                let (_, rest) = s.rsplit_once(')')?;
                rest.split_whitespace().next().map(|st| st == "S")
            })
            .unwrap_or(false)
    });
    // It may still be on its way into the wait; a moment more puts it inside.
    thread::sleep(Duration::from_millis(20));
}

/// Polls `f` until true; panics after `timeout`.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "condition not met in {timeout:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// What a test server saw of one connection.
#[derive(Clone, Debug)]
pub struct Seen {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// The accepted socket's TCP_NODELAY as accept() returned it (the server never sets it).
    pub nodelay: bool,
}

/// A TCP server bound inside a pod: echoes every byte back and records each connection
/// before it echoes anything.
pub struct EchoServer {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    _notify: mpsc::Receiver<()>,
}

impl EchoServer {
    /// Binds `addr` inside `pod` and serves from background threads (sockets keep their netns).
    pub fn start(pod: &LabPod, addr: SocketAddr) -> Self {
        let listener = pod
            .run(|| TcpListener::bind(addr))
            .expect("netns")
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        let addr = listener.local_addr().expect("local addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let record = seen.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { break };
                let (Ok(peer), Ok(local), Ok(nodelay)) =
                    (stream.peer_addr(), stream.local_addr(), stream.nodelay())
                else {
                    continue;
                };
                record.lock().expect("lock").push(Seen {
                    peer,
                    local,
                    nodelay,
                });
                let _ = tx.send(());
                thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if stream.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = stream.shutdown(Shutdown::Write);
                });
            }
        });
        Self {
            addr,
            seen,
            _notify: rx,
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

/// Connects from inside `pod` (the socket is created there), with a timeout.
pub fn connect_from(pod: &LabPod, addr: SocketAddr) -> std::io::Result<TcpStream> {
    pod.run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
        .expect("netns")
}

/// Sends `payload` and reads the echo back, full duplex, then half-closes and expects the
/// server's EOF.
///
/// Written as an event-loop app does it (non-blocking socket + `poll`, like Go, Java NIO, Node,
/// tokio and Envoy): a *blocking* read on a socket in a sockmap can return EAGAIN when another
/// thread's activity on the same socket wakes it without data (a kernel behaviour covered by
/// its own tests in `tests/sockmap.rs`), which is not what these tests are about.
pub fn echo_round_trip(stream: TcpStream, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::{io::ErrorKind, os::fd::AsRawFd};

    let deadline = Instant::now() + Duration::from_secs(30);
    stream.set_nonblocking(true)?;
    let mut socket = stream;
    let mut sent = 0;
    let mut back = Vec::with_capacity(payload.len());
    let mut buf = vec![0u8; 256 * 1024];
    let mut half_closed = false;
    loop {
        if back.len() >= payload.len() && !half_closed {
            // Everything came back: the EOF must follow the half-close.
            socket.shutdown(Shutdown::Write)?;
            half_closed = true;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(std::io::Error::new(
                ErrorKind::TimedOut,
                format!(
                    "echo: sent {sent}, got {} of {} bytes",
                    back.len(),
                    payload.len()
                ),
            ));
        }
        let mut events = libc::POLLIN;
        if sent < payload.len() {
            events |= libc::POLLOUT;
        }
        let mut fd = libc::pollfd {
            fd: socket.as_raw_fd(),
            events,
            revents: 0,
        };
        let timeout = remaining.as_millis().min(1000) as libc::c_int;
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut fd, 1, timeout) } < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if fd.revents & libc::POLLOUT != 0 && sent < payload.len() {
            let end = payload.len().min(sent + buf.len());
            match socket.write(&payload[sent..end]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if fd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            match socket.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => back.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
    if back.len() != payload.len() {
        return Err(std::io::Error::other(format!(
            "echo: {} bytes back for {} sent (EOF {})",
            back.len(),
            payload.len(),
            if back.len() > payload.len() {
                "after unexpected bytes"
            } else {
                "too early"
            }
        )));
    }
    Ok(back)
}

/// A deterministic pseudo-random payload (so corruption or reordering shows).
pub fn payload(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn ip4(pod: &LabPod) -> IpAddr {
    IpAddr::V4(pod.ip)
}
