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

/// The proxy's running identity is not one interception leaves alone.
#[derive(Debug, thiserror::Error)]
#[error(
    "the proxy runs as UID {euid} / GID {egid}, but interception exempts only UID {uid} / GID \
     {gid} (never 0): its own upstream connections would be captured again, a loop. Start it \
     as root so it drops to --uid/--gid, run it as that identity, or enable the pod with its \
     real identity (pod enable --proxy-uid/--proxy-gid)"
)]
pub struct NotExempt {
    euid: u32,
    egid: u32,
    uid: u32,
    gid: u32,
}

/// Checks that the calling process is exempt from interception as the pod's proxy identity
/// `uid`/`gid`: the same rule connect4/6 apply (a match on a non-zero UID or GID).
pub fn check_exempt(uid: u32, gid: u32) -> Result<(), NotExempt> {
    let (euid, egid) = (geteuid().as_raw(), nix::unistd::getegid().as_raw());
    if (euid != 0 && euid == uid) || (egid != 0 && egid == gid) {
        return Ok(());
    }
    Err(NotExempt {
        euid,
        egid,
        uid,
        gid,
    })
}
