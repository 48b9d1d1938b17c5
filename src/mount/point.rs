//! The mountpoint: where a mount is, whether it is alive, whether a new
//! mount may go there, and unmounting it without losing written data.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::MountError;
use crate::daemon;

/// `mnt` made absolute and resolved, without touching `mnt` itself when it
/// is a dead FUSE mount (any access to it fails with ENOTCONN).
pub fn resolve_mountpoint(mnt: &Path) -> PathBuf {
    let abs = std::path::absolute(mnt).unwrap_or_else(|_| mnt.to_path_buf());
    match (abs.parent().and_then(|p| std::fs::canonicalize(p).ok()), abs.file_name()) {
        (Some(parent), Some(name)) => parent.join(name),
        _ => abs,
    }
}

/// The FUSE mount at `mnt`, from /proc/self/mountinfo (escapes decoded, so
/// a path with a space is found).
fn fuse_mount_at(mnt: &Path) -> Option<daemon::MountEntry> {
    let at = resolve_mountpoint(mnt);
    daemon::mounts()
        .ok()?
        .into_iter()
        .rev()
        .find(|e| e.mount_point == at && (e.fs_type == "fuse" || e.fs_type.starts_with("fuse.")))
}

/// Whether a FUSE mount is at `mnt`.
pub fn is_mounted(mnt: &Path) -> bool {
    fuse_mount_at(mnt).is_some()
}

/// Whether `mnt` is a mount whose daemon is gone ("transport endpoint is
/// not connected").
/// statfs(2) (under statvfs), unlike stat, always asks the daemon (stat may
/// be answered from the kernel's attribute cache), so it tells a dead mount
/// apart.
pub fn is_dead_mount(mnt: &Path) -> bool {
    crate::sys::statvfs(mnt).is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN))
}

/// Refuses the mountpoints gocryptfs refuses: a dead or live mount, the
/// cipher dir itself or a directory inside it (fsck would then walk into
/// the mount), and a non-empty directory unless `nonempty`.
pub fn check_mountpoint(cipherdir: &Path, mnt: &Path, nonempty: bool) -> Result<(), MountError> {
    if is_dead_mount(mnt) {
        return Err(MountError::Mount(format!(
            "{} is a dead mount (transport endpoint is not connected: its daemon exited);                  clear it with `kmsfs unmount {}`, then mount again",
            mnt.display(),
            mnt.display()
        )));
    }
    if is_mounted(mnt) {
        return Err(MountError::Mount(format!("{} is already mounted", mnt.display())));
    }
    let meta = std::fs::metadata(mnt).map_err(|e| MountError::Mount(format!("mountpoint {}: {e}", mnt.display())))?;
    if !meta.is_dir() {
        return Err(MountError::Mount(format!("mountpoint {} is not a directory", mnt.display())));
    }
    let at = resolve_mountpoint(mnt);
    if let Ok(cd) = std::fs::canonicalize(cipherdir)
        && at.starts_with(&cd)
    {
        return Err(MountError::Mount(format!(
            "mountpoint {} is the cipher dir or inside it; mount it elsewhere",
            mnt.display()
        )));
    }
    if !nonempty
        && std::fs::read_dir(mnt)
            .map_err(|e| MountError::Mount(format!("mountpoint {}: {e}", mnt.display())))?
            .next()
            .is_some()
    {
        return Err(MountError::Mount(format!(
            "mountpoint {} is not empty: the mount would hide its files (use -o nonempty to mount anyway)",
            mnt.display()
        )));
    }
    Ok(())
}

/// How [`unmount`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    /// A plain unmount: the kernel wrote the dirty pages back first.
    Plain,
    /// The mount was dead (its daemon had exited): cleared.
    ClearedDead,
    /// The mount was busy: its daemon wrote back every pending write,
    /// detached it and exited; processes still using it now get errors.
    StoppedBusy,
}

/// Unmounts the kmsfs mount at `mnt`. If it is busy, its daemon is asked
/// to stop as on SIGTERM (write back, then detach), and this waits for it.
pub fn unmount(mnt: &Path) -> Result<Unmounted, MountError> {
    if is_dead_mount(mnt) {
        // No daemon left to write anything back: just clear the mount.
        return daemon::unmount(mnt, false)
            .or_else(|_| daemon::unmount(mnt, true))
            .map(|()| Unmounted::ClearedDead)
            .map_err(|e| MountError::Mount(format!("cannot clear the dead mount {}: {e}", mnt.display())));
    }
    if !is_mounted(mnt) {
        return Err(MountError::Mount(format!("{} is not a FUSE mount", mnt.display())));
    }
    // A plain unmount: the kernel writes its dirty pages back through the
    // daemon first, and the daemon exits when its session ends.
    let err = match daemon::unmount(mnt, false) {
        Ok(()) => return Ok(Unmounted::Plain),
        Err(e) => e,
    };
    // Busy. A lazy unmount here would let the daemon lose the dirty pages
    // of files still open there, so the daemon stops itself as on SIGTERM:
    // it writes them back, then detaches.
    let Some(pid) =
        super::stats::read_stats(mnt).ok().and_then(|v| v["pid"].as_u64()).and_then(|p| i32::try_from(p).ok())
    else {
        return Err(MountError::Mount(format!("cannot unmount {}: {err}", mnt.display())));
    };
    // The pid is the mount's own daemon, from its stats.
    if let Err(e) = crate::sys::kill(pid, libc::SIGTERM) {
        return Err(MountError::Mount(format!("cannot unmount {} ({err}) nor stop its daemon: {e}", mnt.display())));
    }
    let t = std::time::Instant::now();
    // Running, as opposed to gone or a zombie its parent has not reaped.
    let running = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()))
            .is_some_and(|state| state != 'Z' && state != 'X')
    };
    while is_mounted(mnt) || running() {
        if t.elapsed() > daemon::STOP_BUDGET + Duration::from_secs(20) {
            return Err(MountError::Mount(format!("the daemon of {} (pid {pid}) did not stop", mnt.display())));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Unmounted::StoppedBusy)
}
