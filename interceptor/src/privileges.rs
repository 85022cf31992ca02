//! Dropping root: the sidecar runs as the proxy identity (UID/GID 1337), which is what keeps its
//! own connections from being intercepted again.

use nix::unistd::{Gid, Uid, geteuid, setgroups, setresgid, setresuid};

#[derive(Debug, thiserror::Error)]
#[error("dropping privileges to {uid}:{gid}: {source}")]
pub struct Error {
    uid: u32,
    gid: u32,
    #[source]
    source: nix::Error,
}

/// When running as root, becomes `uid`:`gid` (no supplementary groups). Must run before any
/// thread is started. Returns whether anything changed.
pub fn drop_to(uid: u32, gid: u32) -> Result<bool, Error> {
    if !geteuid().is_root() {
        return Ok(false);
    }
    let err = |source| Error { uid, gid, source };
    let (u, g) = (Uid::from_raw(uid), Gid::from_raw(gid));
    setgroups(&[g]).map_err(err)?;
    setresgid(g, g, g).map_err(err)?;
    setresuid(u, u, u).map_err(err)?;
    Ok(true)
}
