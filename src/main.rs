//! The `kmsfs` command line. Exit codes are documented in README.md.

use std::io::{IsTerminal, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use kmsfs::daemon::{self, Sig};
use kmsfs::format::layout::Layout;
use kmsfs::fs::{EncFs, FsOptions};
use kmsfs::fuse::{FuseOptions, KmsFuse};
use kmsfs::keys::KeyProvider;
use kmsfs::keys::cache::{DEFAULT_CAPACITY, DEFAULT_MAX_AGE, KeyCache};
use kmsfs::keys::local::LocalProvider;
use kmsfs::keys::pool::KeyPool;
use kmsfs::keys::stats::KeyStats;
use kmsfs::volume::{KeyArgs, OpenVolume, ProviderKind, VolumeConfig, VolumeError};

/// Exit codes (stable; documented in README.md, `--help` and the man page).
/// Every command, in the foreground and through the background mount's
/// ready pipe, takes its code from the `Code` mapping below.
mod exit {
    /// Any other error (I/O on an input or output file, a failed rename...).
    pub const ERROR: u8 = 1;
    /// Bad command line or options.
    pub const USAGE: u8 = 2;
    /// The volume config is missing, invalid, untrusted or not a volume;
    /// an input that is not a kmsfs file at all.
    pub const VOLUME: u8 = 3;
    /// The key provider: key file missing or loose, wrong key, KMS key
    /// disabled or denied, no credentials, no region.
    pub const KEY: u8 = 4;
    /// Mounting or unmounting: busy, already mounted, bad mountpoint.
    pub const MOUNT: u8 = 5;
    /// Damaged data: a kmsfs file or block that fails authentication.
    pub const DAMAGED: u8 = 6;

    /// The one mapping from an error kind to its exit code.
    pub trait Code: std::fmt::Display {
        fn exit_code(&self) -> u8;
    }

    impl Code for kmsfs::keys::KeyError {
        fn exit_code(&self) -> u8 {
            KEY
        }
    }

    impl Code for kmsfs::volume::VolumeError {
        fn exit_code(&self) -> u8 {
            use kmsfs::volume::VolumeError as V;
            match self {
                V::Key(_) => KEY,
                V::Busy(_) => MOUNT,
                _ => VOLUME,
            }
        }
    }

    impl Code for kmsfs::offline::OpError {
        fn exit_code(&self) -> u8 {
            use kmsfs::offline::OpError as O;
            match self {
                O::Key(_) => KEY,
                O::Io { .. } => ERROR,
                O::Corrupt { .. } => DAMAGED,
            }
        }
    }

    /// A bare I/O error on a path the user named.
    impl Code for std::io::Error {
        fn exit_code(&self) -> u8 {
            ERROR
        }
    }

    /// Exit codes with what they mean, for `--help` and the man page.
    pub const TABLE: &str = "Exit codes:
  0  success
  1  other error (I/O on an input or output file)
  2  usage: bad command line or mount option
  3  volume: config missing, invalid or untrusted; input not a kmsfs file
  4  key provider: key file missing or too open, wrong key, KMS key disabled
     or denied, no credentials, no region, unknown profile
  5  mount: already mounted, dead mount, mountpoint not empty or inside the
     cipher dir, busy, cannot unmount
  6  damaged data: a kmsfs file or block fails authentication (fsck: damage found)";
}

fn help_footer() -> String {
    format!("{}\n\n{ENVIRONMENT}", exit::TABLE)
}

/// Turns any error into its exit code and message (see `exit::Code`).
fn fail<E: exit::Code>(e: E) -> Failure {
    Failure(e.exit_code(), e.to_string())
}

/// Environment variables, for `--help` and the man page.
const ENVIRONMENT: &str = "Environment:
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
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// AWS region for KMS (sets AWS_REGION).
    #[arg(long, global = true, value_name = "REGION")]
    region: Option<String>,
    /// AWS profile for KMS credentials and region (sets AWS_PROFILE).
    #[arg(long, global = true, value_name = "NAME")]
    profile: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
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
enum StatsFormat {
    Text,
    Json,
    Prometheus,
}

#[derive(clap::Args, Clone)]
struct MountArgs {
    /// The cipher dir.
    cipherdir: PathBuf,
    /// Where to show the plaintext.
    mountpoint: PathBuf,
    /// Stay in the foreground (for systemd and debugging).
    #[arg(short, long)]
    foreground: bool,
    /// Mount options: ro, rw, allow_other, allow_root, default_permissions,
    /// auto_unmount, nonempty, key_file=PATH, kms_key=ARN, fsname=NAME,
    /// noatime, atime, nodev, dev, nosuid, suid, noexec, exec, sync,
    /// dirsync, no_writeback, shared. Accepted and ignored (for fstab): async,
    /// relatime, norelatime, strictatime, lazytime, diratime, nodiratime,
    /// defaults, auto, noauto, user, users, nofail, _netdev, x-*, comment=.
    #[arg(short = 'o', value_delimiter = ',')]
    options: Vec<String>,
    /// Local key file, if not the recorded one.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// The volume's KMS key (ARN), if this host has not recorded it yet;
    /// also `-o kms_key=ARN`.
    #[arg(long)]
    kms_key: Option<String>,
    /// Key cache capacity (number of data keys).
    #[arg(long, default_value_t = DEFAULT_CAPACITY)]
    cache_size: usize,
    /// Key cache max age in seconds.
    #[arg(long, default_value_t = DEFAULT_MAX_AGE.as_secs())]
    cache_max_age: u64,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// Log to this file instead of stderr (foreground) or syslog (daemon).
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// The cipher dir is mounted on other hosts too (shared storage): no
    /// caching across opens, locks across mounts; also `-o shared`.
    #[arg(long)]
    shared: bool,
}

struct Failure(u8, String);

impl<E: std::fmt::Display> From<(u8, E)> for Failure {
    fn from((c, e): (u8, E)) -> Self {
        Failure(c, e.to_string())
    }
}

/// Sets up logging: to `to` if given (an open failure is returned, so the
/// mount fails instead of logging silently elsewhere), else to the journal
/// when stderr is systemd's journal stream (real priorities), else syslog
/// (background daemon) or stderr.
fn init_logging(to: Option<&Path>, syslog: bool) -> Result<Option<daemon::LogFile>, Failure> {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::prelude::*;
    let filter = EnvFilter::try_from_env("KMSFS_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Whatever KMSFS_LOG asks for, the AWS SDK and HTTP stack never log
    // below WARN: their debug and trace levels can print request bodies,
    // which carry data keys (Encrypt) and responses with plaintext keys.
    let filter =
        ["aws_smithy_runtime", "aws_smithy_http", "aws_sdk_kms", "aws_config", "hyper", "hyper_util", "h2", "rustls"]
            .iter()
            .filter_map(|t| format!("{t}=warn").parse().ok())
            .fold(filter, |f, d| f.add_directive(d));
    let fmt = tracing_subscriber::fmt::layer().with_target(false);
    let reg = tracing_subscriber::registry().with(filter);
    if let Some(p) = to {
        let f = daemon::LogFile::open(p)
            .map_err(|e| Failure(exit::ERROR, format!("cannot open the log file {}: {e}", p.display())))?;
        let _ = reg.with(fmt.with_ansi(false).with_writer(f.writer())).try_init();
        return Ok(Some(f));
    }
    if daemon::stderr_is_journal()
        && let Ok(j) = tracing_journald::layer()
    {
        let _ = reg.with(j.with_syslog_identifier("kmsfs".into())).try_init();
    } else if syslog {
        let _ = reg.with(fmt.with_ansi(false).without_time().with_writer(daemon::Syslog::open())).try_init();
    } else {
        let _ = reg.with(fmt.with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr)).try_init();
    }
    Ok(None)
}

/// With AWS_PROFILE naming a profile that no AWS config file has, says so:
/// the SDK itself only reports the missing region or credentials.
fn missing_profile() -> Option<String> {
    let name = std::env::var("AWS_PROFILE").ok().filter(|p| !p.is_empty())?;
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let file = |var: &str, default: &str| {
        std::env::var_os(var).map(PathBuf::from).or_else(|| home.as_ref().map(|h| h.join(".aws").join(default)))
    };
    let files: Vec<PathBuf> = [file("AWS_CONFIG_FILE", "config"), file("AWS_SHARED_CREDENTIALS_FILE", "credentials")]
        .into_iter()
        .flatten()
        .collect();
    let found = files.iter().any(|f| {
        std::fs::read_to_string(f).is_ok_and(|t| {
            t.lines().map(str::trim).any(|l| l == format!("[{name}]") || l == format!("[profile {name}]"))
        })
    });
    if found {
        return None;
    }
    let where_ = if files.is_empty() {
        "no AWS config file ($HOME is unset: set AWS_CONFIG_FILE, or HOME in the unit)".to_string()
    } else {
        files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(" or ")
    };
    Some(format!("AWS profile {name:?} (AWS_PROFILE or --profile) is not in {where_}"))
}

fn main() -> ExitCode {
    // mount.fuse3 runs `kmsfs CIPHERDIR MOUNTPOINT -o opts`: accept that form.
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let known = [
        "init",
        "mount",
        "unmount",
        "encrypt",
        "decrypt",
        "inspect",
        "rewrap",
        "fsck",
        "stats",
        "help",
        "completions",
        "path",
        "manpage",
        "upgrade",
        "rotate-branch",
        "info",
    ];
    if args.len() >= 3 && args[1].to_str().is_none_or(|a| !known.contains(&a) && !a.starts_with('-')) {
        // mount(8)-helper flags: -n (no mtab), -s (sloppy), -v (verbose) do not
        // apply; -f means "fake" there, not "foreground".
        if args.iter().any(|a| a == "-f") {
            return ExitCode::SUCCESS;
        }
        args.retain(|a| a != "-n" && a != "-s" && a != "-v");
        args.insert(1, "mount".into());
    }
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USAGE } else { 0 });
        }
    };
    // Before any thread exists (the SDK reads these when it loads).
    for (var, val) in [("AWS_REGION", &cli.region), ("AWS_PROFILE", &cli.profile)] {
        if let Some(v) = val {
            // SAFETY: single-threaded still: no thread reads the environment.
            unsafe { std::env::set_var(var, v) };
        }
    }
    if let Cmd::Mount(_) = &cli.cmd {
        // Before any thread exists, so only the main thread sees signals.
        daemon::block_signals();
    } else {
        let _ = init_logging(None, false);
    }
    match run(cli.cmd) {
        Ok(code) => ExitCode::from(code),
        Err(Failure(code, mut msg)) => {
            if code == exit::KEY
                && let Some(hint) = missing_profile()
            {
                msg = format!("{hint} ({msg})");
            }
            eprintln!("kmsfs: {msg}");
            // The background parent exits with the daemon's own code.
            daemon::report_ready(&format!("exit={code} kmsfs: {msg}"));
            ExitCode::from(code)
        }
    }
}

fn load(cipherdir: &Path) -> Result<VolumeConfig, Failure> {
    VolumeConfig::load(cipherdir).map_err(|e| Failure(exit::VOLUME, e.to_string()))
}

/// The exit code for a volume error (see `exit::Code`).
fn volume_failure(e: VolumeError) -> Failure {
    fail(e)
}

/// Opens a volume through its trust anchor (see `volume::open`).
fn open_volume(cipherdir: &Path, key_file: Option<PathBuf>, kms_key: Option<String>) -> Result<OpenVolume, Failure> {
    kmsfs::volume::open(cipherdir, &KeyArgs { key_file, kms_key }).map_err(volume_failure)
}

/// Refuses a key file inside the cipher dir, for any command or option.
fn key_outside(cipherdir: &Path, key: Option<&Path>) -> Result<(), Failure> {
    match key {
        Some(k) if kmsfs::volume::inside(cipherdir, k) => {
            Err(Failure(exit::USAGE, format!("{}: the key file must live outside the cipher dir", k.display())))
        }
        _ => Ok(()),
    }
}

/// An input that does not even start with the kmsfs magic is not a kmsfs
/// file (exit 3), not a damaged one (exit 6).
fn not_kmsfs(file: &Path, f: Failure) -> Failure {
    let mut magic = [0u8; 4];
    let is_kmsfs =
        std::fs::File::open(file).and_then(|mut r| r.read_exact(&mut magic)).is_ok() && magic == kmsfs::format::MAGIC;
    if f.0 == exit::DAMAGED && !is_kmsfs {
        Failure(exit::VOLUME, format!("{}: not a kmsfs file", file.display()))
    } else {
        f
    }
}

fn layout_of(cfg: &VolumeConfig) -> Result<Layout, Failure> {
    cfg.layout().ok_or_else(|| Failure(exit::VOLUME, "invalid block or header size in volume config".into()))
}

/// A progress bar on stderr for fsck and rewrap: files and bytes, with an
/// ETA; indicatif throttles the redraw (at most 10 a second). Nothing at
/// all when stderr is not a terminal.
fn progress(label: &'static str) -> impl FnMut(kmsfs::offline::Progress) {
    let bar = std::io::stderr().is_terminal().then(|| {
        let pb = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr_with_hz(10));
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {msg} files, {bytes}/{total_bytes} ({bytes_per_sec}, ETA {eta})",
        ) {
            pb.set_style(style.progress_chars("#>-"));
        }
        pb.set_prefix(label);
        pb
    });
    move |p| {
        if let Some(pb) = &bar {
            pb.set_length(p.bytes_total);
            pb.set_position(p.bytes);
            pb.set_message(format!("{}/{}", p.files, p.files_total));
            if p.files == p.files_total {
                pb.finish_and_clear();
            }
        }
    }
}

/// Byte progress for encrypt and decrypt, on a terminal only: wraps the
/// input so every read advances the bar (a spinner when the size is unknown).
fn byte_progress(label: &'static str, input: &Path, r: Box<dyn std::io::Read>) -> Box<dyn std::io::Read> {
    if !std::io::stderr().is_terminal() {
        return r;
    }
    let len = (input != Path::new("-")).then(|| std::fs::metadata(input).ok().map(|m| m.len())).flatten();
    let pb = indicatif::ProgressBar::with_draw_target(len, indicatif::ProgressDrawTarget::stderr_with_hz(10));
    let tpl = if len.is_some() {
        "{prefix} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, ETA {eta})"
    } else {
        "{prefix} {spinner} {bytes} ({bytes_per_sec})"
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(tpl) {
        pb.set_style(style.progress_chars("#>-"));
    }
    pb.set_prefix(label);
    Box::new(ClearOnDrop(pb.wrap_read(r)))
}

/// Clears the bar when the input is done with (success or error).
struct ClearOnDrop<R: std::io::Read>(indicatif::ProgressBarIter<R>);

impl<R: std::io::Read> std::io::Read for ClearOnDrop<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R: std::io::Read> Drop for ClearOnDrop<R> {
    fn drop(&mut self) {
        self.0.progress.finish_and_clear();
    }
}

fn open_in(p: &Path) -> Result<Box<dyn std::io::Read>, Failure> {
    if p == Path::new("-") {
        return Ok(Box::new(std::io::stdin().lock()));
    }
    let f = std::fs::File::open(p).map_err(|e| Failure(exit::ERROR, format!("{}: {e}", p.display())))?;
    Ok(Box::new(std::io::BufReader::with_capacity(1 << 20, f)))
}

fn open_out(p: &Path) -> Result<Box<dyn Write>, Failure> {
    if p == Path::new("-") {
        return Ok(Box::new(std::io::stdout().lock()));
    }
    let f = std::fs::File::create(p).map_err(|e| Failure(exit::ERROR, format!("{}: {e}", p.display())))?;
    Ok(Box::new(std::io::BufWriter::with_capacity(1 << 20, f)))
}

fn run(cmd: Cmd) -> Result<u8, Failure> {
    match cmd {
        Cmd::Init { cipherdir, kms_key, key_file, block_size, plaintext_names, key_mode } => {
            init(&cipherdir, kms_key, key_file, block_size, plaintext_names, key_mode)
        }
        Cmd::Mount(m) => mount(m),
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "kmsfs", &mut std::io::stdout());
            Ok(0)
        }
        Cmd::Manpage => {
            manpage(&mut std::io::stdout().lock()).map_err(|e| Failure(exit::ERROR, e.to_string()))?;
            Ok(0)
        }
        Cmd::Unmount { mountpoint } => unmount(&mountpoint),
        Cmd::Inspect { file, json } => {
            let v = kmsfs::offline::inspect(&file).map_err(|e| not_kmsfs(&file, fail(e)))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else if let Some(o) = v.as_object() {
                for (k, val) in o {
                    println!("{k:16} {}", val.as_str().map(str::to_owned).unwrap_or_else(|| val.to_string()));
                }
            }
            Ok(0)
        }
        Cmd::Encrypt { volume, kms_key, key_file, input, output } => {
            stdin_once(&input, key_file.as_deref())?;
            let (provider, layout, vid): (Arc<dyn KeyProvider>, Layout, _) = if let Some(v) = &volume {
                key_outside(v, key_file.as_deref())?;
                let ov = open_volume(v, key_file, None)?;
                (ov.provider, layout_of(&ov.config)?, ov.config.volume_id())
            } else if let Some(k) = kms_key {
                let p = kmsfs::keys::open_aws_kms(&k, &[]).map_err(fail)?;
                let l = Layout::new(kmsfs::volume::KMS_HEADER_SIZE, 12).ok_or(Failure(exit::ERROR, "layout".into()))?;
                (p, l, kmsfs::format::random_id().map_err(|e| Failure(exit::ERROR, e.to_string()))?)
            } else if let Some(k) = key_file {
                let p = LocalProvider::open(&k).map_err(fail)?;
                let l =
                    Layout::new(kmsfs::volume::LOCAL_HEADER_SIZE, 12).ok_or(Failure(exit::ERROR, "layout".into()))?;
                (Arc::new(p), l, kmsfs::format::random_id().map_err(|e| Failure(exit::ERROR, e.to_string()))?)
            } else {
                return Err(Failure(exit::USAGE, "encrypt needs --volume, --kms-key or --key-file".into()));
            };
            let mut i = byte_progress("encrypt", &input, open_in(&input)?);
            let mut o = open_out(&output)?;
            kmsfs::offline::encrypt_stream(&mut i, &mut o, layout, vid, provider.as_ref()).map_err(fail)?;
            Ok(0)
        }
        Cmd::Decrypt { volume, key_file, kms_key, trust_header_key, input, output } => {
            stdin_once(&input, key_file.as_deref())?;
            let mut i = byte_progress("decrypt", &input, open_in(&input)?);
            let provider: Arc<dyn KeyProvider> = if let Some(v) = &volume {
                key_outside(v, key_file.as_deref())?;
                open_volume(v, key_file.clone(), kms_key.clone())?.provider
            } else if let Some(k) = &kms_key {
                // Only this key is trusted: a header naming another is refused.
                kmsfs::keys::open_aws_kms(k, &[]).map_err(fail)?
            } else if let Some(k) = &key_file {
                Arc::new(LocalProvider::open(k).map_err(fail)?)
            } else {
                // No volume: the header names the KMS key. Peek at it, then
                // hand the decryptor the same bytes again.
                let mut prefix = vec![0u8; 8];
                i.read_exact(&mut prefix)
                    .map_err(|e| Failure(exit::VOLUME, format!("input: not a kmsfs file ({e})")))?;
                if prefix[..4] != kmsfs::format::MAGIC {
                    return Err(Failure(exit::VOLUME, "input: not a kmsfs file (bad magic)".into()));
                }
                let hs = kmsfs::format::header::declared_size(&prefix).unwrap_or(0);
                prefix.resize(hs.max(8), 0);
                i.read_exact(&mut prefix[8..]).map_err(|e| Failure(exit::DAMAGED, format!("input: {e}")))?;
                let h =
                    kmsfs::offline::peek_header(&prefix).map_err(|e| Failure(exit::DAMAGED, format!("input: {e}")))?;
                if h.wrapped.provider != "aws-kms" {
                    return Err(Failure(exit::USAGE, "a local-provider file needs --key-file or --volume".into()));
                }
                if !trust_header_key {
                    return Err(Failure(
                        exit::USAGE,
                        format!(
                            "the file's header names KMS key {}; the header is not authenticated, so say which key \
                             you trust: --kms-key ARN, --volume CIPHERDIR, or --trust-header-key",
                            h.wrapped.key_id.escape_debug()
                        ),
                    ));
                }
                i = Box::new(std::io::Cursor::new(prefix).chain(i));
                kmsfs::keys::open_aws_kms(&h.wrapped.key_id, &[]).map_err(fail)?
            };
            // Not a kmsfs file at all (exit 3) is told apart from a damaged
            // one (exit 6) by the magic alone; the bytes go back in front.
            let mut magic = Vec::with_capacity(4);
            (&mut i).take(4).read_to_end(&mut magic).map_err(|e| Failure(exit::ERROR, format!("input: {e}")))?;
            if !magic.is_empty() && magic[..] != kmsfs::format::MAGIC[..] {
                return Err(Failure(exit::VOLUME, "input: not a kmsfs file (bad magic)".into()));
            }
            let mut i: Box<dyn std::io::Read> = Box::new(std::io::Cursor::new(magic).chain(i));
            // Decrypt into a temp file and rename, so a failed authentication
            // never leaves partial plaintext under the output name.
            if output == Path::new("-") {
                let mut o = open_out(&output)?;
                kmsfs::offline::decrypt_stream(&mut i, &mut o, provider.as_ref()).map_err(fail)?;
            } else {
                let tmp = output.with_extension("kmsfs-partial");
                let mut o = open_out(&tmp)?;
                let r = kmsfs::offline::decrypt_stream(&mut i, &mut o, provider.as_ref());
                drop(o);
                if let Err(e) = r {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(fail(e));
                }
                std::fs::rename(&tmp, &output).map_err(|e| Failure(exit::ERROR, e.to_string()))?;
            }
            Ok(0)
        }
        Cmd::Path { cipherdir, path, reverse, key_file, kms_key } => {
            key_outside(&cipherdir, key_file.as_deref())?;
            let OpenVolume { config: cfg, provider: p, .. } = open_volume(&cipherdir, key_file, kms_key)?;
            let names = cfg.names(p.as_ref()).map_err(fail)?;
            let out = if reverse {
                kmsfs::offline::backing_to_plain(&cipherdir, &path, &names)
            } else {
                kmsfs::offline::plain_to_backing(&cipherdir, &path, &names)
            }
            .map_err(fail)?;
            println!("{}", out.display());
            Ok(0)
        }
        Cmd::Fsck { cipherdir, key_file, kms_key, json, repair } => {
            key_outside(&cipherdir, key_file.as_deref())?;
            // A repair changes files: never under a live mount, here or on
            // another host (-o shared). A check only reads.
            let _lock = match repair {
                true => Some(kmsfs::volume::lock(&cipherdir, true).map_err(volume_failure)?),
                false => None,
            };
            let OpenVolume { config: cfg, provider: p, legacy } = open_volume(&cipherdir, key_file, kms_key)?;
            if legacy && repair {
                return Err(volume_failure(VolumeError::Legacy {
                    path: cipherdir.join(kmsfs::volume::CONFIG_NAME).display().to_string(),
                    cipherdir: cipherdir.display().to_string(),
                }));
            }
            let names = cfg.names(p.as_ref()).map_err(fail)?;
            let r = kmsfs::offline::fsck(
                &cipherdir,
                layout_of(&cfg)?,
                cfg.volume_id(),
                p.as_ref(),
                &names,
                repair,
                progress("fsck"),
            )
            .map_err(fail)?;
            let dir_damage = !r.dirs.bad_ids.is_empty() || !r.dirs.undecryptable.is_empty();
            if json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                for d in &r.damaged {
                    let blocks =
                        if d.bad_blocks.is_empty() { String::new() } else { format!(" (blocks {:?})", d.bad_blocks) };
                    println!("DAMAGED {}: {}{blocks}", d.path, d.error);
                }
                for (p, k) in &r.foreign {
                    println!("FOREIGN {p}: wrapped under key {k}, which this volume does not trust");
                }
                for x in &r.repaired {
                    println!(
                        "REPAIRED {}: cut {} bytes ({} torn or unauthentic block(s)), re-sealed block(s) {:?}",
                        x.path, x.cut_bytes, x.cut_blocks, x.resealed
                    );
                }
                for (p, s) in &r.stale {
                    println!(
                        "STALE   {p}: block(s) {:?} left by an interrupted append or truncation (read as their data \
                         followed by zeros); fsck --repair re-seals them",
                        &s[..s.len().min(5)]
                    );
                }
                for (p, z) in &r.zeroed {
                    println!(
                        "ZEROED  {p}: {} all-zero block(s) read as holes, first {:?}",
                        z.len(),
                        &z[..z.len().min(5)]
                    );
                }
                println!(
                    "{} files, {} blocks checked, {} damaged, {} with zeroed blocks",
                    r.files,
                    r.blocks,
                    r.damaged.len(),
                    r.zeroed.len()
                );
            }
            if !json {
                for (d, why) in &r.dirs.bad_ids {
                    println!("DIRID   {d}: {why}");
                }
                for d in &r.dirs.repaired {
                    println!("REPAIRED {d}: directory ID copy restored");
                }
                for d in &r.dirs.undecryptable {
                    println!("NAME    {d}: name does not decrypt (hidden from the mount)");
                }
            }
            Ok(if r.damaged.is_empty() && r.foreign.is_empty() && !dir_damage { 0 } else { exit::DAMAGED })
        }
        Cmd::Rewrap { cipherdir, to_key, to_key_file, key_file, kms_key, dry_run, all_files } => {
            rewrap(&cipherdir, to_key, to_key_file, key_file, kms_key, dry_run, all_files)
        }
        Cmd::RotateBranch { cipherdir, kms_key } => rotate_branch(&cipherdir, kms_key),
        Cmd::Upgrade { cipherdir, key_file, kms_key } => upgrade(&cipherdir, key_file, kms_key),
        Cmd::Info { cipherdir, json, verify, key_file, kms_key } => info(&cipherdir, json, verify, key_file, kms_key),
        Cmd::Stats { mountpoint, json, format } => {
            let v =
                read_stats(&mountpoint).map_err(|e| Failure(exit::ERROR, format!("{}: {e}", mountpoint.display())))?;
            if format == StatsFormat::Prometheus {
                print!("{}", prometheus(&v, &mountpoint));
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
    }
}

/// `kmsfs info`: what the config says, read without a key (the MAC is
/// only checked with `verify`), and what this host's trust store records.
fn info(
    cipherdir: &Path,
    json: bool,
    verify: bool,
    key_file: Option<PathBuf>,
    kms_key: Option<String>,
) -> Result<u8, Failure> {
    let cfg = if verify {
        key_outside(cipherdir, key_file.as_deref())?;
        open_volume(cipherdir, key_file, kms_key)?.config
    } else {
        load(cipherdir)?
    };
    let pin = kmsfs::trust::TrustStore::default_location()
        .get(&cfg.volume_id())
        .map_err(|e| Failure(exit::ERROR, format!("trust store: {e}")))?;
    let provider = match cfg.provider {
        ProviderKind::Local => "local",
        ProviderKind::AwsKms => "aws-kms",
    };
    let authenticated = match (&cfg.mac, verify) {
        (None, _) => "no (made by an older kmsfs: run kmsfs upgrade)",
        (Some(_), true) => "yes (MAC verified)",
        (Some(_), false) => "MAC present (not verified: use --verify)",
    };
    let trust = match &pin {
        Some(p) if p.key_id == cfg.key_id => format!("this host trusts {} for this volume", p.key_id),
        Some(p) => format!("this host trusts {}, NOT the key this config names", p.key_id),
        None => "no record on this host (name the key once: --kms-key or --key-file)".into(),
    };
    let v = serde_json::json!({
        "volume_id": cfg.volume_id,
        "provider": provider,
        "key_id": cfg.key_id,
        "key_file": cfg.key_file,
        "previous_keys": cfg.previous_keys,
        "names": if cfg.plaintext_names { "plaintext" } else { "encrypted" },
        "block_size": cfg.block_size,
        "header_size": cfg.header_size,
        "format_version": cfg.format_version,
        "config_mac": cfg.mac.is_some(),
        "config_verified": verify && cfg.mac.is_some(),
        "authenticated": authenticated,
        "trust_record": pin.as_ref().map(|p| serde_json::json!({"provider": p.provider, "key_id": p.key_id})),
        "trust": trust,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        println!("volume ID       {}", cfg.volume_id);
        println!("provider        {provider}");
        println!("key             {}", cfg.key_id);
        if let Some(k) = &cfg.key_file {
            println!("key file        {}", k.display());
        }
        if !cfg.previous_keys.is_empty() {
            println!("previous keys   {}", cfg.previous_keys.join(", "));
        }
        println!("names           {}", v["names"].as_str().unwrap_or_default());
        println!("block size      {}", cfg.block_size);
        println!("format version  {}", cfg.format_version);
        println!("authenticated   {authenticated}");
        println!("trust           {trust}");
    }
    Ok(0)
}

/// The stats snapshot in Prometheus text format, for node_exporter's
/// textfile collector. Counters only grow while the mount lives.
fn prometheus(v: &serde_json::Value, mnt: &Path) -> String {
    use std::fmt::Write as _;
    let label = mnt.display().to_string().replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    let mut o = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, rows: Vec<(String, serde_json::Value)>| {
        let _ = writeln!(o, "# HELP kmsfs_{name} {help}\n# TYPE kmsfs_{name} {kind}");
        for (extra, val) in rows {
            let val = val.as_f64().unwrap_or(0.0);
            let _ = writeln!(o, "kmsfs_{name}{{mountpoint=\"{label}\"{extra}}} {val}");
        }
    };
    let ops: Vec<(String, serde_json::Value)> = v["provider_calls"]
        .as_object()
        .map(|m| m.iter().map(|(k, s)| (k.clone(), s.clone())).collect())
        .unwrap_or_default();
    let per_op = |f: &dyn Fn(&serde_json::Value) -> serde_json::Value| {
        ops.iter().map(|(op, s)| (format!(",op=\"{op}\""), f(s))).collect::<Vec<_>>()
    };
    metric("kms_calls_total", "counter", "Key-provider calls by operation.", per_op(&|s| s["calls"].clone()));
    metric("kms_errors_total", "counter", "Failed key-provider calls by operation.", per_op(&|s| s["errors"].clone()));
    metric(
        "kms_latency_mean_seconds",
        "gauge",
        "Mean key-provider call latency by operation.",
        per_op(&|s| (s["latency_us"]["mean"].as_f64().unwrap_or(0.0) / 1e6).into()),
    );
    metric(
        "kms_latency_p99_seconds",
        "gauge",
        "Upper bound of the 99th percentile key-provider latency by operation.",
        per_op(&|s| (s["latency_us"]["p99_le"].as_f64().unwrap_or(0.0) / 1e6).into()),
    );
    let mut hist = String::new();
    // A real histogram: cumulative buckets in seconds, _sum and _count.
    let _ = writeln!(
        hist,
        "# HELP kmsfs_kms_latency_seconds Key-provider call latency by operation.\n# TYPE kmsfs_kms_latency_seconds histogram"
    );
    for (op, st) in &ops {
        let mut acc = 0u64;
        for b in st["latency_us"]["buckets"].as_array().into_iter().flatten() {
            acc += b[1].as_u64().unwrap_or(0);
            let le = match b[0].as_u64() {
                Some(u64::MAX) | None => "+Inf".to_string(),
                Some(us) => format!("{}", us as f64 / 1e6),
            };
            let _ = writeln!(
                hist,
                "kmsfs_kms_latency_seconds_bucket{{mountpoint=\"{label}\",op=\"{op}\",le=\"{le}\"}} {acc}"
            );
        }
        let sum = st["latency_us"]["sum"].as_f64().unwrap_or(0.0) / 1e6;
        let _ = writeln!(hist, "kmsfs_kms_latency_seconds_sum{{mountpoint=\"{label}\",op=\"{op}\"}} {sum}");
        let _ = writeln!(
            hist,
            "kmsfs_kms_latency_seconds_count{{mountpoint=\"{label}\",op=\"{op}\"}} {}",
            st["calls"].as_u64().unwrap_or(0)
        );
    }
    let c = &v["cache"];
    metric("key_cache_hits_total", "counter", "Data-key cache hits.", vec![(String::new(), c["hits"].clone())]);
    metric("key_cache_misses_total", "counter", "Data-key cache misses.", vec![(String::new(), c["misses"].clone())]);
    metric(
        "key_cache_evictions_total",
        "counter",
        "Data keys dropped from the cache.",
        vec![(String::new(), c["evictions"].clone())],
    );
    metric("key_cache_keys", "gauge", "Data keys in the cache.", vec![(String::new(), c["size"].clone())]);
    metric(
        "key_pool_ready",
        "gauge",
        "Fresh data keys ready in the pool.",
        vec![(String::new(), v["pool"]["ready"].clone())],
    );
    metric(
        "key_pool_refill_errors_total",
        "counter",
        "Failed pool refills.",
        vec![(String::new(), v["pool"]["refill_errors"].clone())],
    );
    metric(
        "integrity_errors_total",
        "counter",
        "Reads that failed authentication (EIO), logged or not.",
        vec![(String::new(), v["integrity_errors"].clone())],
    );
    metric(
        "read_bytes_total",
        "counter",
        "Plaintext bytes served by read.",
        vec![(String::new(), v["bytes_read"].clone())],
    );
    metric(
        "written_bytes_total",
        "counter",
        "Plaintext bytes accepted by write.",
        vec![(String::new(), v["bytes_written"].clone())],
    );
    metric("inodes", "gauge", "Inodes the mount knows.", vec![(String::new(), v["inodes"].clone())]);
    metric("handles", "gauge", "Open file handles.", vec![(String::new(), v["handles"].clone())]);
    o.push_str(&hist);
    o
}

/// Files kmsfs reads or writes, for the man page.
const FILES: &[(&str, &str)] = &[
    ("CIPHERDIR/kmsfs.conf", "the volume config (JSON, authenticated by a MAC under the volume's key)"),
    ("CIPHERDIR/.kmsfs.lock", "held by every mount; rewrap and upgrade take it exclusively"),
    (
        "/var/lib/kmsfs/trust/ (root), ~/.local/state/kmsfs/trust/ (others), $KMSFS_TRUST_DIR",
        "the keys this host trusts, per volume ID",
    ),
    ("/etc/kmsfs/NAME.env", "settings of the kmsfs@NAME systemd unit"),
    ("$CREDENTIALS_DIRECTORY/kmsfs.key", "a local key handed over by systemd (LoadCredential=)"),
];

/// Examples, for the man page.
const EXAMPLES: &[(&str, &str)] = &[
    (
        "Create a volume with a local key and mount it:",
        "kmsfs init /srv/c --key-file /etc/kmsfs/c.key\nkmsfs mount /srv/c /srv/p",
    ),
    ("Create a volume under an AWS KMS key:", "kmsfs --region eu-west-1 init /srv/c --kms-key alias/kmsfs"),
    ("Mount from fstab:", "/srv/c /srv/p fuse.kmsfs key_file=/etc/kmsfs/c.key,allow_other,nofail,_netdev 0 0"),
    ("Run as a systemd service:", "systemctl enable --now kmsfs@docs"),
    (
        "Check every block, then rotate to a new KMS key:",
        "kmsfs fsck /srv/c\nkmsfs rewrap /srv/c --to-key alias/kmsfs-2 --dry-run\nkmsfs rewrap /srv/c --to-key alias/kmsfs-2",
    ),
    (
        "Describe a volume and export mount statistics:",
        "kmsfs info /srv/c\nkmsfs stats /srv/p --format prometheus > /var/lib/node_exporter/kmsfs.prom",
    ),
];

/// Escapes text for roff.
fn roff(t: &str) -> String {
    t.replace('\\', "\\e")
        .replace('-', "\\-")
        .lines()
        .map(|l| if l.starts_with(['.', '\'']) { format!("\\&{l}") } else { l.to_string() })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The man page: the main command, then every subcommand with its
/// options (mount's -o options among them), exit status, environment,
/// files and examples.
fn manpage(w: &mut dyn Write) -> std::io::Result<()> {
    use clap::CommandFactory;
    let mut cmd = Cli::command().after_help("");
    cmd.build();
    let man = clap_mangen::Man::new(cmd.clone());
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    writeln!(
        w,
        ".SH OPTIONS\n.TP\n.B \\-\\-region \\fIREGION\\fR\nAWS region for KMS (sets AWS_REGION); any command.\n\
         .TP\n.B \\-\\-profile \\fINAME\\fR\nAWS profile for KMS credentials and region (sets AWS_PROFILE); any command.\n\
         .TP\n.B \\-h, \\-\\-help\nPrint help.\n.TP\n.B \\-V, \\-\\-version\nPrint the version."
    )?;
    writeln!(w, ".SH COMMANDS")?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        let mut buf = Vec::new();
        let m = clap_mangen::Man::new(sub.clone());
        m.render_synopsis_section(&mut buf)?;
        m.render_description_section(&mut buf)?;
        m.render_options_section(&mut buf)?;
        let text = String::from_utf8_lossy(&buf);
        writeln!(w, ".SS \"kmsfs {}\"", sub.get_name())?;
        // Each subcommand's sections become paragraphs of its subsection.
        for line in text.lines() {
            match line {
                ".SH SYNOPSIS" | ".SH NAME" => {}
                ".SH DESCRIPTION" => writeln!(w, ".PP")?,
                ".SH OPTIONS" => writeln!(w, ".PP\n.I Options:")?,
                l if l.starts_with(".SH") => writeln!(w, ".PP\n.I {}", l.trim_start_matches(".SH ").trim_matches('"'))?,
                l => writeln!(w, "{l}")?,
            }
        }
    }
    writeln!(w, ".SH \"EXIT STATUS\"")?;
    for line in exit::TABLE.lines().skip(1) {
        match line.trim_start().split_once("  ") {
            Some((code, what)) if code.len() == 1 => writeln!(w, ".TP\n.B {code}\n{}", roff(what.trim()))?,
            _ => writeln!(w, "{}", roff(line.trim()))?,
        }
    }
    writeln!(w, ".SH ENVIRONMENT")?;
    let mut pending: Vec<&str> = Vec::new();
    for line in ENVIRONMENT.lines().skip(1) {
        let t = line.trim();
        if line.starts_with("  ") && !line.starts_with("   ") {
            if !pending.is_empty() {
                writeln!(w, "{}", roff(&pending.join(" ")))?;
                pending.clear();
            }
            let (name, rest) = t.split_once("  ").unwrap_or((t, ""));
            writeln!(w, ".TP\n.B {}", roff(name.trim()))?;
            if !rest.trim().is_empty() {
                pending.push(rest.trim());
            }
        } else {
            pending.push(t);
        }
    }
    if !pending.is_empty() {
        writeln!(w, "{}", roff(&pending.join(" ")))?;
    }
    writeln!(w, ".SH FILES")?;
    for (f, what) in FILES {
        writeln!(w, ".TP\n.I {}\n{}", roff(f), roff(what))?;
    }
    writeln!(w, ".SH EXAMPLES")?;
    for (what, ex) in EXAMPLES {
        writeln!(w, ".PP\n{}\n.PP\n.RS 4\n.nf\n{}\n.fi\n.RE", roff(what), roff(ex))?;
    }
    writeln!(w, ".SH \"SEE ALSO\"\n.BR fusermount3 (1),\n.BR mount.fuse3 (8),\n.BR systemd.exec (5)")?;
    man.render_version_section(w)?;
    Ok(())
}

fn read_stats(mnt: &Path) -> std::io::Result<serde_json::Value> {
    let c = std::ffi::CString::new(mnt.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: `c` is a CString alive for the call, the name a static C string, and
    // getxattr writes at most `buf.len()` bytes into `buf`, which we own.
    let n = unsafe { libc::getxattr(c.as_ptr(), c"user.kmsfs.stats".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("not a kmsfs mount ({e})")));
    }
    buf.truncate(n as usize);
    serde_json::from_slice(&buf).map_err(std::io::Error::other)
}

fn init(
    cipherdir: &Path,
    kms_key: Option<String>,
    key_file: Option<PathBuf>,
    block_size: u32,
    plaintext_names: bool,
    key_mode: KeyMode,
) -> Result<u8, Failure> {
    if !(4096..=1 << 20).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(Failure(exit::USAGE, "--block-size must be a power of two from 4096 to 1048576".into()));
    }
    if key_mode == KeyMode::Branch && kms_key.is_none() {
        return Err(Failure(exit::USAGE, "--key-mode branch needs --kms-key".into()));
    }
    std::fs::create_dir_all(cipherdir).map_err(|e| Failure(exit::ERROR, format!("{}: {e}", cipherdir.display())))?;
    let mut entries =
        std::fs::read_dir(cipherdir).map_err(|e| Failure(exit::ERROR, format!("{}: {e}", cipherdir.display())))?;
    if entries.next().is_some() {
        let what = if cipherdir.join(kmsfs::volume::CONFIG_NAME).exists() {
            "is already a kmsfs volume"
        } else {
            "is not empty"
        };
        return Err(Failure(exit::VOLUME, format!("{} {what}", cipherdir.display())));
    }
    let (mut cfg, provider): (VolumeConfig, Arc<dyn KeyProvider>) = if let Some(k) = kms_key {
        let p = kmsfs::keys::open_aws_kms(&k, &[]).map_err(fail)?;
        p.check().map_err(fail)?;
        // The resolved ARN, not an alias someone could later repoint.
        let cfg = VolumeConfig::new(ProviderKind::AwsKms, p.key_id(), None, block_size)
            .map_err(|e| Failure(exit::ERROR, e.to_string()))?;
        (cfg, p)
    } else {
        let mut cfg = VolumeConfig::new(ProviderKind::Local, String::new(), None, block_size)
            .map_err(|e| Failure(exit::ERROR, e.to_string()))?;
        let path = key_file.unwrap_or_else(|| LocalProvider::default_path(&cfg.volume_id));
        let abs = std::path::absolute(&path).map_err(|e| Failure(exit::ERROR, e.to_string()))?;
        let cd = std::fs::canonicalize(cipherdir).map_err(|e| Failure(exit::ERROR, e.to_string()))?;
        let parent_canon = abs.parent().and_then(|p| std::fs::canonicalize(p).ok());
        if abs.starts_with(&cd) || parent_canon.is_some_and(|p| p.starts_with(&cd)) {
            return Err(Failure(exit::USAGE, "the key file must live outside the cipher dir".into()));
        }
        let p = LocalProvider::create_key_file(&abs).map_err(fail)?;
        cfg.key_id = p.key_id();
        cfg.key_file = Some(abs.clone());
        eprintln!(
            "Created key file {} (mode 0600). Back it up: without it the data cannot be decrypted.",
            abs.display()
        );
        (cfg, Arc::new(p))
    };
    if !plaintext_names {
        cfg.create_name_key(provider.as_ref()).map_err(fail)?;
    }
    if key_mode == KeyMode::Branch {
        cfg.create_branch_key(provider.as_ref()).map_err(volume_failure)?;
    }
    cfg.create_auth_key(provider.as_ref()).map_err(volume_failure)?;
    cfg.store(cipherdir).map_err(|e| Failure(exit::ERROR, e.to_string()))?;
    kmsfs::volume::pin(&cfg).map_err(volume_failure)?;
    eprintln!(
        "Initialized kmsfs volume {} in {} ({:?} provider, {} byte blocks)",
        cfg.volume_id,
        cipherdir.display(),
        cfg.provider,
        cfg.block_size
    );
    Ok(0)
}

/// `mnt` made absolute and resolved, without touching `mnt` itself when it
/// is a dead FUSE mount (any access to it fails with ENOTCONN).
fn resolve_mountpoint(mnt: &Path) -> PathBuf {
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

fn is_mounted(mnt: &Path) -> bool {
    fuse_mount_at(mnt).is_some()
}

/// Whether `mnt` is a mount whose daemon is gone ("transport endpoint is
/// not connected").
/// statfs(2), unlike stat, always asks the daemon (stat may be answered from
/// the kernel's attribute cache), so it tells a dead mount apart.
fn is_dead_mount(mnt: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(mnt.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: libc::statfs is plain integers; all-zero bits are valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a CString alive for the call; statfs writes one struct into
    // `st`, a local we own exclusively.
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOTCONN)
}

/// Refuses the mountpoints gocryptfs refuses: a dead or live mount, the
/// cipher dir itself or a directory inside it (fsck would then walk into
/// the mount), and a non-empty directory unless `-o nonempty`.
fn check_mountpoint(m: &MountArgs, nonempty: bool) -> Result<(), Failure> {
    let mnt = &m.mountpoint;
    if is_dead_mount(mnt) {
        return Err(Failure(
            exit::MOUNT,
            format!(
                "{} is a dead mount (transport endpoint is not connected: its daemon exited);                  clear it with `kmsfs unmount {}`, then mount again",
                mnt.display(),
                mnt.display()
            ),
        ));
    }
    if is_mounted(mnt) {
        return Err(Failure(exit::MOUNT, format!("{} is already mounted", mnt.display())));
    }
    let meta =
        std::fs::metadata(mnt).map_err(|e| Failure(exit::MOUNT, format!("mountpoint {}: {e}", mnt.display())))?;
    if !meta.is_dir() {
        return Err(Failure(exit::MOUNT, format!("mountpoint {} is not a directory", mnt.display())));
    }
    let at = resolve_mountpoint(mnt);
    if let Ok(cd) = std::fs::canonicalize(&m.cipherdir)
        && at.starts_with(&cd)
    {
        return Err(Failure(
            exit::MOUNT,
            format!("mountpoint {} is the cipher dir or inside it; mount it elsewhere", mnt.display()),
        ));
    }
    if !nonempty
        && std::fs::read_dir(mnt)
            .map_err(|e| Failure(exit::MOUNT, format!("mountpoint {}: {e}", mnt.display())))?
            .next()
            .is_some()
    {
        return Err(Failure(
            exit::MOUNT,
            format!(
                "mountpoint {} is not empty: the mount would hide its files (use -o nonempty to mount anyway)",
                mnt.display()
            ),
        ));
    }
    Ok(())
}

fn unmount(mnt: &Path) -> Result<u8, Failure> {
    if is_dead_mount(mnt) {
        // No daemon left to write anything back: just clear the mount.
        return daemon::unmount(mnt, false)
            .or_else(|_| daemon::unmount(mnt, true))
            .map(|()| {
                eprintln!("{}: cleared a dead mount (its daemon had exited)", mnt.display());
                0
            })
            .map_err(|e| Failure(exit::MOUNT, format!("cannot clear the dead mount {}: {e}", mnt.display())));
    }
    if !is_mounted(mnt) {
        return Err(Failure(exit::MOUNT, format!("{} is not a FUSE mount", mnt.display())));
    }
    // A plain unmount: the kernel writes its dirty pages back through the
    // daemon first, and the daemon exits when its session ends.
    let err = match daemon::unmount(mnt, false) {
        Ok(()) => return Ok(0),
        Err(e) => e,
    };
    // Busy. A lazy unmount here would let the daemon lose the dirty pages
    // of files still open there, so the daemon stops itself as on SIGTERM:
    // it writes them back, then detaches.
    let Some(pid) = read_stats(mnt).ok().and_then(|v| v["pid"].as_u64()).and_then(|p| i32::try_from(p).ok()) else {
        return Err(Failure(exit::MOUNT, format!("cannot unmount {}: {err}", mnt.display())));
    };
    // SAFETY: kill takes integers only and touches no memory (the pid is the
    // mount's own daemon).
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(Failure(exit::MOUNT, format!("cannot unmount {} ({err}) nor stop its daemon: {e}", mnt.display())));
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
            return Err(Failure(exit::MOUNT, format!("the daemon of {} (pid {pid}) did not stop", mnt.display())));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "{} was busy: its daemon wrote back all pending writes and detached it; processes still using it now get errors",
        mnt.display()
    );
    Ok(0)
}

fn rewrap(
    cipherdir: &Path,
    to_key: Option<String>,
    to_key_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    kms_key: Option<String>,
    dry_run: bool,
    all_files: bool,
) -> Result<u8, Failure> {
    key_outside(cipherdir, key_file.as_deref())?;
    key_outside(cipherdir, to_key_file.as_deref())?;
    if dry_run {
        return rewrap_dry_run(cipherdir, to_key, to_key_file);
    }
    // Excludes every mount of this cipher dir, here or on another host.
    let _lock = kmsfs::volume::lock(cipherdir, true).map_err(volume_failure)?;
    let OpenVolume { config: mut cfg, provider: source, legacy } = open_volume(cipherdir, key_file, kms_key)?;
    if legacy {
        return Err(volume_failure(VolumeError::Legacy {
            path: cipherdir.join(kmsfs::volume::CONFIG_NAME).display().to_string(),
            cipherdir: cipherdir.display().to_string(),
        }));
    }
    if cfg.is_branch() || all_files {
        return rewrap_branch(cipherdir, cfg, source, to_key, to_key_file, dry_run, all_files);
    }
    let (dest, kind, key_id, kf): (Arc<dyn KeyProvider>, ProviderKind, String, Option<PathBuf>) = if let Some(k) =
        to_key
    {
        let p = kmsfs::keys::open_aws_kms(&k, &[]).map_err(fail)?;
        p.check().map_err(fail)?;
        let arn = p.key_id();
        (p, ProviderKind::AwsKms, arn, None)
    } else if let Some(f) = to_key_file {
        let p = if f.exists() { LocalProvider::open(&f) } else { LocalProvider::create_key_file(&f) }.map_err(fail)?;
        let id = p.key_id();
        let abs = std::path::absolute(&f).unwrap_or(f);
        (Arc::new(p), ProviderKind::Local, id, Some(abs))
    } else {
        return Err(Failure(exit::USAGE, "rewrap needs --to-key or --to-key-file".into()));
    };
    let old_key = cfg.key_id.clone();
    // ReEncrypt runs on the destination's client: it may name as source only
    // the keys this volume trusts.
    dest.trust_also(&[vec![old_key.clone()], cfg.previous_keys.clone()].concat());
    let auth = cfg.unwrap_auth_key(source.as_ref()).map_err(volume_failure)?;
    if kind == ProviderKind::AwsKms && !cfg.previous_keys.contains(&key_id) && key_id != old_key {
        // Files move to the new key one by one: trust it for reading from
        // the start, so an interrupted rewrap leaves every file readable.
        cfg.previous_keys.push(key_id.clone());
        cfg.sign(&auth).map_err(volume_failure)?;
        cfg.store(cipherdir).map_err(|e| Failure(exit::ERROR, e.to_string()))?;
        source.trust_also(&cfg.previous_keys);
    }
    let names = cfg.names(source.as_ref()).map_err(fail)?;
    // The volume keys first: they are small, and a failure here changes nothing.
    let move_key = |sk: &kmsfs::volume::StoredKey, what: &str| -> Result<kmsfs::volume::StoredKey, Failure> {
        let (ctx, w) = sk.parts(cfg.volume_id()).ok_or(Failure(exit::VOLUME, format!("malformed {what}")))?;
        let nw = if source.name() == dest.name() && dest.name() != kmsfs::keys::local::NAME {
            dest.rewrap(&w, &ctx)
        } else {
            source.unwrap(&w, &ctx).and_then(|k| dest.wrap(&k, &ctx))
        }
        .map_err(|e| Failure(exit::KEY, format!("{what}: {e}")))?;
        Ok(kmsfs::volume::StoredKey::from_wrapped(&ctx, &nw))
    };
    let new_name_key = cfg.name_key.as_ref().map(|sk| move_key(sk, "name key")).transpose()?;
    let new_auth_key = cfg.auth_key.as_ref().map(|sk| move_key(sk, "config key")).transpose()?;
    let r =
        kmsfs::offline::rewrap(cipherdir, layout_of(&cfg)?, source.as_ref(), dest.as_ref(), &names, progress("rewrap"))
            .map_err(fail)?;
    for (p, e) in &r.failed {
        println!("FAILED {p}: {e}");
    }
    println!(
        "{} re-wrapped, {} already under the new key, {} empty, {} failed",
        r.rewrapped,
        r.already,
        r.empty,
        r.failed.len()
    );
    if !r.failed.is_empty() {
        println!(
            "The volume still uses the old key for new files; fix the failures and run rewrap again (it resumes)."
        );
        return Ok(exit::ERROR);
    }
    {
        cfg.previous_keys.retain(|k| *k != key_id);
        if cfg.provider == ProviderKind::AwsKms && !cfg.previous_keys.contains(&old_key) {
            cfg.previous_keys.push(old_key);
        }
        if kind == ProviderKind::Local {
            // A local key only ever opens its own wrappings.
            cfg.previous_keys.clear();
        }
        cfg.provider = kind;
        cfg.key_id = key_id;
        cfg.key_file = kf;
        cfg.name_key = new_name_key;
        cfg.auth_key = new_auth_key;
        cfg.sign(&auth).map_err(volume_failure)?;
        cfg.store(cipherdir).map_err(|e| Failure(exit::ERROR, e.to_string()))?;
        kmsfs::volume::pin(&cfg).map_err(volume_failure)?;
        println!("Volume now uses {} for new files.", cfg.key_id);
    }
    Ok(0)
}

/// `rewrap --dry-run`: no key-provider call and nothing created. The config
/// is read without verifying its MAC (that needs one unwrap), and the output
/// says so; the new key is not resolved or created either.
fn rewrap_dry_run(cipherdir: &Path, to_key: Option<String>, to_key_file: Option<PathBuf>) -> Result<u8, Failure> {
    let cfg = load(cipherdir)?;
    let dest: Option<String> = match (&to_key, &to_key_file) {
        // Only a full ARN can be compared with headers without a KMS call.
        (Some(k), _) => k.starts_with("arn:").then(|| k.clone()),
        (None, Some(f)) if f.exists() => Some(LocalProvider::open(f).map_err(fail)?.key_id()),
        (None, Some(_)) => None,
        (None, None) => return Err(Failure(exit::USAGE, "rewrap needs --to-key or --to-key-file".into())),
    };
    let r = kmsfs::offline::rewrap_plan(cipherdir, layout_of(&cfg)?, dest.as_deref()).map_err(fail)?;
    println!("dry run: no key-provider call was made and nothing was written.");
    println!(
        "dry run: the volume config was read without verifying its MAC (that needs the key); it names key {}.",
        cfg.key_id
    );
    match (&to_key, &to_key_file, &dest) {
        (Some(k), _, None) => println!("dry run: {k} is not an ARN; it would be resolved at the real run."),
        (None, Some(f), None) => println!("dry run: {} does not exist; the real run would create it.", f.display()),
        _ => {}
    }
    println!(
        "dry run: {} kmsfs files would be re-wrapped, {} already under the new key, {} other files (empty, or \
         kmsfs's own name and directory-ID files)",
        r.rewrapped, r.already, r.empty
    );
    Ok(0)
}

fn upgrade(cipherdir: &Path, key_file: Option<PathBuf>, kms_key: Option<String>) -> Result<u8, Failure> {
    key_outside(cipherdir, key_file.as_deref())?;
    let _lock = kmsfs::volume::lock(cipherdir, true).map_err(volume_failure)?;
    let mut cfg = load(cipherdir)?;
    if cfg.mac.is_some() {
        // Already authenticated: check it (which also records the pin), and
        // finish any directories still on unauthenticated ID records.
        let OpenVolume { config, provider, .. } = open_volume(cipherdir, key_file, kms_key)?;
        println!("{}: config already authenticated.", cipherdir.display());
        return upgrade_dirs(cipherdir, &config, provider.as_ref());
    }
    // Every config this kmsfs writes has a MAC, and this host records a pin
    // only for a config it checked or signed. So a legacy config for a
    // volume pinned here had its MAC stripped: signing it would accept
    // whatever was changed with it (names mode, key, name key).
    let store = kmsfs::trust::TrustStore::default_location();
    match store.get(&cfg.volume_id()) {
        Ok(None) => {}
        Ok(Some(pin)) => {
            return Err(Failure(
                exit::VOLUME,
                format!(
                    "{}: this host already trusts volume {} (key {}) and saw its config authenticated; this copy \
                     has no MAC, so it was modified: restore the config from a backup instead of upgrading it",
                    cipherdir.join(kmsfs::volume::CONFIG_NAME).display(),
                    cfg.volume_id,
                    pin.key_id
                ),
            ));
        }
        Err(e) => return Err(Failure(exit::VOLUME, format!("trust store: {e}"))),
    }
    let conf = cipherdir.join(kmsfs::volume::CONFIG_NAME);
    // Earlier keys came with authenticated configs: a legacy one listing
    // some was forged, to have them signed as trusted.
    if !cfg.previous_keys.is_empty() {
        return Err(Failure(
            exit::VOLUME,
            format!("{}: lists previous_keys but has no MAC, which no kmsfs writes: it was modified", conf.display()),
        ));
    }
    // The cipher dir cannot say which KMS key is the volume's (anyone with a
    // key of their own could write a config under it): the user names it.
    if cfg.provider == ProviderKind::AwsKms && kms_key.is_none() {
        return Err(Failure(
            exit::VOLUME,
            format!(
                "{}: the unauthenticated config names KMS key {}; if that is the volume's key, run upgrade again \
                 with --kms-key and its ARN",
                conf.display(),
                cfg.key_id.escape_debug()
            ),
        ));
    }
    let keys = KeyArgs { key_file, kms_key };
    let provider = cfg.provider_unchecked(&keys).map_err(volume_failure)?;
    provider.check().map_err(fail)?;
    if cfg.provider == ProviderKind::AwsKms {
        let arn = provider.key_id();
        if arn.starts_with("arn:") && cfg.key_id != arn {
            println!("Recording the key's ARN {arn} in place of {}.", cfg.key_id);
            cfg.key_id = arn;
        }
    }
    // The name key unwraps under this key, or the config is not this volume's.
    cfg.names(provider.as_ref()).map_err(volume_failure)?;
    println!(
        "Authenticating volume {}: provider {:?}, key {}, {} names, {}-byte blocks.",
        cfg.volume_id,
        cfg.provider,
        cfg.key_id,
        if cfg.plaintext_names { "plaintext" } else { "encrypted" },
        cfg.block_size
    );
    cfg.create_auth_key(provider.as_ref()).map_err(volume_failure)?;
    cfg.store(cipherdir).map_err(|e| Failure(exit::ERROR, e.to_string()))?;
    kmsfs::volume::pin(&cfg).map_err(volume_failure)?;
    println!("Done: the config is now authenticated, and this host trusts {}.", cfg.key_id);
    upgrade_dirs(cipherdir, &cfg, provider.as_ref())
}

/// Gives directories with legacy (unauthenticated) ID records bound ones.
fn upgrade_dirs(cipherdir: &Path, cfg: &VolumeConfig, provider: &dyn KeyProvider) -> Result<u8, Failure> {
    let names = cfg.names(provider).map_err(volume_failure)?;
    let r = kmsfs::offline::upgrade_dir_ids(cipherdir, &names).map_err(|e| Failure(exit::ERROR, e.to_string()))?;
    for (d, why) in &r.skipped {
        println!("SKIPPED {d}: {why}");
    }
    println!("{} directories given authenticated IDs ({} entries renamed).", r.upgraded.len(), r.renamed);
    Ok(if r.skipped.is_empty() { 0 } else { exit::ERROR })
}

struct MountPlan {
    fuse: fuser::Config,
    read_only: bool,
    writeback: bool,
    shared: bool,
    key_file: Option<PathBuf>,
    kms_key: Option<String>,
    nonempty: bool,
}

fn parse_options(m: &MountArgs) -> Result<MountPlan, Failure> {
    use fuser::MountOption as O;
    let mut opts = vec![
        O::FSName(std::fs::canonicalize(&m.cipherdir).unwrap_or(m.cipherdir.clone()).display().to_string()),
        O::Subtype("kmsfs".into()),
    ];
    let (mut read_only, mut writeback, mut key_file) = (false, true, m.key_file.clone());
    let mut kms_key = m.kms_key.clone();
    let mut shared = m.shared;
    let mut acl = fuser::SessionACL::Owner;
    let mut nonempty = false;
    for o in m.options.iter().filter(|o| !o.is_empty()) {
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
            s => return Err(Failure(exit::USAGE, format!("unknown mount option {s:?}"))),
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
    fuse.n_threads = Some(m.threads.max(1));
    fuse.clone_fd = true;
    Ok(MountPlan { fuse, read_only, writeback, shared, key_file, kms_key, nonempty })
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

/// Standard input can carry the key (`--key-file -`) or the data, not both.
fn stdin_once(input: &Path, key_file: Option<&Path>) -> Result<(), Failure> {
    if input == Path::new("-") && key_file == Some(Path::new("-")) {
        return Err(Failure(exit::USAGE, "standard input cannot carry both the key and the data".into()));
    }
    Ok(())
}

/// Environment variable naming the pipe that carries a `--key-file -` key
/// from the mount command to its daemon child.
const KEY_FD_ENV: &str = "KMSFS_KEY_FD";

/// A pipe holding `text`, whose read end (returned) a child inherits; the
/// write end is closed here, so the child reads the key and then EOF.
fn key_pipe(text: &[u8]) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsRawFd;
    let (r, w) = daemon::pipe()?;
    // SAFETY: fcntl(F_SETFD) takes integers only; `r` and `w` keep both
    // descriptors open across the calls.
    unsafe {
        if libc::fcntl(r.as_raw_fd(), libc::F_SETFD, 0) != 0
            || libc::fcntl(w.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    // A key is far below the pipe's capacity: this never blocks.
    std::fs::File::from(w).write_all(text)?;
    Ok(r)
}

/// In the daemon child: takes the key its parent passed through the pipe.
fn take_piped_key() -> Result<(), Failure> {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    let Some(fd) = std::env::var(KEY_FD_ENV).ok().and_then(|v| v.parse::<i32>().ok()) else { return Ok(()) };
    // SAFETY: this runs first in the daemon child, before it starts any thread,
    // so nothing reads the environment concurrently; the parent opened the
    // descriptor for this process alone and unsetting the variable makes the
    // File its only owner.
    let f = unsafe {
        std::env::remove_var(KEY_FD_ENV);
        std::fs::File::from_raw_fd(fd)
    };
    let mut text = zeroize::Zeroizing::new(Vec::with_capacity(80));
    f.take(256).read_to_end(&mut text).map_err(|e| Failure(exit::ERROR, format!("key pipe: {e}")))?;
    LocalProvider::set_stdin_key(text);
    Ok(())
}

fn mount(m: MountArgs) -> Result<u8, Failure> {
    let mut plan = parse_options(&m)?;
    let in_child = std::env::var_os(daemon::READY_FD_ENV).is_some();
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
            cfg.provider_unchecked(&KeyArgs { key_file: plan.key_file.clone(), kms_key: None })
                .map_err(volume_failure)?;
        }
        check_mountpoint(&m, plan.nonempty)?;
        let (r, w) = daemon::pipe().map_err(|e| Failure(exit::ERROR, e.to_string()))?;
        let exe = std::env::current_exe().map_err(|e| Failure(exit::ERROR, e.to_string()))?;
        use std::os::fd::AsRawFd;
        let mut args: Vec<std::ffi::OsString> = vec!["mount".into(), "--foreground".into()];
        args.extend(std::env::args_os().skip(1).filter(|a| a != "mount"));
        let mut cmd = std::process::Command::new(exe);
        // `--key-file -`: the key this parent read from standard input goes
        // to the daemon through a pipe, never through a file or argument.
        let key_fd = match LocalProvider::stdin_key_text() {
            Some(text) => Some(key_pipe(&text).map_err(|e| Failure(exit::ERROR, e.to_string()))?),
            None => None,
        };
        if let Some(fd) = &key_fd {
            cmd.env(KEY_FD_ENV, fd.as_raw_fd().to_string());
        }
        cmd.args(args)
            .env(daemon::READY_FD_ENV, w.as_raw_fd().to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let child = cmd.spawn().map_err(|e| Failure(exit::MOUNT, format!("cannot start the daemon: {e}")))?;
        drop(w);
        drop(key_fd);
        return match daemon::wait_ready(r) {
            Ok(()) => Ok(0),
            Err(msg) => {
                let _ = child.id();
                let (code, msg) = match msg.strip_prefix("exit=").and_then(|m| m.split_once(' ')) {
                    Some((c, m)) => (c.parse().unwrap_or(exit::MOUNT), m),
                    None => (exit::MOUNT, msg.as_str()),
                };
                Err(Failure(code, msg.trim_start_matches("kmsfs: ").to_string()))
            }
        };
    }
    let log = if in_child {
        take_piped_key()?;
        daemon::detach();
        init_logging(m.log_file.as_deref(), m.log_file.is_none())?
    } else {
        init_logging(m.log_file.as_deref(), false)?
    };
    daemon::harden_memory();
    daemon::raise_nofile();
    // SAFETY: umask takes an integer only and touches no memory (so backing
    // files get exactly the modes asked for).
    unsafe { libc::umask(0) };
    key_outside(&m.cipherdir, plan.key_file.as_deref())?;
    if !in_child {
        check_mountpoint(&m, plan.nonempty)?;
    }
    let OpenVolume { config: cfg, provider, legacy } =
        open_volume(&m.cipherdir, plan.key_file.clone(), plan.kms_key.clone())?;
    if legacy && !plan.read_only {
        // An unauthenticated config may be read, never written under.
        plan.read_only = true;
        plan.fuse.mount_options.push(fuser::MountOption::RO);
    }
    // Held for the daemon's life: rewrap refuses while any mount holds it.
    let _lock = kmsfs::volume::lock(&m.cipherdir, false).map_err(volume_failure)?;
    let layout = layout_of(&cfg)?;
    let max_age = Duration::from_secs(m.cache_max_age.max(1));
    // Branch mode re-checks its branch key with KMS once per max age.
    provider.set_max_age(max_age);
    provider.check().map_err(fail)?;
    let stats = Arc::new(KeyStats::default());
    let cache = Arc::new(KeyCache::new(provider.clone(), m.cache_size, max_age, stats.clone()));
    // Look-ahead only pays for a remote provider; local generation is ~1 us.
    // 64 keys at 16 in flight hide ~10 ms of KMS latency at 1,600 creates/s.
    // Branch mode wraps locally too, so it gets no pool either.
    let (target, workers) = if provider.name() == kmsfs::keys::aws_kms::PROVIDER_NAME { (64, 16) } else { (0, 0) };
    let pool = KeyPool::start(provider.clone(), cfg.volume_id(), target, workers, max_age, stats);
    let names = Arc::new(cfg.names(provider.as_ref()).map_err(fail)?);
    let fs = Arc::new(
        EncFs::new(
            &m.cipherdir,
            layout,
            cfg.volume_id(),
            cache.clone(),
            pool,
            names.clone(),
            FsOptions { read_only: plan.read_only },
        )
        .map_err(|e| Failure(exit::MOUNT, format!("{}: {e}", m.cipherdir.display())))?
        .with_shared(plan.shared),
    );
    let adapter = KmsFuse::new(
        fs.clone(),
        FuseOptions { writeback_cache: plan.writeback && !plan.read_only && !plan.shared, shared: plan.shared },
    );
    fs.integrity_log.set_mountpoint(&resolve_mountpoint(&m.mountpoint));
    let session = spawn_session(adapter, &m.mountpoint, &plan)
        .map_err(|e| Failure(exit::MOUNT, format!("cannot mount {}: {e}", m.mountpoint.display())))?;
    // The mount serves once a stat through it answers.
    let dev = std::fs::metadata(&m.mountpoint)
        .map_err(|e| Failure(exit::MOUNT, format!("mount does not answer: {e}")))?
        .dev();
    daemon::set_readahead(&m.mountpoint, 1024);
    tracing::info!("mounted {} at {}", m.cipherdir.display(), m.mountpoint.display());
    daemon::report_ready("ready");
    daemon::sd_notify("READY=1");
    let sweeper_cache = cache.clone();
    let _ = std::thread::Builder::new().name("kmsfs-sweep".into()).spawn(move || {
        loop {
            std::thread::sleep(Duration::from_secs(5));
            sweeper_cache.sweep();
        }
    });
    // The name key is unwrapped once per mount; re-check it every cache max
    // age so that disabling the KMS key stops listings and lookups within
    // one max age, as it does for file contents. Only a refusal blocks
    // names: an unreachable KMS does not take a working mount down.
    if let Some((ctx, wrapped)) = cfg.name_key.as_ref().and_then(|k| k.parts(cfg.volume_id())) {
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
    loop {
        match daemon::wait_signal(Duration::from_millis(500)) {
            Some(Sig::Stop) => {
                tracing::info!("signal received: writing back and unmounting");
                daemon::sd_notify("STOPPING=1");
                break;
            }
            Some(Sig::Stats) => tracing::info!("stats: {}", fs.stats_json()),
            Some(Sig::Reopen) => match &log {
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
                return Ok(0);
            }
            None => {}
        }
    }
    stop(session, &fs, &m.mountpoint, dev);
    Ok(0)
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

/// How `init` sets up a KMS volume's keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum KeyMode {
    /// One data key per file, each from KMS.
    PerFile,
    /// File keys wrapped locally under a KMS-wrapped volume branch key.
    Branch,
}

/// `rewrap` of a branch-mode volume: `--to-key` re-wraps only the volume
/// keys (name, config and branch keys: O(1) KMS calls, no file touched);
/// `--all-files` moves every file to the current branch version, locally.
fn rewrap_branch(
    cipherdir: &Path,
    mut cfg: VolumeConfig,
    source: Arc<dyn KeyProvider>,
    to_key: Option<String>,
    to_key_file: Option<PathBuf>,
    dry_run: bool,
    all_files: bool,
) -> Result<u8, Failure> {
    if !cfg.is_branch() {
        return Err(Failure(exit::USAGE, "--all-files applies to branch-mode volumes only".into()));
    }
    if to_key_file.is_some() {
        return Err(Failure(exit::USAGE, "a branch-mode volume needs a KMS key: use --to-key".into()));
    }
    if to_key.is_none() && !all_files {
        return Err(Failure(
            exit::USAGE,
            "rewrap of a branch-mode volume needs --to-key (re-wraps the branch keys) and/or --all-files".into(),
        ));
    }
    if all_files {
        let names = cfg.names(source.as_ref()).map_err(|e| Failure(exit::KEY, e.to_string()))?;
        let r = kmsfs::offline::rewrap(
            cipherdir,
            layout_of(&cfg)?,
            source.as_ref(),
            source.as_ref(),
            &names,
            progress("rewrap"),
        )
        .map_err(|e| Failure(exit::ERROR, e.to_string()))?;
        for (p, e) in &r.failed {
            println!("FAILED {p}: {e}");
        }
        println!(
            "{}{} moved to {}, {} already there, {} empty, {} failed",
            if dry_run { "dry run: " } else { "" },
            r.rewrapped,
            source.key_id(),
            r.already,
            r.empty,
            r.failed.len()
        );
        if !r.failed.is_empty() {
            return Ok(exit::ERROR);
        }
    }
    let Some(k) = to_key else { return Ok(0) };
    let dest = kmsfs::keys::open_aws_kms(&k, &[]).map_err(|e| Failure(exit::KEY, e.to_string()))?;
    dest.check().map_err(|e| Failure(exit::KEY, e.to_string()))?;
    let arn = dest.key_id();
    // ReEncrypt names the source key: only the keys this volume trusts.
    dest.trust_also(&[vec![cfg.key_id.clone()], cfg.previous_keys.clone()].concat());
    let auth = cfg.unwrap_auth_key(source.as_ref()).map_err(volume_failure)?;
    let vid = cfg.volume_id();
    let move_key = |sk: &kmsfs::volume::StoredKey, what: &str| -> Result<kmsfs::volume::StoredKey, Failure> {
        let (ctx, w) = sk.parts(vid).ok_or(Failure(exit::VOLUME, format!("malformed {what}")))?;
        let nw = dest.rewrap(&w, &ctx).map_err(|e| Failure(exit::KEY, format!("{what}: {e}")))?;
        Ok(kmsfs::volume::StoredKey::from_wrapped(&ctx, &nw))
    };
    let name_key = cfg.name_key.as_ref().map(|sk| move_key(sk, "name key")).transpose()?;
    let auth_key = cfg.auth_key.as_ref().map(|sk| move_key(sk, "config key")).transpose()?;
    let mut branch_keys = cfg.branch_keys.clone();
    for b in &mut branch_keys {
        b.key = move_key(&b.key, &format!("branch key version {}", b.version))?;
    }
    let n = branch_keys.len() + usize::from(name_key.is_some()) + usize::from(auth_key.is_some());
    if dry_run {
        println!("dry run: would re-wrap {n} volume keys under {arn}; no file changes");
        return Ok(0);
    }
    // One atomic config write: every volume key moves at once, and no file
    // key was ever wrapped under the old key, so nothing needs it afterwards.
    cfg.name_key = name_key;
    cfg.auth_key = auth_key;
    cfg.branch_keys = branch_keys;
    cfg.key_id = arn;
    cfg.previous_keys.clear();
    cfg.sign(&auth).map_err(volume_failure)?;
    cfg.store(cipherdir).map_err(|e| Failure(exit::ERROR, e.to_string()))?;
    kmsfs::volume::pin(&cfg).map_err(volume_failure)?;
    println!("Re-wrapped {n} volume keys; the volume now uses {} (no file was touched).", cfg.key_id);
    Ok(0)
}

/// `rotate-branch`: a new branch version for new files; old ones stay.
fn rotate_branch(cipherdir: &Path, kms_key: Option<String>) -> Result<u8, Failure> {
    let _lock = kmsfs::volume::lock(cipherdir, true).map_err(volume_failure)?;
    let OpenVolume { config: mut cfg, provider, .. } = open_volume(cipherdir, None, kms_key)?;
    if !cfg.is_branch() {
        return Err(Failure(exit::USAGE, "rotate-branch applies to branch-mode volumes only".into()));
    }
    let auth = cfg.unwrap_auth_key(provider.as_ref()).map_err(volume_failure)?;
    let v = cfg.create_branch_key(provider.as_ref()).map_err(volume_failure)?;
    cfg.sign(&auth).map_err(volume_failure)?;
    cfg.store(cipherdir).map_err(|e| Failure(exit::ERROR, e.to_string()))?;
    println!(
        "New files now use branch key version {v}; {} older version(s) kept. \
         `kmsfs rewrap {} --all-files` moves existing files to it.",
        cfg.branch_keys.len() - 1,
        cipherdir.display()
    );
    Ok(0)
}
