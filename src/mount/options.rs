//! Mount options (`-o`, fstab's fourth field) into a mount plan.

use std::path::{Path, PathBuf};

use super::MountError;

/// What the mount options ask for.
pub struct MountPlan {
    /// fuser's mount options, ACL and threads.
    pub fuse: fuser::Config,
    /// `ro`.
    pub read_only: bool,
    /// The kernel's writeback cache (off with `no_writeback`).
    pub writeback: bool,
    /// `shared`: the cipher dir is mounted on other hosts too.
    pub shared: bool,
    /// `key_file=`, `--key-file`, or systemd's credential.
    pub key_file: Option<PathBuf>,
    /// `kms_key=` or `--kms-key`.
    pub kms_key: Option<String>,
    /// `nonempty`: mount over a non-empty directory.
    pub nonempty: bool,
}

/// Parses the mount options. `key_file`, `kms_key` and `shared` come from
/// the command line's own flags; an option overrides them.
pub fn parse_options(
    cipherdir: &Path,
    options: &[String],
    key_file: Option<PathBuf>,
    kms_key: Option<String>,
    shared: bool,
    threads: usize,
) -> Result<MountPlan, MountError> {
    use fuser::MountOption as O;
    let mut opts = vec![
        O::FSName(std::fs::canonicalize(cipherdir).unwrap_or(cipherdir.to_path_buf()).display().to_string()),
        O::Subtype("kmsfs".into()),
    ];
    let (mut read_only, mut writeback, mut key_file) = (false, true, key_file);
    let mut kms_key = kms_key;
    let mut shared = shared;
    let mut acl = fuser::SessionACL::Owner;
    let mut nonempty = false;
    for o in options.iter().filter(|o| !o.is_empty()) {
        match o.as_str() {
            "ro" => {
                read_only = true;
                opts.push(O::RO);
            }
            "rw" => opts.push(O::RW),
            "allow_other" => acl = fuser::SessionACL::All,
            "allow_root" => acl = fuser::SessionACL::RootAndOwner,
            "default_permissions" => opts.push(O::DefaultPermissions),
            "auto_unmount" => opts.push(O::AutoUnmount),
            "noatime" => opts.push(O::NoAtime),
            "nodev" => opts.push(O::NoDev),
            "nosuid" => opts.push(O::NoSuid),
            "noexec" => opts.push(O::NoExec),
            "dev" => opts.push(O::Dev),
            "suid" => opts.push(O::Suid),
            "exec" => opts.push(O::Exec),
            "no_writeback" => writeback = false,
            "shared" => shared = true,
            "nonempty" => nonempty = true,
            "sync" => opts.push(O::Sync),
            "dirsync" => opts.push(O::DirSync),
            "atime" => opts.push(O::Atime),
            // Usual fstab options with nothing to do for kmsfs: the kernel
            // default (relatime, async) already applies, and FUSE keeps no
            // atime of its own to tune.
            "async" | "relatime" | "norelatime" | "strictatime" | "nostrictatime" | "lazytime" | "nolazytime"
            | "diratime" | "nodiratime" | "iversion" | "noiversion" | "silent" | "loud" => {}
            // For mount(8) and fstab, not for the kernel.
            "nofail" | "_netdev" | "auto" | "noauto" | "user" | "users" | "defaults" => {}
            s if s.starts_with("key_file=") => key_file = Some(PathBuf::from(&s["key_file=".len()..])),
            s if s.starts_with("kms_key=") => kms_key = Some(s["kms_key=".len()..].to_string()),
            s if s.starts_with("fsname=") => opts[0] = O::FSName(s["fsname=".len()..].into()),
            s if s.starts_with("x-") || s.starts_with("comment=") => {}
            s => return Err(MountError::Usage(format!("unknown mount option {s:?}"))),
        }
    }
    // systemd credentials (LoadCredential=kmsfs.key:/etc/kmsfs/NAME.key):
    // the key file systemd hands the service, readable by it alone.
    if key_file.is_none()
        && let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY")
    {
        let k = Path::new(&dir).join("kmsfs.key");
        if k.exists() {
            key_file = Some(k);
        }
    }
    let mut fuse = fuser::Config::default();
    fuse.mount_options = opts;
    fuse.acl = acl;
    fuse.n_threads = Some(threads.max(1));
    fuse.clone_fd = true;
    Ok(MountPlan { fuse, read_only, writeback, shared, key_file, kms_key, nonempty })
}
