//! Commands on mounts: mount (in the foreground, or as a background
//! daemon that reports back through a pipe), unmount and stats.

use std::path::{Path, PathBuf};

use kmsfs::daemon;
use kmsfs::mount::{ServeOptions, Unmounted};
use kmsfs::volume::{KeyArgs, ProviderKind};

use super::args::{MountArgs, StatsFormat};
use super::{Failure, exit, fail, init_logging, key_outside, load};

/// `kmsfs mount`.
pub(super) fn mount(m: MountArgs) -> Result<u8, Failure> {
    let plan = kmsfs::mount::parse_options(
        &m.cipherdir,
        &m.options,
        m.key_file.clone(),
        m.kms_key.clone(),
        m.shared,
        m.threads,
    )
    .map_err(fail)?;
    let in_child = kmsfs::mount::in_daemon_child();
    if !m.foreground && !in_child {
        // Daemon mode: re-run ourselves in the foreground, detached, and
        // return once the child says the mount serves. An unwritable log
        // file fails here, before anything starts.
        init_logging(m.log_file.as_deref(), false)?;
        // Fail early in the parent for the errors a user is most likely to
        // hit, without a KMS call (the daemon makes the full check).
        key_outside(&m.cipherdir, plan.key_file.as_deref())?;
        let cfg = load(&m.cipherdir)?;
        if cfg.provider == ProviderKind::Local {
            cfg.provider_unchecked(&KeyArgs { key_file: plan.key_file.clone(), kms_key: None }).map_err(fail)?;
        }
        kmsfs::mount::check_mountpoint(&m.cipherdir, &m.mountpoint, plan.nonempty).map_err(fail)?;
        let mut args: Vec<std::ffi::OsString> = vec!["mount".into(), "--foreground".into()];
        args.extend(std::env::args_os().skip(1).filter(|a| a != "mount"));
        kmsfs::mount::spawn_daemon(args).map_err(fail)?;
        return Ok(0);
    }
    let log = if in_child {
        kmsfs::mount::take_piped_key().map_err(fail)?;
        daemon::detach();
        init_logging(m.log_file.as_deref(), m.log_file.is_none())?
    } else {
        init_logging(m.log_file.as_deref(), false)?
    };
    key_outside(&m.cipherdir, plan.key_file.as_deref())?;
    let o = ServeOptions {
        cipherdir: m.cipherdir,
        mountpoint: m.mountpoint,
        cache_size: m.cache_size,
        cache_max_age: m.cache_max_age,
        check_mountpoint: !in_child,
    };
    kmsfs::mount::serve(&o, plan, log.as_ref()).map_err(fail)?;
    Ok(0)
}

/// `kmsfs unmount`: a plain unmount, a dead mount cleared, or a busy one's
/// daemon stopped after writing everything back.
pub(super) fn unmount(mnt: &Path) -> Result<u8, Failure> {
    match kmsfs::mount::unmount(mnt).map_err(fail)? {
        Unmounted::Plain => {}
        Unmounted::ClearedDead => eprintln!("{}: cleared a dead mount (its daemon had exited)", mnt.display()),
        Unmounted::StoppedBusy => eprintln!(
            "{} was busy: its daemon wrote back all pending writes and detached it; processes still using it now get errors",
            mnt.display()
        ),
    }
    Ok(0)
}

/// `kmsfs stats`: a mount's live key-cache and KMS statistics.
pub(super) fn stats(mountpoint: PathBuf, json: bool, format: StatsFormat) -> Result<u8, Failure> {
    let v = kmsfs::mount::stats::read_stats(&mountpoint)
        .map_err(|e| Failure(exit::ERROR, format!("{}: {e}", mountpoint.display())))?;
    if format == StatsFormat::Prometheus {
        print!("{}", kmsfs::mount::stats::prometheus(&v, &mountpoint));
    } else if json || format == StatsFormat::Json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        let c = &v["cache"];
        println!(
            "key cache: {} keys, {} hits, {} misses, {} evictions",
            c["size"], c["hits"], c["misses"], c["evictions"]
        );
        if let Some(ops) = v["provider_calls"].as_object() {
            for (op, s) in ops {
                println!(
                    "{op:18} calls {:>6}  errors {:>4}  mean {} us  p99 <= {} us",
                    s["calls"], s["errors"], s["latency_us"]["mean"], s["latency_us"]["p99_le"]
                );
            }
        }
        println!("pool ready: {}  inodes: {}  handles: {}", v["pool_ready"], v["inodes"], v["handles"]);
        let p = &v["pool"];
        let last = p["last_refill_age_s"].as_u64().map_or("never".into(), |s| format!("{s} s ago"));
        println!(
            "key pool: {} of {} ready, {} refill errors, last refill {last}; keys pinned by writers: {}",
            p["ready"], p["target"], p["refill_errors"], v["keys_pinned"]
        );
    }
    Ok(0)
}
