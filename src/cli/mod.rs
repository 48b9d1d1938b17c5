//! The `kmsfs` command line: parses arguments, calls the library and
//! prints. Exit codes come from one map, `exit::Code`. Rooms by command
//! family: `args` (the grammar), `files` (encrypt, decrypt, inspect, path),
//! `volume` (init, fsck, rewrap, rotate-branch, upgrade, info), `mount`
//! (mount, unmount, stats), `man` (the man page), `run` (dispatch).

mod args;
mod exit;
mod files;
mod man;
mod mount;
mod run;
mod volume;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use kmsfs::daemon;
use kmsfs::format::layout::Layout;
use kmsfs::volume::{KeyArgs, OpenVolume, VolumeConfig};

use args::{Cli, Cmd};

/// A failed command: its exit code and message.
struct Failure(u8, String);

impl<E: std::fmt::Display> From<(u8, E)> for Failure {
    fn from((c, e): (u8, E)) -> Self {
        Failure(c, e.to_string())
    }
}

/// Turns any error into its exit code and message (see `exit::Code`).
fn fail<E: exit::Code>(e: E) -> Failure {
    Failure(e.exit_code(), e.to_string())
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

/// Runs the command line; the binary's `main`.
pub fn main() -> ExitCode {
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
        if let Some(v) = val
            && let Err(e) = kmsfs::sys::set_env(var, v.as_ref())
        {
            eprintln!("kmsfs: cannot set {var}: {e}");
            return ExitCode::from(exit::ERROR);
        }
    }
    if let Cmd::Mount(_) = &cli.cmd {
        // Before any thread exists, so only the main thread sees signals.
        daemon::block_signals();
    } else {
        let _ = init_logging(None, false);
    }
    match run::run(cli.cmd) {
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

/// Reads a volume config without verifying it.
fn load(cipherdir: &Path) -> Result<VolumeConfig, Failure> {
    kmsfs::offline::load(cipherdir).map_err(fail)
}

/// Opens a volume through its trust anchor (see `volume::open`).
fn open_volume(cipherdir: &Path, key_file: Option<PathBuf>, kms_key: Option<String>) -> Result<OpenVolume, Failure> {
    kmsfs::volume::open(cipherdir, &KeyArgs { key_file, kms_key }).map_err(fail)
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

/// The volume's block layout.
fn layout_of(cfg: &VolumeConfig) -> Result<Layout, Failure> {
    kmsfs::offline::layout_of(cfg).map_err(fail)
}
