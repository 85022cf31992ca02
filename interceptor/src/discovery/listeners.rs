//! Matching each pod to its proxy's inbound listener, for `steer_inbound`.
//!
//! sockops puts every listener on the inbound port into `LISTENERS` (keyed by socket cookie)
//! when it calls listen(), but it cannot tell which pod the socket belongs to on every kernel.
//! The agent can: it asks `sock_diag` inside the pod's network namespace for the listening
//! socket on that port, and records its cookie under the pod in `POD_LISTENER`. A listener that
//! predates the programs (proxy started before the agent) is not in `LISTENERS`: the agent then
//! takes a duplicate of its file descriptor from the owning process (`pidfd_getfd`, Linux >= 5.6)
//! and inserts it itself. Works with any proxy that listens on the Istio port.

#![allow(
    unsafe_code,
    reason = "pidfd_open + pidfd_getfd to inspect a pod's listening socket"
)]

use std::{
    fs, io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};
use tracing::{debug, info};

use crate::{
    bpf::{
        Maps,
        maps::{ListenerFamily, WriteError},
    },
    capabilities::{self, Capability},
    discovery::netns::Netns,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("sock_diag in {netns}: {source}")]
    Diag {
        netns: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Netns(#[from] crate::discovery::netns::Error),
    #[error("no socket listens on port {port} in {netns}: is the proxy running?")]
    NoListener { port: u16, netns: String },
    #[error(
        "the listener on port {port} (socket inode {inode}) predates the datapath and its \
         owning process could not lend it ({source}){lacks}; restart the proxy"
    )]
    Adopt {
        port: u16,
        inode: u32,
        #[source]
        source: io::Error,
        /// Names CAP_SYS_PTRACE when the kernel refused and this process lacks it.
        lacks: String,
    },
    #[error(transparent)]
    Map(#[from] WriteError),
}

/// A listening TCP socket as sock_diag reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listener {
    pub cookie: u64,
    pub inode: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
}

/// Finds the pod's listeners on `port` and records them for `steer_inbound`, one per address
/// family: IPv4 connections go to an IPv4 listener (else to an IPv6 one, which takes IPv4 when
/// it is dual-stack), IPv6 connections to an IPv6 listener. A proxy with separate sockets
/// (Envoy: `0.0.0.0:15006` and `[::]:15006` v6only) gets each family on its own socket.
/// Returns the IPv4 one's cookie.
///
/// Returns the cookies of every listener on the port in the pod (a proxy may listen with several
/// SO_REUSEPORT sockets, as Envoy does per worker; the first of each family is recorded).
pub fn resolve(maps: &mut Maps, pod_id: u32, netns: &Netns, port: u16) -> Result<Vec<u64>, Error> {
    let found = netns
        .run(|| listening_on(port))?
        .map_err(|source| Error::Diag {
            netns: netns.path().display().to_string(),
            source,
        })?;
    let v4 = found.iter().find(|l| l.family == AF_INET).copied();
    let v6 = found.iter().find(|l| l.family == AF_INET6).copied();
    let Some(first) = v4.or(v6) else {
        // The proxy is gone: forget the old socket so nothing is steered to a stale cookie.
        maps.forget_pod_listener(pod_id, ListenerFamily::V4);
        maps.forget_pod_listener(pod_id, ListenerFamily::V6);
        return Err(Error::NoListener {
            port,
            netns: netns.path().display().to_string(),
        });
    };
    register(maps, pod_id, netns, port, first, false)?;
    match v6 {
        Some(v6) => register(maps, pod_id, netns, port, v6, true)?,
        None => maps.forget_pod_listener(pod_id, ListenerFamily::V6),
    }
    Ok(found.iter().map(|l| l.cookie).collect())
}

/// Records one listener under the pod (`POD_LISTENER`, or `POD_LISTENER6` for `v6`).
fn register(
    maps: &mut Maps,
    pod_id: u32,
    netns: &Netns,
    port: u16,
    listener: Listener,
    v6: bool,
) -> Result<(), Error> {
    let family = if v6 {
        ListenerFamily::V6
    } else {
        ListenerFamily::V4
    };
    if maps.pod_listener(pod_id, family) == Some(listener.cookie)
        && maps.has_listener(listener.cookie)
    {
        return Ok(());
    }
    if !maps.has_listener(listener.cookie) {
        let fd = borrow_socket(netns, listener.inode).map_err(|source| Error::Adopt {
            port,
            inode: listener.inode,
            lacks: capabilities::hint(&source, Capability::SysPtrace),
            source,
        })?;
        maps.add_listener(listener.cookie, &fd)?;
        debug!(
            cookie = listener.cookie,
            "adopted a listener that predates the datapath"
        );
    }
    maps.set_pod_listener(pod_id, family, listener.cookie)?;
    info!(
        pod_id,
        port,
        v6,
        cookie = listener.cookie,
        "inbound listener registered"
    );
    Ok(())
}

/// Listening TCP sockets (IPv4 and IPv6) on `port` in the calling thread's namespace.
pub fn listening_on(port: u16) -> io::Result<Vec<Listener>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut out = Vec::new();
    for family in [AF_INET, AF_INET6] {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let socket_id = if family == AF_INET {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        };
        let mut request = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::LISTEN,
                socket_id,
            })
            .into(),
        );
        request.finalize();
        let mut buf = vec![0; request.buffer_len()];
        request.serialize(&mut buf);
        socket.send(&buf, 0)?;
        dump(&socket, |id, inode| {
            if id.source_port == port {
                out.push(Listener {
                    cookie: cookie_of(&id.cookie),
                    inode,
                    family,
                });
            }
        })?;
    }
    Ok(out)
}

/// Reads one sock_diag dump to its end.
fn dump(socket: &Socket, mut each: impl FnMut(&SocketId, u32)) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut buf[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[offset..size])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    each(&r.header.socket_id, r.header.inode);
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return Err(e.to_io());
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

/// `idiag_cookie` is two host-order u32 words, low word first (sock_diag_save_cookie).
fn cookie_of(bytes: &[u8; 8]) -> u64 {
    let lo = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let hi = u32::from_ne_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    (u64::from(hi) << 32) | u64::from(lo)
}

/// A duplicate of the socket with this inode, taken from a process in the namespace.
///
/// The process's descriptors are duplicated one by one up to its table size and compared by
/// inode, instead of listing `/proc/PID/fd`: that directory is 0500 and owned by the process's
/// UID when it is dumpable (a proxy exec'd as 1337, as Envoy is), so listing it would take
/// CAP_DAC_READ_SEARCH too, while `pidfd_getfd` needs only the ptrace access (CAP_SYS_PTRACE).
fn borrow_socket(netns: &Netns, inode: u32) -> io::Result<OwnedFd> {
    for (pid, dir) in crate::discovery::netns::processes_in(netns.dev, netns.ino) {
        let Some(size) = fd_table_size(&dir) else {
            continue;
        };
        let pidfd = match pidfd_open(pid) {
            Ok(fd) => fd,
            // Exited since the scan.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => continue,
            Err(e) => return Err(e),
        };
        for num in 0..size {
            match pidfd_getfd(&pidfd, num) {
                Ok(fd) => {
                    let is_target = nix::sys::stat::fstat(fd.as_raw_fd()).is_ok_and(|st| {
                        st.st_mode & libc::S_IFMT == libc::S_IFSOCK && st.st_ino == u64::from(inode)
                    });
                    if is_target {
                        return Ok(fd);
                    }
                }
                // A hole in the table, or the process exited meanwhile.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBADF | libc::ESRCH)) => {}
                // EPERM: the ptrace access check.
                Err(e) => return Err(e),
            }
        }
    }
    // A process whose /proc/PID/ns/net the ptrace check hid cannot be told apart from one in
    // another pod: say that the search was blind rather than that nobody holds the socket.
    if hidden_processes() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "no visible process holds the socket and some processes' /proc/PID/ns/net are \
             unreadable",
        ));
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "no process in the pod holds the socket",
    ))
}

/// Most descriptors scanned in one process: `FDSize` is the table's allocated size, which
/// only a process that once held that many descriptors reaches.
const MAX_FDS: i32 = 1 << 20;

/// `FDSize` of `/proc/PID/status` (readable by anyone): every open descriptor is below it.
fn fd_table_size(proc_dir: &std::path::Path) -> Option<i32> {
    let status = fs::read_to_string(proc_dir.join("status")).ok()?;
    let size = status
        .lines()
        .find_map(|l| l.strip_prefix("FDSize:"))?
        .trim()
        .parse::<i32>()
        .ok()?;
    Some(size.min(MAX_FDS))
}

/// Whether some process's `/proc/PID/ns/net` is refused to this one.
fn hidden_processes() -> bool {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .any(|e| {
            fs::metadata(e.path().join("ns/net"))
                .is_err_and(|err| err.kind() == io::ErrorKind::PermissionDenied)
        })
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: a plain syscall; the returned descriptor is owned here.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        if pidfd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(pidfd as i32))
    }
}

fn pidfd_getfd(pidfd: &OwnedFd, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: a plain syscall; the returned descriptor is owned here.
    unsafe {
        let dup = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(dup as i32))
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn cookie_words() {
        let c: u64 = 0x1122_3344_5566_7788;
        let lo = (c as u32).to_ne_bytes();
        let hi = ((c >> 32) as u32).to_ne_bytes();
        let bytes = [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]];
        assert_eq!(cookie_of(&bytes), c);
    }

    /// sock_diag's cookie is the socket's SO_COOKIE (what the programs see).
    #[test]
    fn diag_finds_a_listener_with_its_cookie() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let found = listening_on(port).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            found[0].cookie,
            crate::discovery::netns::socket_cookie(&l).unwrap()
        );
        assert!(listening_on(port).unwrap().iter().all(|f| f.inode != 0));
    }
}
