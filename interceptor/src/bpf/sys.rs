//! The raw bpf(2) commands aya 0.14 does not expose: link create + pin for cgroup/getsockopt
//! (aya attaches it with a bpf_link but has no `TryFrom<CgroupSockoptLink> for FdLink`, so the
//! link could not be pinned and would detach when the agent exits), and for the in-place upgrade
//! (`bpf/upgrade.rs`) opening a pinned link, reading which program it runs, swapping that
//! program atomically, and re-attaching sk_msg to the sockhash. Everything else goes through aya.

#![allow(unsafe_code, reason = "the bpf(2) commands aya 0.14 does not expose")]

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `BPF_F_REPLACE`: the update only happens if the link still runs `old_prog_fd`.
const BPF_F_REPLACE: u32 = 1 << 2;
/// `enum bpf_attach_type`: BPF_SK_MSG_VERDICT.
pub(super) const BPF_SK_MSG_VERDICT: u32 = 7;
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

/// The `link_update` member of `union bpf_attr`.
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
    rest: [u8; 48],
}

/// The `prog_attach` member of `union bpf_attr` (target, program, type, flags, replace).
#[repr(C)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
    rest: [u8; 44],
}

/// The `info` member of `union bpf_attr`.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
    rest: [u8; 48],
}

/// The head of `struct bpf_link_info` (type, id, prog_id, then the per-type union: for cgroup
/// links `cgroup_id`, 8-aligned).
#[repr(C)]
#[derive(Default)]
struct LinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    pad: u32,
    target: [u64; 6],
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

/// `BPF_OBJ_GET`: opens a pinned bpf object (a link here).
pub(super) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = ObjPinAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        rest: [0; 44],
    };
    let fd = bpf(
        BPF_OBJ_GET,
        (&attr as *const ObjPinAttr).cast(),
        std::mem::size_of::<ObjPinAttr>(),
    )?;
    // SAFETY: the kernel returned a new descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The program a link runs, and its target (the cgroup id for cgroup links).
pub(super) fn link_info(link: BorrowedFd<'_>) -> io::Result<(u32, u64)> {
    let mut info = LinkInfo::default();
    let attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfo>() as u32,
        info: (&mut info as *mut LinkInfo) as u64,
        rest: [0; 48],
    };
    bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        (&attr as *const InfoAttr).cast(),
        std::mem::size_of::<InfoAttr>(),
    )?;
    Ok((info.prog_id, info.target[0]))
}

/// `BPF_PROG_GET_FD_BY_ID`: opens the program of the given id (the one a link runs).
pub(super) fn prog_get_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct GetIdAttr {
        id: u32,
        next_id: u32,
        open_flags: u32,
        rest: [u8; 52],
    }
    let attr = GetIdAttr {
        id,
        next_id: 0,
        open_flags: 0,
        rest: [0; 52],
    };
    let fd = bpf(
        BPF_PROG_GET_FD_BY_ID,
        (&attr as *const GetIdAttr).cast(),
        std::mem::size_of::<GetIdAttr>(),
    )?;
    // SAFETY: the kernel returned a new descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_UPDATE` with `BPF_F_REPLACE`: the link runs `new` from the next event on, but only
/// if it still ran `old` (so two agents upgrading at once cannot interleave). Kernel >= 5.7.
pub(super) fn link_update(
    link: BorrowedFd<'_>,
    new: BorrowedFd<'_>,
    old: BorrowedFd<'_>,
) -> io::Result<()> {
    let attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new.as_raw_fd() as u32,
        flags: BPF_F_REPLACE,
        old_prog_fd: old.as_raw_fd() as u32,
        rest: [0; 48],
    };
    bpf(
        BPF_LINK_UPDATE,
        (&attr as *const LinkUpdateAttr).cast(),
        std::mem::size_of::<LinkUpdateAttr>(),
    )
    .map(|_| ())
}

/// `BPF_PROG_ATTACH` of a program to a sockmap/sockhash: the map's program slot is swapped in
/// one exchange (sockets added from then on get `prog`, existing ones keep theirs), so there is
/// no moment without a program.
pub(super) fn prog_attach_map(
    prog: BorrowedFd<'_>,
    map: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<()> {
    let attr = ProgAttachAttr {
        target_fd: map.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type,
        attach_flags: 0,
        replace_bpf_fd: 0,
        rest: [0; 44],
    };
    bpf(
        BPF_PROG_ATTACH,
        (&attr as *const ProgAttachAttr).cast(),
        std::mem::size_of::<ProgAttachAttr>(),
    )
    .map(|_| ())
}

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// The `map_elem` member of `union bpf_attr` as `BPF_MAP_GET_NEXT_KEY` reads it.
#[repr(C)]
struct MapNextKeyAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    next_key: u64,
    rest: [u8; 40],
}

/// How many keys map `fd` holds (keys of `key_size` bytes), walking `BPF_MAP_GET_NEXT_KEY`: the
/// one walk that works for every keyed map type (hash, LRU, LPM trie, sockhash) without
/// knowing the key's type. Bounded by `limit` so a map that changes under the walk (a hash
/// map restarts from the first key when the current one is deleted) still ends.
pub(super) fn count_keys(fd: BorrowedFd<'_>, key_size: usize, limit: usize) -> io::Result<usize> {
    let mut key = vec![0u8; key_size.max(1)];
    let mut next = vec![0u8; key_size.max(1)];
    let mut count = 0;
    while count < limit && next_key(fd, (count > 0).then_some(&key[..]), &mut next)? {
        count += 1;
        std::mem::swap(&mut key, &mut next);
    }
    Ok(count)
}

/// `BPF_MAP_GET_NEXT_KEY` from `key` (None: the first key) into `next`; false at the end.
fn next_key(fd: BorrowedFd<'_>, key: Option<&[u8]>, next: &mut [u8]) -> io::Result<bool> {
    let attr = MapNextKeyAttr {
        map_fd: fd.as_raw_fd() as u32,
        pad: 0,
        key: key.map_or(0, |k| k.as_ptr() as u64),
        next_key: next.as_mut_ptr() as u64,
        rest: [0; 40],
    };
    match bpf(
        BPF_MAP_GET_NEXT_KEY,
        (&attr as *const MapNextKeyAttr).cast(),
        std::mem::size_of::<MapNextKeyAttr>(),
    ) {
        Ok(_) => Ok(true),
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(err) => Err(err),
    }
}

/// Whether a hash map or sockhash holds `key`, in three `BPF_MAP_GET_NEXT_KEY` calls: for a
/// key it does not hold the kernel answers with the map's first key (`htab_map_get_next_key`,
/// `sock_hash_get_next_key`: "not found → find_first_elem"), for a key it holds with the key
/// after it, never the first, or with the end. A sockhash with 4-byte values cannot be looked
/// up from user space (`ENOSPC`): this replaced a walk of every key (10 000 syscalls at 10 000
/// pods) per question. The first key is read before and after; if it changed meanwhile the
/// question is asked again (keys are socket cookies, never reused), and after a few tries the
/// caller walks the map instead (`Interrupted`).
pub(super) fn holds_key(fd: BorrowedFd<'_>, key: &[u8]) -> io::Result<bool> {
    let n = key.len();
    let (mut first, mut after, mut first_again) = (vec![0u8; n], vec![0u8; n], vec![0u8; n]);
    for _ in 0..4 {
        let any = next_key(fd, None, &mut first)?;
        let more = next_key(fd, Some(key), &mut after)?;
        let still = next_key(fd, None, &mut first_again)?;
        if any != still || (any && first != first_again) {
            continue;
        }
        return Ok(match (any, more) {
            // Empty map.
            (false, _) => false,
            // The key was the last one.
            (true, false) => true,
            (true, true) => after != first,
        });
    }
    Err(io::Error::from(io::ErrorKind::Interrupted))
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
    rest: [u8; 16],
}

/// Every (key, value) of a hash map in a few `BPF_MAP_LOOKUP_BATCH` calls (Linux >= 5.6)
/// instead of two syscalls per entry: at 10 000 pods the per-pod tables hold 60 000+ rows, and
/// reading them one by one made every `pod enable` and agent pass cost ~100 ms. `K` and `V` are
/// the map's plain-data key and value types. Errors (an older kernel, a map type without
/// batch support) are the caller's cue to walk the map instead.
pub(super) fn lookup_batch<K: aya::Pod, V: aya::Pod>(
    fd: BorrowedFd<'_>,
    capacity: usize,
) -> io::Result<Vec<(K, V)>> {
    let (ks, vs) = (std::mem::size_of::<K>(), std::mem::size_of::<V>());
    let mut chunk = 1024usize.min(capacity.max(1));
    let mut out = Vec::new();
    // The hash map's cursor is a bucket index (u32); 8 bytes leave room either way.
    let mut cursor = [0u8; 8];
    let mut next = [0u8; 8];
    let mut first = true;
    loop {
        let mut keys = vec![0u8; ks * chunk];
        let mut values = vec![0u8; vs * chunk];
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { cursor.as_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
            rest: [0; 16],
        };
        let result = bpf(
            BPF_MAP_LOOKUP_BATCH,
            (&mut attr as *mut BatchAttr).cast_const().cast(),
            std::mem::size_of::<BatchAttr>(),
        );
        // The kernel writes the number of elements it filled back into `count`.
        let filled = attr.count as usize;
        let done = match result {
            Ok(_) => false,
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => true,
            // A bucket holds more entries than `chunk`: ask again with room for them.
            Err(err) if err.raw_os_error() == Some(libc::ENOSPC) && chunk < capacity => {
                chunk = (chunk * 4).min(capacity.max(1));
                continue;
            }
            Err(err) => return Err(err),
        };
        for i in 0..filled.min(chunk) {
            // SAFETY: the kernel filled `filled` keys and values of the map's sizes, which are
            // K's and V's (plain-data types, any bit pattern valid); reads are unaligned-safe.
            let (k, v) = unsafe {
                (
                    std::ptr::read_unaligned(keys.as_ptr().add(i * ks).cast::<K>()),
                    std::ptr::read_unaligned(values.as_ptr().add(i * vs).cast::<V>()),
                )
            };
            out.push((k, v));
        }
        if done {
            return Ok(out);
        }
        cursor = next;
        first = false;
        if out.len() > 2 * capacity {
            // The map changed under us so much the walk cannot end: let the caller iterate.
            return Err(io::Error::from(io::ErrorKind::Interrupted));
        }
    }
}
