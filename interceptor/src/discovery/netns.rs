//! Network namespaces: naming them, entering them on a dedicated thread, and reading what the
//! datapath needs from inside (the namespace cookie, the pod's addresses).
//!
//! `setns` changes only the calling thread, so work inside a namespace runs on a thread of its
//! own; never `ip netns exec`, which remounts /sys and hides the cgroup and bpffs mounts.

#![allow(
    unsafe_code,
    reason = "setns in a pre_exec hook, NS_GET_NSTYPE and the SIOCSIFADDR ioctl for ::6 on lo"
)]

use std::{
    collections::HashMap,
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    os::{
        fd::{AsFd, AsRawFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};

/// Where `ip netns add` puts named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "network namespace {path} not found ({source}); list them with `ip netns list`, or \
         name a process with --pid"
    )]
    NotFound {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a network namespace")]
    NotNetns { path: PathBuf },
    #[error("entering network namespace {path}: {source}{lacks}; setns() needs CAP_SYS_ADMIN")]
    Enter {
        path: PathBuf,
        #[source]
        source: nix::Error,
        /// Names the capability when this process lacks it.
        lacks: String,
    },
    #[error("thread inside network namespace {path} panicked")]
    Thread { path: PathBuf },
}

/// An open network namespace and its identity (nsfs device and inode).
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    file: File,
    pub dev: u64,
    pub ino: u64,
}

impl Netns {
    /// A namespace created with `ip netns add NAME`.
    pub fn by_name(name: &str) -> Result<Self, Error> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(Error::NotFound {
                path: PathBuf::from(name),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a netns name"),
            });
        }
        Self::open(Path::new(NETNS_RUN_DIR).join(name))
    }

    /// The namespace a process lives in.
    pub fn by_pid(pid: u32) -> Result<Self, Error> {
        Self::open(format!("/proc/{pid}/ns/net"))
    }

    /// The calling thread's own namespace.
    pub fn current() -> Result<Self, Error> {
        Self::open("/proc/thread-self/ns/net")
    }

    pub fn open(path: impl Into<PathBuf>) -> Result<Self, Error> {
        let path = path.into();
        let file = File::open(&path).map_err(|source| Error::NotFound {
            path: path.clone(),
            source,
        })?;
        let meta = file.metadata().map_err(|source| Error::NotFound {
            path: path.clone(),
            source,
        })?;
        // nsfs files are what /proc/*/ns/net and `ip netns` bind mounts point at.
        if !is_netns(&file) {
            return Err(Error::NotNetns { path });
        }
        Ok(Self {
            path,
            file,
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Runs `f` on a thread inside this namespace and returns its result.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, Error> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| {
                        Error::Enter {
                            path: self.path.clone(),
                            source,
                            lacks: crate::capabilities::denied_hint(
                                Some(source as i32),
                                crate::capabilities::Capability::SysAdmin,
                            ),
                        }
                    })?;
                    Ok(f())
                })
                .join()
                .map_err(|_| Error::Thread {
                    path: self.path.clone(),
                })?
        })
    }

    /// Starts `cmd` inside this namespace (the child enters it between fork and exec; the
    /// mount namespace stays the caller's, unlike `ip netns exec`).
    pub fn spawn(&self, cmd: &mut std::process::Command) -> io::Result<std::process::Child> {
        use std::os::unix::process::CommandExt as _;
        let fd = self.file.as_raw_fd();
        // SAFETY: only the async-signal-safe setns syscall runs between fork and exec, on a
        // descriptor that stays open until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn()
    }

    /// Whether this is the node's own network namespace (init's, or this process's): the one
    /// namespace that must never be intercepted, since host traffic would go to a proxy.
    pub fn is_node(&self) -> bool {
        ["/proc/1/ns/net", "/proc/self/ns/net"]
            .iter()
            .any(|p| std::fs::metadata(p).is_ok_and(|m| self.same_as(m.dev(), m.ino())))
    }

    /// Whether `other` is the same namespace.
    pub fn same_as(&self, dev: u64, ino: u64) -> bool {
        self.dev == dev && self.ino == ino
    }

    /// The namespace's cookie (`SO_NETNS_COOKIE`, Linux >= 5.14), None where the kernel cannot
    /// say. Unlike the nsfs inode number, a cookie is never reused.
    pub fn cookie(&self) -> Option<u64> {
        self.run(current_cookie).ok()?.ok().flatten()
    }

    /// Whether this is the namespace recorded as (`dev`, `ino`, `cookie`): nsfs hands a dead
    /// namespace's inode number to the next one created, so where both a recorded cookie
    /// (non-zero) and the kernel's are known, they must agree too.
    pub fn is(&self, dev: u64, ino: u64, cookie: u64) -> bool {
        self.same_as(dev, ino) && (cookie == 0 || self.cookie().is_none_or(|c| c == cookie))
    }
}

fn is_netns(file: &File) -> bool {
    const NSIO: u8 = 0xb7;
    // NS_GET_NSTYPE = _IO(0xb7, 0x3): returns CLONE_NEWNET for a network namespace.
    nix::ioctl_none!(ns_get_nstype, NSIO, 0x3);
    // SAFETY: the ioctl takes no argument and only reads the file's namespace type.
    match unsafe { ns_get_nstype(file.as_raw_fd()) } {
        Ok(kind) => kind == libc::CLONE_NEWNET,
        // Kernels without NS_GET_NSTYPE (< 4.11): trust the path.
        Err(_) => true,
    }
}

/// Adds `addr`/128 to the calling thread's namespace's loopback, if it is not there yet (Istio's
/// IPv6 passthrough source `::6` lives there; loopback addresses skip duplicate detection).
pub fn ensure_loopback_v6(addr: std::net::Ipv6Addr) -> io::Result<()> {
    let sock = std::net::UdpSocket::bind("[::1]:0")?;
    // SAFETY: a NUL-terminated interface name.
    let index = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    let req = libc::in6_ifreq {
        ifr6_addr: libc::in6_addr {
            s6_addr: addr.octets(),
        },
        ifr6_prefixlen: 128,
        ifr6_ifindex: index as libc::c_int,
    };
    // SAFETY: SIOCSIFADDR on an AF_INET6 socket reads one in6_ifreq from a valid pointer.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFADDR, &req) };
    if ret == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EEXIST) => Ok(()),
        _ => Err(err),
    }
}

/// `SO_NETNS_COOKIE` (Linux >= 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The calling thread's network-namespace cookie via `SO_NETNS_COOKIE`, or None when the kernel
/// does not have it (< 5.14).
pub fn current_cookie() -> io::Result<Option<u64>> {
    let sock = UdpSocket::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .or_else(|_| UdpSocket::bind("[::1]:0"))?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let ret = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if ret == 0 {
        return Ok(Some(cookie));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENOPROTOOPT) => Ok(None),
        _ => Err(err),
    }
}

/// A socket's cookie (`SO_COOKIE`).
pub fn socket_cookie(fd: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if ret == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes the UDP "connect" connect4 recognises as a cookie probe and returns the probe socket's
/// cookie; the datapath records the namespace cookie under it (for kernels < 5.14).
pub fn probe_socket_cookie() -> io::Result<u64> {
    use interceptor_common::names::{NETNS_PROBE_IP4, NETNS_PROBE_PORT};
    let sock = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))?;
    // UDP connect sends nothing; it only runs the connect4 hook.
    sock.connect(SocketAddr::from((
        Ipv4Addr::from(NETNS_PROBE_IP4),
        NETNS_PROBE_PORT,
    )))?;
    socket_cookie(&sock)
}

/// The calling thread's namespace's own addresses: unicast addresses of its non-loopback
/// interfaces, not IPv6 link-local.
pub fn pod_addresses() -> io::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
        // Loopback holds 127.0.0.1, ::1 and Istio's ::6: never the pod's own address.
        if ifa
            .flags
            .contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK)
        {
            continue;
        }
        let Some(addr) = ifa.address else { continue };
        let ip = if let Some(v4) = addr.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        let usable = match ip {
            IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_unspecified() && !v4.is_link_local(),
            IpAddr::V6(v6) => {
                !v6.is_loopback() && !v6.is_unspecified() && !v6.is_unicast_link_local()
            }
        };
        if usable && !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

/// The processes (`/proc/PID` directories, with their pid) whose network namespace is the one
/// with this identity. Scans /proc: only for slow paths.
pub fn processes_in(dev: u64, ino: u64) -> impl Iterator<Item = (i32, PathBuf)> {
    processes().filter(move |(_, dir)| {
        std::fs::metadata(dir.join("ns/net")).is_ok_and(|m| m.dev() == dev && m.ino() == ino)
    })
}

/// Every process's `/proc/PID` directory, with its pid.
fn processes() -> impl Iterator<Item = (i32, PathBuf)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
            Some((pid, e.path()))
        })
}

/// Which network namespace each process is in: one walk of /proc, taken when first asked, for
/// a pass that looks for many pods whose names no longer resolve (a walk per pod made a pass
/// over thousands of deleted pods O(pods × processes)). A snapshot: a process that enters or
/// leaves a namespace after the walk is seen by the next pass.
#[derive(Default)]
pub struct NetnsOwners {
    /// Every process the walk saw in each namespace: the first may exit before it is asked
    /// about while others stay.
    by_ns: Option<HashMap<(u64, u64), Vec<PathBuf>>>,
}

impl NetnsOwners {
    /// `/proc/PID/ns/net` of a process the walk saw in the namespace (dev, ino) for which `ok`
    /// holds (the first such, in /proc order).
    pub fn find(&mut self, dev: u64, ino: u64, ok: impl Fn(&PathBuf) -> bool) -> Option<PathBuf> {
        self.by_ns
            .get_or_insert_with(|| {
                let mut by_ns = HashMap::new();
                for (_, dir) in processes() {
                    let path = dir.join("ns/net");
                    if let Ok(m) = std::fs::metadata(&path) {
                        by_ns
                            .entry((m.dev(), m.ino()))
                            .or_insert_with(Vec::new)
                            .push(path);
                    }
                }
                by_ns
            })
            .get(&(dev, ino))?
            .iter()
            .find(|p| ok(p))
            .cloned()
    }
}
