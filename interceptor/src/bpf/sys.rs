//! The two raw bpf(2) commands aya 0.14 does not expose for cgroup/getsockopt: aya attaches it
//! with a bpf_link but has no `TryFrom<CgroupSockoptLink> for FdLink`, so the link could not be
//! pinned and would detach when the agent exits. Everything else goes through aya.

#![allow(unsafe_code, reason = "the bpf(2) commands aya 0.14 does not expose")]

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
/// `enum bpf_attach_type`: BPF_CGROUP_GETSOCKOPT.
pub(super) const BPF_CGROUP_GETSOCKOPT: u32 = 21;

/// The `link_create` member of `union bpf_attr`, zero-padded (the kernel wants unused bytes 0).
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    rest: [u8; 48],
}

/// The `obj_pin` member of `union bpf_attr`.
#[repr(C)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    rest: [u8; 44],
}

fn bpf(cmd: libc::c_long, attr: *const u8, size: usize) -> io::Result<i64> {
    // SAFETY: attr points to a live, zero-padded attribute struct of `size` bytes.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size as libc::c_uint) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `BPF_LINK_CREATE` of a cgroup program: returns the link's descriptor.
pub(super) fn link_create(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
    flags: u32,
) -> io::Result<OwnedFd> {
    let attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: target.as_raw_fd() as u32,
        attach_type,
        flags,
        rest: [0; 48],
    };
    let fd = bpf(
        BPF_LINK_CREATE,
        (&attr as *const LinkCreateAttr).cast(),
        std::mem::size_of::<LinkCreateAttr>(),
    )?;
    // SAFETY: the kernel returned a new descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_OBJ_PIN`: pins a bpf object (here a link) at `path` on bpffs.
pub(super) fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = ObjPinAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
        path_fd: 0,
        rest: [0; 44],
    };
    bpf(
        BPF_OBJ_PIN,
        (&attr as *const ObjPinAttr).cast(),
        std::mem::size_of::<ObjPinAttr>(),
    )
    .map(|_| ())
}
