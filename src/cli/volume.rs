//! Commands on a whole volume: init, fsck, rewrap, rotate-branch,
//! upgrade and info.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use kmsfs::keys::KeyProvider;
use kmsfs::keys::local::LocalProvider;
use kmsfs::offline::{InitOptions, Locked, UpgradeStart};
use kmsfs::volume::{KeyArgs, OpenVolume};

use super::args::KeyMode;
use super::{Failure, exit, fail, key_outside, layout_of, load, open_volume};

/// `kmsfs init`: a new volume in an empty cipher dir.
pub(super) fn init(
    cipherdir: &Path,
    kms_key: Option<String>,
    key_file: Option<PathBuf>,
    block_size: u32,
    plaintext_names: bool,
    key_mode: KeyMode,
) -> Result<u8, Failure> {
    let o = InitOptions { kms_key, key_file, block_size, plaintext_names, branch: key_mode == KeyMode::Branch };
    let v = kmsfs::offline::init_prepare(cipherdir, &o).map_err(fail)?;
    if let Some(k) = &v.created_key_file {
        eprintln!("Created key file {} (mode 0600). Back it up: without it the data cannot be decrypted.", k.display());
    }
    let cfg = kmsfs::offline::init_finish(cipherdir, v, &o).map_err(fail)?;
    eprintln!(
        "Initialized kmsfs volume {} in {} ({:?} provider, {} byte blocks)",
        cfg.volume_id,
        cipherdir.display(),
        cfg.provider,
        cfg.block_size
    );
    Ok(0)
}

/// `kmsfs fsck`: verifies every header and block; with `repair`, fixes
/// what a crash leaves. Exit 6 when anything is damaged or foreign.
pub(super) fn fsck(
    cipherdir: PathBuf,
    key_file: Option<PathBuf>,
    kms_key: Option<String>,
    json: bool,
    repair: bool,
) -> Result<u8, Failure> {
    key_outside(&cipherdir, key_file.as_deref())?;
    // A repair changes files: never under a live mount, here or on
    // another host (-o shared). A check only reads.
    let _lock = match repair {
        true => Some(kmsfs::volume::lock(&cipherdir, true).map_err(fail)?),
        false => None,
    };
    let OpenVolume { config: cfg, provider: p, legacy } = open_volume(&cipherdir, key_file, kms_key)?;
    if legacy && repair {
        return Err(fail(kmsfs::offline::legacy_error(&cipherdir)));
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
            let blocks = if d.bad_blocks.is_empty() { String::new() } else { format!(" (blocks {:?})", d.bad_blocks) };
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
            println!("ZEROED  {p}: {} all-zero block(s) read as holes, first {:?}", z.len(), &z[..z.len().min(5)]);
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

/// `kmsfs rewrap`: every file's data key under a new key (manual rotation).
pub(super) fn rewrap(
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
    let vol = kmsfs::offline::open_locked(cipherdir, &KeyArgs { key_file, kms_key }, true).map_err(fail)?;
    if vol.config.is_branch() || all_files {
        return rewrap_branch(cipherdir, vol, to_key, to_key_file, dry_run, all_files);
    }
    let plan = kmsfs::offline::rekey_prepare(cipherdir, vol, to_key, to_key_file).map_err(fail)?;
    let r =
        kmsfs::offline::rewrap(cipherdir, plan.layout(), plan.source(), plan.dest(), plan.names(), progress("rewrap"))
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
    let cfg = kmsfs::offline::rekey_finish(cipherdir, plan).map_err(fail)?;
    println!("Volume now uses {} for new files.", cfg.key_id);
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

/// `rewrap` of a branch-mode volume: `--to-key` re-wraps only the volume
/// keys (name, config and branch keys: O(1) KMS calls, no file touched);
/// `--all-files` moves every file to the current branch version, locally.
fn rewrap_branch(
    cipherdir: &Path,
    mut vol: Locked,
    to_key: Option<String>,
    to_key_file: Option<PathBuf>,
    dry_run: bool,
    all_files: bool,
) -> Result<u8, Failure> {
    kmsfs::offline::branch_request(&vol.config, to_key.as_deref(), to_key_file.as_deref(), all_files).map_err(fail)?;
    if all_files {
        let source = vol.provider.as_ref();
        let names = vol.config.names(source).map_err(|e| Failure(exit::KEY, e.to_string()))?;
        let r = kmsfs::offline::rewrap(cipherdir, layout_of(&vol.config)?, source, source, &names, progress("rewrap"))
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
    let done = kmsfs::offline::rekey_branch(cipherdir, &mut vol, &k, dry_run).map_err(fail)?;
    if dry_run {
        println!("dry run: would re-wrap {} volume keys under {}; no file changes", done.keys, done.key_id);
        return Ok(0);
    }
    println!("Re-wrapped {} volume keys; the volume now uses {} (no file was touched).", done.keys, done.key_id);
    Ok(0)
}

/// `kmsfs rotate-branch`: a new branch version for new files; old ones stay.
pub(super) fn rotate_branch(cipherdir: &Path, kms_key: Option<String>) -> Result<u8, Failure> {
    let mut vol = kmsfs::offline::open_locked(cipherdir, &KeyArgs { key_file: None, kms_key }, false).map_err(fail)?;
    let v = kmsfs::offline::rotate_branch(cipherdir, &mut vol).map_err(fail)?;
    println!(
        "New files now use branch key version {v}; {} older version(s) kept. \
         `kmsfs rewrap {} --all-files` moves existing files to it.",
        vol.config.branch_keys.len() - 1,
        cipherdir.display()
    );
    Ok(0)
}

/// `kmsfs upgrade`: authenticates a legacy config (once, on a trusted
/// host), then gives legacy directory IDs authenticated records.
pub(super) fn upgrade(cipherdir: &Path, key_file: Option<PathBuf>, kms_key: Option<String>) -> Result<u8, Failure> {
    key_outside(cipherdir, key_file.as_deref())?;
    let vol = match kmsfs::offline::upgrade_start(cipherdir, KeyArgs { key_file, kms_key }).map_err(fail)? {
        UpgradeStart::Authenticated(vol) => {
            println!("{}: config already authenticated.", cipherdir.display());
            vol
        }
        UpgradeStart::Legacy(u) => {
            let cfg = u.config();
            if let Some(old) = &u.arn_replaced {
                println!("Recording the key's ARN {} in place of {old}.", cfg.key_id);
            }
            println!(
                "Authenticating volume {}: provider {:?}, key {}, {} names, {}-byte blocks.",
                cfg.volume_id,
                cfg.provider,
                cfg.key_id,
                if cfg.plaintext_names { "plaintext" } else { "encrypted" },
                cfg.block_size
            );
            let vol = kmsfs::offline::upgrade_authenticate(cipherdir, u).map_err(fail)?;
            println!("Done: the config is now authenticated, and this host trusts {}.", vol.config.key_id);
            vol
        }
    };
    let r = kmsfs::offline::upgrade_dirs(cipherdir, &vol).map_err(fail)?;
    for (d, why) in &r.skipped {
        println!("SKIPPED {d}: {why}");
    }
    println!("{} directories given authenticated IDs ({} entries renamed).", r.upgraded.len(), r.renamed);
    // File contents: every v1 file becomes v2 (docs/FORMAT.md); a run that
    // stops is finished by the next, which skips the files already done.
    let f = kmsfs::offline::upgrade_contents(cipherdir, &vol, progress("upgrade")).map_err(fail)?;
    for (path, why) in &f.skipped {
        println!("SKIPPED {path}: {why}");
    }
    println!(
        "{} files rewritten in format v2, {} already current, {} skipped.",
        f.upgraded,
        f.current,
        f.skipped.len()
    );
    Ok(if r.skipped.is_empty() && f.skipped.is_empty() { 0 } else { exit::ERROR })
}

/// `kmsfs info`: what the config says and what this host trusts.
pub(super) fn info(
    cipherdir: &Path,
    json: bool,
    verify: bool,
    key_file: Option<PathBuf>,
    kms_key: Option<String>,
) -> Result<u8, Failure> {
    if verify {
        key_outside(cipherdir, key_file.as_deref())?;
    }
    let i = kmsfs::offline::describe(cipherdir, verify, &KeyArgs { key_file, kms_key }).map_err(fail)?;
    let (cfg, v) = (&i.config, &i.json);
    let text = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    let (provider, authenticated, trust) = (text("provider"), text("authenticated"), text("trust"));
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
