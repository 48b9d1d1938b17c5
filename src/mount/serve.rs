//! The daemon's life: serve the mount until a signal or an external
//! unmount, then stop without losing an acknowledged write.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{MountError, MountPlan, check_mountpoint, resolve_mountpoint};
use crate::daemon::{self, Sig};
use crate::fs::{EncFs, FsOptions};
use crate::fuse::{FuseOptions, KmsFuse};
use crate::keys::cache::KeyCache;
use crate::keys::pool::KeyPool;
use crate::keys::stats::KeyStats;
use crate::volume::{KeyArgs, OpenVolume};

/// What the daemon serves, and how.
pub struct ServeOptions {
    /// The cipher dir.
    pub cipherdir: PathBuf,
    /// The mountpoint.
    pub mountpoint: PathBuf,
    /// Key cache capacity (data keys).
    pub cache_size: usize,
    /// Key cache max age, in seconds.
    pub cache_max_age: u64,
    /// Check the mountpoint first (a background mount's parent did).
    pub check_mountpoint: bool,
}

/// Opens the volume, mounts it and serves until SIGTERM/SIGINT (then
/// writes back and unmounts) or an external unmount. Readiness goes to the
/// background parent and to systemd. `log` is reopened on SIGHUP. Call with
/// the handled signals blocked (`daemon::block_signals`), before any thread.
pub fn serve(o: &ServeOptions, mut plan: MountPlan, log: Option<&daemon::LogFile>) -> Result<(), MountError> {
    daemon::harden_memory();
    daemon::raise_nofile();
    // Backing files get exactly the modes asked for.
    crate::sys::umask(0);
    if o.check_mountpoint {
        check_mountpoint(&o.cipherdir, &o.mountpoint, plan.nonempty)?;
    }
    let keys = KeyArgs { key_file: plan.key_file.clone(), kms_key: plan.kms_key.clone() };
    let OpenVolume { config: cfg, provider, legacy } = crate::volume::open(&o.cipherdir, &keys)?;
    if legacy && !plan.read_only {
        // An unauthenticated config may be read, never written under.
        plan.read_only = true;
        plan.fuse.mount_options.push(fuser::MountOption::RO);
    }
    // Held for the daemon's life: rewrap refuses while any mount holds it.
    let _lock = crate::volume::lock(&o.cipherdir, false)?;
    let layout =
        cfg.layout().ok_or_else(|| MountError::Config("invalid block or header size in volume config".into()))?;
    let max_age = Duration::from_secs(o.cache_max_age.max(1));
    // Branch mode re-checks its branch key with KMS once per max age.
    provider.set_max_age(max_age);
    provider.check()?;
    let stats = Arc::new(KeyStats::default());
    let cache = Arc::new(KeyCache::new(provider.clone(), o.cache_size, max_age, stats.clone()));
    // Look-ahead only pays for a remote provider; local generation is ~1 us.
    // 64 keys at 16 in flight hide ~10 ms of KMS latency at 1,600 creates/s.
    // Branch mode wraps locally too, so it gets no pool either.
    let (target, workers) = if provider.name() == crate::keys::aws_kms::PROVIDER_NAME { (64, 16) } else { (0, 0) };
    let pool = KeyPool::start(provider.clone(), cfg.volume_id(), target, workers, max_age, stats);
    let names = Arc::new(cfg.names(provider.as_ref())?);
    let fs = Arc::new(
        EncFs::new(
            &o.cipherdir,
            layout,
            cfg.volume_id(),
            cache.clone(),
            pool,
            names.clone(),
            FsOptions { read_only: plan.read_only },
        )
        .map_err(|e| MountError::Mount(format!("{}: {e}", o.cipherdir.display())))?
        .with_shared(plan.shared),
    );
    let adapter = KmsFuse::new(
        fs.clone(),
        FuseOptions { writeback_cache: plan.writeback && !plan.read_only && !plan.shared, shared: plan.shared },
    );
    fs.integrity_log.set_mountpoint(&resolve_mountpoint(&o.mountpoint));
    let session = spawn_session(adapter, &o.mountpoint, &plan)
        .map_err(|e| MountError::Mount(format!("cannot mount {}: {e}", o.mountpoint.display())))?;
    // The mount serves once a stat through it answers.
    let dev =
        std::fs::metadata(&o.mountpoint).map_err(|e| MountError::Mount(format!("mount does not answer: {e}")))?.dev();
    daemon::set_readahead(&o.mountpoint, 1024);
    tracing::info!("mounted {} at {}", o.cipherdir.display(), o.mountpoint.display());
    daemon::report_ready("ready");
    daemon::sd_notify("READY=1");
    let sweeper_cache = cache.clone();
    let _ = std::thread::Builder::new().name("kmsfs-sweep".into()).spawn(move || {
        loop {
            std::thread::sleep(Duration::from_secs(5));
            sweeper_cache.sweep();
        }
    });
    watch_name_key(&cfg, &names, &provider, max_age);
    loop {
        match daemon::wait_signal(Duration::from_millis(500)) {
            Some(Sig::Stop) => {
                tracing::info!("signal received: writing back and unmounting");
                daemon::sd_notify("STOPPING=1");
                break;
            }
            Some(Sig::Stats) => tracing::info!("stats: {}", fs.stats_json()),
            Some(Sig::Reopen) => match log {
                Some(l) => match l.reopen() {
                    Ok(()) => tracing::info!("SIGHUP: log file {} reopened", l.path().display()),
                    Err(e) => tracing::error!("SIGHUP: cannot reopen the log file {}: {e}", l.path().display()),
                },
                None => tracing::info!("SIGHUP: no log file to reopen"),
            },
            None if session.guard.is_finished() => {
                tracing::info!("unmounted externally");
                fs.shutdown();
                // Already unmounted: dropping the session would try again
                // and log a spurious EINVAL. The process exits next.
                std::mem::forget(session);
                return Ok(());
            }
            None => {}
        }
    }
    stop(session, &fs, &o.mountpoint, dev);
    Ok(())
}

/// The name key is unwrapped once per mount; this re-checks it every cache
/// max age on a thread of its own, so that disabling the KMS key stops
/// listings and lookups within one max age, as it does for file contents.
/// Only a refusal blocks names: an unreachable KMS does not take a working
/// mount down.
fn watch_name_key(
    cfg: &crate::volume::VolumeConfig,
    names: &Arc<crate::names::Names>,
    provider: &Arc<dyn crate::keys::KeyProvider>,
    max_age: Duration,
) {
    let Some((ctx, wrapped)) = cfg.name_key.as_ref().and_then(|k| k.parts(cfg.volume_id())) else { return };
    let (names, provider) = (names.clone(), provider.clone());
    let _ = std::thread::Builder::new().name("kmsfs-namekey".into()).spawn(move || {
        loop {
            std::thread::sleep(max_age);
            match provider.unwrap(&wrapped, &ctx) {
                Ok(_) => {
                    if names.revoked().is_some() {
                        tracing::info!("the name key is usable again: names are back");
                    }
                    names.set_revoked(None);
                }
                Err(e) if e.is_denied() => {
                    if names.revoked().is_none() {
                        tracing::error!("the name key is refused ({e}): lookups and listings fail with EACCES");
                    }
                    names.set_revoked(Some(e));
                }
                Err(e) => tracing::warn!("cannot re-check the name key: {e}"),
            }
        }
    });
}

/// Mounts with the fs type `fuse.kmsfs` (see `daemon::mount_typed`), or
/// through fuser's own mount (fusermount3) without privilege or when
/// `auto_unmount` needs fusermount3 anyway.
fn spawn_session(adapter: KmsFuse, mnt: &Path, plan: &MountPlan) -> std::io::Result<fuser::BackgroundSession> {
    use fuser::MountOption as O;
    let opts = &plan.fuse.mount_options;
    if !opts.contains(&O::AutoUnmount) {
        let source = opts
            .iter()
            .find_map(|o| if let O::FSName(n) = o { Some(n.clone()) } else { None })
            .unwrap_or_else(|| "kmsfs".into());
        let allow_other = !matches!(plan.fuse.acl, fuser::SessionACL::Owner);
        if let Some(fd) = daemon::mount_typed(mnt, &source, opts, allow_other)? {
            let mut config = fuser::Config::default();
            config.acl = plan.fuse.acl;
            config.n_threads = plan.fuse.n_threads;
            config.clone_fd = plan.fuse.clone_fd;
            let acl = plan.fuse.acl;
            return match fuser::Session::from_fd(adapter, fd, acl, config) {
                Ok(s) => s.spawn(),
                Err(e) => {
                    // Not serving: take the mount away again.
                    let _ = daemon::unmount(mnt, true);
                    Err(e)
                }
            };
        }
    }
    fuser::spawn_mount(adapter, mnt, &plan.fuse)
}

/// Stops a mount without losing a write the kernel has acknowledged. Under
/// the writeback cache those may still be dirty pages in the kernel, and a
/// FUSE mount that is detached and whose daemon exits drops them. So the
/// pages are written back first, through this daemon, while the session
/// keeps serving; then the mount goes. If it is busy (a process holds a
/// file or its working directory there), it is detached lazily, the pages
/// written since are flushed through a descriptor kept on the detached
/// mount, and the daemon exits: from then on that process gets errors
/// (ENOTCONN) instead of silently lost writes. The whole stop stays within
/// `daemon::STOP_BUDGET`, which the unit's TimeoutStopSec allows for.
fn stop(session: fuser::BackgroundSession, fs: &EncFs, mnt: &Path, dev: u64) {
    let deadline = std::time::Instant::now() + daemon::STOP_BUDGET;
    // The mount's root, if the path still shows this mount: never unmount
    // or write back through whatever else is there now.
    let ours = || std::fs::metadata(mnt).is_ok_and(|m| m.dev() == dev);
    let open_root = || match std::fs::File::open(mnt) {
        Ok(root) => root.metadata().is_ok_and(|m| m.dev() == dev).then_some(root),
        Err(e) => {
            tracing::error!("cannot open the mount to write back its pages: {e}");
            None
        }
    };
    let write_back = |root: &std::fs::File, when: &str| {
        if !daemon::flush_mount(root, fs.open_files(), deadline) {
            tracing::warn!("some dirty pages may not have been written back ({when})");
        }
    };
    if !ours() {
        tracing::info!("{} no longer shows this mount", mnt.display());
        fs.shutdown();
        // Unmounted already: dropping the session would try again.
        std::mem::forget(session);
        return;
    }
    if let Some(root) = open_root() {
        write_back(&root, "before unmounting");
    }
    // A plain unmount makes the kernel write back anything dirtied since.
    match daemon::unmount(mnt, false) {
        Ok(()) => {
            if session.join().is_err() {
                tracing::warn!("the FUSE session ended with an error");
            }
        }
        Err(e) => {
            tracing::warn!("unmount failed ({e}); detaching lazily after writing back");
            // This descriptor keeps the detached mount reachable for writing
            // back what was dirtied since the first pass.
            let root = open_root();
            if ours()
                && let Err(e) = daemon::unmount(mnt, true)
            {
                tracing::error!("lazy unmount failed: {e}");
            }
            if let Some(root) = root {
                write_back(&root, "after detaching");
            }
            // Detached: dropping the session would unmount whatever is at
            // the path now. The process exits next, which ends the session.
            std::mem::forget(session);
        }
    }
    fs.shutdown();
    tracing::info!("unmounted {}", mnt.display());
}
