//! Commands on single files: inspect, encrypt, decrypt, and path (a
//! plaintext path to its backing path and back).

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kmsfs::format::layout::Layout;
use kmsfs::keys::KeyProvider;
use kmsfs::keys::local::LocalProvider;
use kmsfs::volume::OpenVolume;

use super::{Failure, exit, fail, key_outside, layout_of, open_volume};

/// `kmsfs inspect`: a backing file's header, no key needed.
pub(super) fn inspect(file: PathBuf, json: bool) -> Result<u8, Failure> {
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

/// `kmsfs encrypt`: one file (or standard input) into the per-file format.
pub(super) fn encrypt(
    volume: Option<PathBuf>,
    kms_key: Option<String>,
    key_file: Option<PathBuf>,
    input: PathBuf,
    output: PathBuf,
) -> Result<u8, Failure> {
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
        let l = Layout::new(kmsfs::volume::LOCAL_HEADER_SIZE, 12).ok_or(Failure(exit::ERROR, "layout".into()))?;
        (Arc::new(p), l, kmsfs::format::random_id().map_err(|e| Failure(exit::ERROR, e.to_string()))?)
    } else {
        return Err(Failure(exit::USAGE, "encrypt needs --volume, --kms-key or --key-file".into()));
    };
    let mut i = byte_progress("encrypt", &input, open_in(&input)?);
    let mut o = open_out(&output)?;
    kmsfs::offline::encrypt_stream(&mut i, &mut o, layout, vid, provider.as_ref()).map_err(fail)?;
    Ok(0)
}

/// `kmsfs decrypt`: one encrypted file (or standard input) to plaintext.
pub(super) fn decrypt(
    volume: Option<PathBuf>,
    key_file: Option<PathBuf>,
    kms_key: Option<String>,
    trust_header_key: bool,
    input: PathBuf,
    output: PathBuf,
) -> Result<u8, Failure> {
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
        i.read_exact(&mut prefix).map_err(|e| Failure(exit::VOLUME, format!("input: not a kmsfs file ({e})")))?;
        if prefix[..4] != kmsfs::format::MAGIC {
            return Err(Failure(exit::VOLUME, "input: not a kmsfs file (bad magic)".into()));
        }
        let hs = kmsfs::format::header::declared_size(&prefix).unwrap_or(0);
        prefix.resize(hs.max(8), 0);
        i.read_exact(&mut prefix[8..]).map_err(|e| Failure(exit::DAMAGED, format!("input: {e}")))?;
        let h = kmsfs::offline::peek_header(&prefix).map_err(|e| Failure(exit::DAMAGED, format!("input: {e}")))?;
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

/// `kmsfs path`: a plaintext path to its backing path, or back.
pub(super) fn path(
    cipherdir: PathBuf,
    path: PathBuf,
    reverse: bool,
    key_file: Option<PathBuf>,
    kms_key: Option<String>,
) -> Result<u8, Failure> {
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

/// Standard input can carry the key (`--key-file -`) or the data, not both.
fn stdin_once(input: &Path, key_file: Option<&Path>) -> Result<(), Failure> {
    if input == Path::new("-") && key_file == Some(Path::new("-")) {
        return Err(Failure(exit::USAGE, "standard input cannot carry both the key and the data".into()));
    }
    Ok(())
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
