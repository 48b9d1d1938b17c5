//! fsck: every header and block of a volume verified, and with `repair`,
//! torn tails cut and stale last blocks re-sealed.

use std::path::Path;

use super::{DirProblems, Entry, OpError, Progress, open_backing, par_map, sizes, walk};
use crate::file::{EncryptedFile, FileError, VerifyReport};
use crate::format::Id;
use crate::format::layout::Layout;
use crate::keys::{KeyContext, KeyError, KeyProvider};
use crate::names::Names;

/// One damaged file in an fsck report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Damage {
    /// Path relative to the cipher dir (names are plaintext in this version).
    pub path: String,
    /// What is wrong.
    pub error: String,
    /// Blocks failing authentication.
    pub bad_blocks: Vec<u64>,
}

/// One file that `fsck --repair` changed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Repaired {
    /// Plaintext path.
    pub path: String,
    /// Bytes cut from the end of the backing file.
    pub cut_bytes: u64,
    /// Stored blocks (whole or torn) among them.
    pub cut_blocks: u64,
    /// Blocks re-sealed in place (the new last block, stale last blocks).
    pub resealed: Vec<u64>,
}

/// What is wrong with a file, from its verify report; `None` if nothing.
fn damage_of(v: &VerifyReport, blocks: u64) -> Option<String> {
    if v.bad_size && blocks == 0 {
        Some(format!("torn tail: a header and {} bytes, no whole block (fsck --repair empties the file)", v.torn_bytes))
    } else if v.bad_size {
        Some(format!("torn tail: {} bytes past the last whole block (fsck --repair cuts them)", v.torn_bytes))
    } else if v.bad_blocks.last().is_some_and(|&b| b + 1 == blocks) {
        Some(
            "the last block fails authentication: a torn write or a cut file (fsck --repair cuts back to the \
             last authentic block)"
                .into(),
        )
    } else if !v.bad_blocks.is_empty() {
        Some("blocks failed authentication".into())
    } else {
        None
    }
}

/// fsck results.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct FsckReport {
    /// Files checked.
    pub files: u64,
    /// Blocks checked.
    pub blocks: u64,
    /// Damaged files.
    pub damaged: Vec<Damage>,
    /// Files with all-zero (hole) blocks: path and block indexes.
    pub zeroed: Vec<(String, Vec<u64>)>,
    /// Files wrapped under a key this volume does not trust: path and the
    /// key their header names (never sent to KMS).
    pub foreign: Vec<(String, String)>,
    /// Files with stale last blocks, which an interrupted append or
    /// truncation leaves (they read as their data followed by zeros): path
    /// and block indexes.
    pub stale: Vec<(String, Vec<u64>)>,
    /// Files that `repair` changed.
    pub repaired: Vec<Repaired>,
    /// Directory and name problems (encrypted names).
    pub dirs: DirProblems,
}

/// What fsck found in one file.
#[derive(Default)]
struct FileCheck {
    blocks: u64,
    damage: Option<(String, Vec<u64>)>,
    zeroed: Vec<u64>,
    stale: Vec<u64>,
    foreign: Option<String>,
    repaired: Option<Repaired>,
}

/// Verifies one file's header and blocks; with `repair`, also cuts a torn
/// tail back to the last authentic block and re-seals stale last blocks
/// (`EncryptedFile::repair`).
fn check_file(
    cipherdir: &Path,
    e: &Entry,
    layout: Layout,
    volume_id: Id,
    provider: &dyn KeyProvider,
    repair: bool,
) -> FileCheck {
    let mut c = FileCheck::default();
    let damage = |error: String, bad: Vec<u64>| FileCheck { damage: Some((error, bad)), ..Default::default() };
    // Through the walked directory, never following a link that was
    // swapped in since the walk.
    let f = match open_backing(cipherdir, e, repair) {
        Ok(f) => f,
        Err(e) => return damage(e.to_string(), vec![]),
    };
    let mut enc = match EncryptedFile::open(f, layout, volume_id) {
        Ok(e) => e,
        Err(e) => return damage(e.to_string(), vec![]),
    };
    let Some(h) = enc.header() else { return c };
    let ctx = KeyContext::file(h.volume_id, h.file_id);
    let key = match provider.unwrap(&h.wrapped, &ctx) {
        Ok(k) => k,
        Err(KeyError::Untrusted { found }) => return FileCheck { foreign: Some(found), ..Default::default() },
        Err(e) => return damage(format!("header: {e}"), vec![]),
    };
    let mut v = match enc.verify(&key) {
        Ok(v) => v,
        Err(FileError::Header(e)) => return damage(format!("header: {e}"), vec![]),
        Err(e) => return damage(e.to_string(), vec![]),
    };
    let mut not_repaired = None;
    let tail_bad = v.bad_blocks.last().is_some_and(|&b| b + 1 == layout.block_count(enc.size()));
    if repair && (v.bad_size || tail_bad || !v.stale_blocks.is_empty()) {
        match enc.repair(&key, &v) {
            Ok(done) => {
                c.repaired = Some(Repaired {
                    path: e.plain.clone(),
                    cut_bytes: done.cut_bytes,
                    cut_blocks: done.cut_blocks,
                    resealed: done.resealed,
                });
                v = match enc.verify(&key) {
                    Ok(v) => v,
                    Err(err) => return FileCheck { damage: Some((err.to_string(), vec![])), ..c },
                };
            }
            Err(err) => not_repaired = Some(err.to_string()),
        }
    }
    c.blocks = layout.block_count(enc.size());
    if let Some(what) = damage_of(&v, c.blocks) {
        let what = match not_repaired {
            Some(why) => format!("{what}; not repaired: {why}"),
            None => what,
        };
        c.damage = Some((what, v.bad_blocks));
    }
    c.zeroed = v.zero_blocks;
    c.stale = v.stale_blocks;
    c
}

/// Verifies every header and every block of every file, `PARALLEL_FILES`
/// files at a time.
pub fn fsck(
    cipherdir: &Path,
    layout: Layout,
    volume_id: Id,
    provider: &dyn KeyProvider,
    names: &Names,
    repair: bool,
    mut progress: impl FnMut(Progress),
) -> Result<FsckReport, OpError> {
    let (files, dirs) = walk(cipherdir, names, repair)?;
    let mut r = FsckReport { dirs, ..Default::default() };
    let sizes = sizes(&files);
    let mut pr = Progress { files_total: files.len() as u64, bytes_total: sizes.iter().sum(), ..Default::default() };
    progress(pr);
    let checks = par_map(
        &files,
        |e| check_file(cipherdir, e, layout, volume_id, provider, repair),
        |i, _| {
            pr.files += 1;
            pr.bytes += sizes[i];
            progress(pr);
        },
    );
    for (e, c) in files.into_iter().zip(checks) {
        r.files += 1;
        r.blocks += c.blocks;
        if let Some(found) = c.foreign {
            r.foreign.push((e.plain, found));
            continue;
        }
        if let Some(x) = c.repaired {
            r.repaired.push(x);
        }
        if !c.stale.is_empty() {
            r.stale.push((e.plain.clone(), c.stale));
        }
        if let Some((error, bad_blocks)) = c.damage {
            r.damaged.push(Damage { path: e.plain.clone(), error, bad_blocks });
        }
        if !c.zeroed.is_empty() {
            r.zeroed.push((e.plain, c.zeroed));
        }
    }
    Ok(r)
}

#[cfg(test)]
mod par_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::keys::local::LocalProvider;
    use crate::keys::{DataKey, WrappedKey};
    use crate::offline::{PARALLEL_FILES, encrypt_stream};
    use std::fs::File;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Delegates to a local provider, counting the unwraps in flight.
    struct Slow {
        inner: LocalProvider,
        now: AtomicUsize,
        max: AtomicUsize,
    }

    impl KeyProvider for Slow {
        fn name(&self) -> &'static str {
            self.inner.name()
        }
        fn key_id(&self) -> String {
            self.inner.key_id()
        }
        fn generate(&self, ctx: &KeyContext) -> Result<(DataKey, WrappedKey), KeyError> {
            self.inner.generate(ctx)
        }
        fn wrap(&self, key: &DataKey, ctx: &KeyContext) -> Result<WrappedKey, KeyError> {
            self.inner.wrap(key, ctx)
        }
        fn unwrap(&self, wrapped: &WrappedKey, ctx: &KeyContext) -> Result<DataKey, KeyError> {
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.max.fetch_max(n, Ordering::SeqCst);
            // Long enough that the workers overlap, as KMS calls do.
            std::thread::sleep(std::time::Duration::from_millis(30));
            self.now.fetch_sub(1, Ordering::SeqCst);
            self.inner.unwrap(wrapped, ctx)
        }
        fn rewrap(&self, wrapped: &WrappedKey, ctx: &KeyContext) -> Result<WrappedKey, KeyError> {
            self.inner.rewrap(wrapped, ctx)
        }
        fn check(&self) -> Result<(), KeyError> {
            self.inner.check()
        }
    }

    #[test]
    fn fsck_keeps_parallel_files_unwraps_in_flight_and_reports_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let cipher = tmp.path().join("c");
        std::fs::create_dir(&cipher).unwrap();
        let p = Slow {
            inner: LocalProvider::create_key_file(&tmp.path().join("k")).unwrap(),
            now: AtomicUsize::new(0),
            max: AtomicUsize::new(0),
        };
        let layout = Layout::new(crate::volume::LOCAL_HEADER_SIZE, 12).unwrap();
        let vid = crate::format::random_id().unwrap();
        let n = 3 * PARALLEL_FILES;
        for i in 0..n {
            let mut out = File::create(cipher.join(format!("f{i:03}"))).unwrap();
            encrypt_stream(&mut &vec![i as u8; 5000 + i][..], &mut out, layout, vid, &p.inner).unwrap();
        }
        // Damage one file in the middle: the report names it, in order.
        let victim = cipher.join("f020");
        let mut b = std::fs::read(&victim).unwrap();
        let last = b.len() - 1;
        b[last] ^= 1;
        std::fs::write(&victim, b).unwrap();
        let mut seen = Vec::new();
        let r = fsck(&cipher, layout, vid, &p, &crate::names::Names::plaintext(), false, |pr| seen.push(pr)).unwrap();
        assert_eq!(r.files, n as u64);
        assert_eq!(r.damaged.len(), 1);
        assert_eq!(r.damaged[0].path, "/f020");
        assert_eq!(p.max.load(Ordering::SeqCst), PARALLEL_FILES, "unwraps in flight");
        let end = seen.last().unwrap();
        assert_eq!((end.files, end.files_total), (n as u64, n as u64));
        assert_eq!(end.bytes, end.bytes_total);
        assert!(end.bytes_total > (n * 5000) as u64);
    }
}
