//! Dispatch: each command to the function of its family.

use super::args::{Cli, Cmd};
use super::{Failure, exit, files, man, mount, volume};

/// Runs one parsed command; its exit code, or the failure to report.
pub(super) fn run(cmd: Cmd) -> Result<u8, Failure> {
    match cmd {
        Cmd::Init { cipherdir, kms_key, key_file, block_size, plaintext_names, key_mode } => {
            volume::init(&cipherdir, kms_key, key_file, block_size, plaintext_names, key_mode)
        }
        Cmd::Mount(m) => mount::mount(m),
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "kmsfs", &mut std::io::stdout());
            Ok(0)
        }
        Cmd::Manpage => {
            man::manpage(&mut std::io::stdout().lock()).map_err(|e| Failure(exit::ERROR, e.to_string()))?;
            Ok(0)
        }
        Cmd::Unmount { mountpoint } => mount::unmount(&mountpoint),
        Cmd::Inspect { file, json } => files::inspect(file, json),
        Cmd::Encrypt { volume, kms_key, key_file, input, output } => {
            files::encrypt(volume, kms_key, key_file, input, output)
        }
        Cmd::Decrypt { volume, key_file, kms_key, trust_header_key, input, output } => {
            files::decrypt(volume, key_file, kms_key, trust_header_key, input, output)
        }
        Cmd::Path { cipherdir, path, reverse, key_file, kms_key } => {
            files::path(cipherdir, path, reverse, key_file, kms_key)
        }
        Cmd::Fsck { cipherdir, key_file, kms_key, json, repair } => {
            volume::fsck(cipherdir, key_file, kms_key, json, repair)
        }
        Cmd::Rewrap { cipherdir, to_key, to_key_file, key_file, kms_key, dry_run, all_files } => {
            volume::rewrap(&cipherdir, to_key, to_key_file, key_file, kms_key, dry_run, all_files)
        }
        Cmd::RotateBranch { cipherdir, kms_key } => volume::rotate_branch(&cipherdir, kms_key),
        Cmd::Upgrade { cipherdir, key_file, kms_key } => volume::upgrade(&cipherdir, key_file, kms_key),
        Cmd::Info { cipherdir, json, verify, key_file, kms_key } => {
            volume::info(&cipherdir, json, verify, key_file, kms_key)
        }
        Cmd::Stats { mountpoint, json, format } => mount::stats(mountpoint, json, format),
    }
}
