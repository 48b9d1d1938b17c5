//! The command line's grammar: commands, their arguments and help text.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use kmsfs::keys::cache::{DEFAULT_CAPACITY, DEFAULT_MAX_AGE};

use super::exit;

pub(super) fn help_footer() -> String {
    format!("{}\n\n{ENVIRONMENT}", exit::TABLE)
}

/// Environment variables, for `--help` and the man page.
pub(super) const ENVIRONMENT: &str = "Environment:
  KMSFS_LOG            log filter (tracing EnvFilter syntax, e.g. debug or kmsfs=trace);
                       RUST_LOG is read if it is unset. The AWS SDK stays at warn.
  AWS_REGION, AWS_PROFILE, AWS_CONFIG_FILE, AWS_SHARED_CREDENTIALS_FILE,
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ENDPOINT_URL_KMS
                       the AWS SDK's usual configuration (--region and --profile
                       override the first two)
  CREDENTIALS_DIRECTORY
                       systemd credentials: `mount` uses the key file kmsfs.key
                       there when no --key-file or key_file= is given
  NOTIFY_SOCKET        systemd readiness (Type=notify)
  JOURNAL_STREAM       set by systemd: logs then go to the journal natively";

#[derive(Parser)]
#[command(
    name = "kmsfs",
    version,
    about = "Encrypted FUSE filesystem with KMS envelope encryption",
    after_help = help_footer()
)]
pub(super) struct Cli {
    #[command(subcommand)]
    pub(super) cmd: Cmd,
    /// AWS region for KMS (sets AWS_REGION).
    #[arg(long, global = true, value_name = "REGION")]
    pub(super) region: Option<String>,
    /// AWS profile for KMS credentials and region (sets AWS_PROFILE).
    #[arg(long, global = true, value_name = "NAME")]
    pub(super) profile: Option<String>,
}

#[derive(Subcommand)]
pub(super) enum Cmd {
    /// Create a new volume in an empty CIPHERDIR.
    Init {
        /// The (empty) directory that will hold encrypted files.
        cipherdir: PathBuf,
        /// Use AWS KMS with this key ID, key ARN, alias/NAME or alias ARN.
        #[arg(long, conflicts_with = "key_file")]
        kms_key: Option<String>,
        /// Local provider: where to create the key file (outside CIPHERDIR).
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Plaintext bytes per block: a power of two from 4096 to 1048576.
        #[arg(long, default_value_t = 4096)]
        block_size: u32,
        /// Keep file names in clear in the cipher dir.
        #[arg(long)]
        plaintext_names: bool,
        /// per-file: one KMS call per create and per cold open (per-file
        /// CloudTrail audit). branch: one KMS call per mount and per cache
        /// max age; file keys are wrapped locally under a volume branch key.
        #[arg(long, value_enum, default_value_t = KeyMode::PerFile)]
        key_mode: KeyMode,
    },
    /// Mount CIPHERDIR's plaintext view at MOUNTPOINT.
    Mount(MountArgs),
    /// Unmount a kmsfs mount. If it is busy, its daemon writes back every
    /// pending write, detaches it and exits; processes still using it then
    /// get errors.
    Unmount {
        /// The mount point.
        mountpoint: PathBuf,
    },
    /// Encrypt one file (or '-' for stdin) into the per-file format.
    Encrypt {
        /// Use this volume's key and geometry (the output can be dropped into it).
        #[arg(long)]
        volume: Option<PathBuf>,
        /// AWS KMS key reference, without a volume.
        #[arg(long, conflicts_with_all = ["volume", "key_file"])]
        kms_key: Option<String>,
        /// Local key file, without a volume (or overriding the volume's).
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Input file or '-'.
        input: PathBuf,
        /// Output file or '-'.
        output: PathBuf,
    },
    /// Decrypt one encrypted file (or '-') to plaintext.
    Decrypt {
        /// The volume the file belongs to (for its key provider).
        #[arg(long)]
        volume: Option<PathBuf>,
        /// Local key file.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// The KMS key to trust: the file's header must name it.
        #[arg(long, conflicts_with = "trust_header_key")]
        kms_key: Option<String>,
        /// Without --volume or --kms-key: trust whatever KMS key the file's
        /// header names (the header is not authenticated before the unwrap).
        #[arg(long)]
        trust_header_key: bool,
        /// Input file or '-'.
        input: PathBuf,
        /// Output file or '-'.
        output: PathBuf,
    },
    /// Print an encrypted file's header (no key needed).
    Inspect {
        /// A backing file.
        file: PathBuf,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Re-wrap every file's data key under a new key (manual rotation).
    Rewrap {
        /// The cipher dir (must not be mounted).
        cipherdir: PathBuf,
        /// New AWS KMS key reference.
        #[arg(long, conflicts_with = "to_key_file")]
        to_key: Option<String>,
        /// New local key file (created if missing).
        #[arg(long)]
        to_key_file: Option<PathBuf>,
        /// The current local key file, if not the recorded one.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// The current KMS key, if this host has not recorded it yet.
        #[arg(long)]
        kms_key: Option<String>,
        /// Show what would change, write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Branch-mode volumes: move every file to the current branch version.
        #[arg(long)]
        all_files: bool,
    },
    /// Branch-mode volumes: start a new branch key version for new files
    /// (one GenerateDataKey); files under older versions stay readable.
    RotateBranch {
        /// The cipher dir (must not be mounted).
        cipherdir: PathBuf,
        /// The volume's KMS key, if this host has not recorded it yet.
        #[arg(long)]
        kms_key: Option<String>,
    },
    /// Authenticate the config of a volume made by an older kmsfs (once,
    /// on a trusted host), and record its key as trusted here.
    Upgrade {
        /// The cipher dir (must not be mounted).
        cipherdir: PathBuf,
        /// Local key file, if not the recorded one.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// The volume's KMS key, if not the recorded one.
        #[arg(long)]
        kms_key: Option<String>,
    },
    /// Verify every header and block of a volume.
    Fsck {
        /// The cipher dir.
        cipherdir: PathBuf,
        /// Local key file, if not the recorded one.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// The volume's KMS key, if this host has not recorded it yet.
        #[arg(long)]
        kms_key: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Restore a missing copy of a directory ID from the other copy.
        #[arg(long)]
        repair: bool,
    },
    /// Map a plaintext path to its backing path, or (--reverse) back.
    Path {
        /// The cipher dir.
        cipherdir: PathBuf,
        /// Path relative to the mount root (or to CIPHERDIR with --reverse).
        path: PathBuf,
        /// Map a backing path to its plaintext path.
        #[arg(long)]
        reverse: bool,
        /// Local key file, if not the recorded one.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// The volume's KMS key, if this host has not recorded it yet.
        #[arg(long)]
        kms_key: Option<String>,
    },
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    #[command(hide = true)]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout.
    #[command(hide = true)]
    Manpage,
    /// Show live key-cache and KMS statistics of a mount.
    Stats {
        /// The mount point.
        mountpoint: PathBuf,
        /// JSON output (same as --format json).
        #[arg(long, conflicts_with = "format")]
        json: bool,
        /// Output format: text, json, or prometheus (text exposition
        /// format, for node_exporter's textfile collector).
        #[arg(long, value_enum, default_value_t = StatsFormat::Text)]
        format: StatsFormat,
    },
    /// Describe a volume: ID, provider, key, names mode, block size, format
    /// version, whether its config is authenticated, and this host's trust
    /// record for it. No key is needed unless --verify.
    Info {
        /// The cipher dir.
        cipherdir: PathBuf,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Also verify the config's MAC (one key-provider call), through the
        /// same trust checks as mount.
        #[arg(long)]
        verify: bool,
        /// Local key file, if not the recorded one (with --verify).
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// The volume's KMS key, if this host has not recorded it (with --verify).
        #[arg(long)]
        kms_key: Option<String>,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
pub(super) enum StatsFormat {
    Text,
    Json,
    Prometheus,
}

#[derive(clap::Args, Clone)]
pub(super) struct MountArgs {
    /// The cipher dir.
    pub(super) cipherdir: PathBuf,
    /// Where to show the plaintext.
    pub(super) mountpoint: PathBuf,
    /// Stay in the foreground (for systemd and debugging).
    #[arg(short, long)]
    pub(super) foreground: bool,
    /// Mount options: ro, rw, allow_other, allow_root, default_permissions,
    /// auto_unmount, nonempty, key_file=PATH, kms_key=ARN, fsname=NAME,
    /// noatime, atime, nodev, dev, nosuid, suid, noexec, exec, sync,
    /// dirsync, no_writeback, shared. Accepted and ignored (for fstab): async,
    /// relatime, norelatime, strictatime, lazytime, diratime, nodiratime,
    /// defaults, auto, noauto, user, users, nofail, _netdev, x-*, comment=.
    #[arg(short = 'o', value_delimiter = ',')]
    pub(super) options: Vec<String>,
    /// Local key file, if not the recorded one.
    #[arg(long)]
    pub(super) key_file: Option<PathBuf>,
    /// The volume's KMS key (ARN), if this host has not recorded it yet;
    /// also `-o kms_key=ARN`.
    #[arg(long)]
    pub(super) kms_key: Option<String>,
    /// Key cache capacity (number of data keys).
    #[arg(long, default_value_t = DEFAULT_CAPACITY)]
    pub(super) cache_size: usize,
    /// Key cache max age in seconds.
    #[arg(long, default_value_t = DEFAULT_MAX_AGE.as_secs())]
    pub(super) cache_max_age: u64,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 8)]
    pub(super) threads: usize,
    /// Log to this file instead of stderr (foreground) or syslog (daemon).
    #[arg(long)]
    pub(super) log_file: Option<PathBuf>,
    /// The cipher dir is mounted on other hosts too (shared storage): no
    /// caching across opens, locks across mounts; also `-o shared`.
    #[arg(long)]
    pub(super) shared: bool,
}

/// How `init` sets up a KMS volume's keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum KeyMode {
    /// One data key per file, each from KMS.
    PerFile,
    /// File keys wrapped locally under a KMS-wrapped volume branch key.
    Branch,
}
