//! Every step of every multi-step update, failed or crashed: data that
//! was there before stays readable (docs/FORMAT.md, "Interrupted updates").

use super::fault::{self, Fault};
use super::*;
use crate::keys::KeyProvider;
use crate::keys::local::LocalProvider;

const B: u64 = 4096;
const VOL: Id = [3; 16];

struct Fx {
    dir: tempfile::TempDir,
    key: FreshKey,
}

impl Fx {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let p = LocalProvider::create_key_file(&dir.path().join("k")).unwrap();
        let file_id = crate::format::random_id().unwrap();
        let (key, wrapped) = p.generate(&KeyContext::file(VOL, file_id)).unwrap();
        Self { dir, key: FreshKey { file_id, key, wrapped } }
    }
    fn open(&self) -> EncryptedFile {
        let path = self.dir.path().join("f");
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).unwrap();
        EncryptedFile::open(f, Layout::new(256, 12).unwrap(), VOL).unwrap()
    }
    /// A fresh file holding `data`.
    fn file(&self, data: &[u8]) -> EncryptedFile {
        let _ = std::fs::remove_file(self.dir.path().join("f"));
        let mut f = self.open();
        if !data.is_empty() {
            f.write_at(KeyArg::Fresh(&self.key), 0, data).unwrap();
        }
        f
    }
    fn arg(&self, f: &EncryptedFile) -> KeyArg<'_> {
        if f.header().is_some() { KeyArg::Existing(&self.key.key) } else { KeyArg::Fresh(&self.key) }
    }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) | 1).collect()
}

#[derive(Clone, Debug)]
enum Op {
    Write(u64, usize),
    SetLen(u64),
}

impl Op {
    fn apply(&self, fx: &Fx, f: &mut EncryptedFile) -> Result<(), FileError> {
        match *self {
            Op::Write(off, n) => f.write_at(fx.arg(f), off, &pattern(n, 0x40)),
            Op::SetLen(n) => f.set_len(Some(fx.arg(f)), n),
        }
    }
    fn model(&self, old: &[u8]) -> Vec<u8> {
        let mut m = old.to_vec();
        match *self {
            Op::Write(off, n) => {
                let end = off as usize + n;
                if m.len() < end {
                    m.resize(end, 0);
                }
                m[off as usize..end].copy_from_slice(&pattern(n, 0x40));
            }
            Op::SetLen(n) => m.resize(n as usize, 0),
        }
        m
    }
    fn grows(&self, old: usize) -> bool {
        match *self {
            Op::Write(off, n) => off as usize + n > old,
            Op::SetLen(n) => n as usize != old,
        }
    }
}

/// The updates to attack, from each starting size.
fn ops(size: u64) -> Vec<Op> {
    let mut v = vec![
        Op::Write(size, 1),
        Op::Write(size, 50),
        Op::Write(size, 10_000),
        Op::Write(size + 20_000, 100),
        Op::Write(size.saturating_sub(50), 9_000),
        Op::Write(size.saturating_sub(50), 50),
        Op::Write(size.saturating_sub(B + 10), B as usize + 100),
        Op::Write(0, 3),
        Op::SetLen(size + 10),
        Op::SetLen(size + 30_000),
    ];
    for cut in [1, 10, B, 5_000] {
        if size > cut {
            v.push(Op::SetLen(size - cut));
        }
    }
    v
}

/// The faults to inject into `op` on a file of `old` bytes. A write that
/// fails part way (ENOSPC) stops where the file needs new space: past
/// its old end, or inside its old last block when that grows in place,
/// never inside blocks already allocated before it.
fn faults(op: &Op, old: usize) -> Vec<Fault> {
    let mut v = vec![Fault::Fail, Fault::Crash];
    if !op.grows(old) {
        return v;
    }
    let first = match *op {
        Op::Write(off, _) => off / B,
        Op::SetLen(n) => n.saturating_sub(1) / B,
    };
    let old_last = (old as u64).saturating_sub(1) / B;
    for n in [1, 100, 3_000, 4_124, 4_200, 9_000] {
        if first >= old_last || old == 0 {
            v.push(Fault::FailAfter(n));
        }
        v.push(Fault::CrashAfter(n));
    }
    v
}

/// Reads each block on its own; `None` for a block that fails.
fn blocks(fx: &Fx) -> (u64, Vec<Option<Vec<u8>>>) {
    let f = fx.open();
    let n = f.size().div_ceil(B);
    let key = f.header().map(|_| &fx.key.key);
    (f.size(), (0..n).map(|i| f.read_at(key, i * B, B as usize).ok()).collect())
}

/// After a crash: every byte below both the old and the new size is the
/// old or the new value (the same outside the update), in a block that
/// reads, unless it is the one block rewritten in place by a torn write;
/// bytes past either size may also be zeros.
fn check_after_crash(fx: &Fx, old: &[u8], new: &[u8], torn_in_place: bool, what: &str) {
    let (size, got) = blocks(fx);
    let keep = old.len().min(new.len()) as u64;
    // A torn in-place write loses that block (and repair then cuts it).
    assert!(size >= keep || torn_in_place, "{what}: size {size} lost acknowledged bytes below {keep}");
    let mut failed = 0;
    for (i, b) in got.iter().enumerate() {
        let Some(b) = b else {
            if (i as u64) * B < keep {
                failed += 1;
            }
            continue;
        };
        for (j, &x) in b.iter().enumerate() {
            let at = i * B as usize + j;
            let ok = old.get(at) == Some(&x) || new.get(at) == Some(&x) || (x == 0 && at as u64 >= keep);
            assert!(ok, "{what}: byte {at} is {x}");
        }
    }
    let allowed = usize::from(torn_in_place);
    assert!(failed <= allowed, "{what}: {failed} blocks below the old size fail");
}

/// Format v2's seal budget, lowered to 40 seals (counted 4 at a time):
/// writes across sessions (each a new `EncryptedFile`, as after a
/// remount), appends and a failing state write re-key the file each time
/// the count would pass the budget. The epoch grows, the count never
/// passes the budget, every block is under the current epoch's key, and
/// the content is intact. A crash in the middle of a re-key leaves a file
/// that reads, and the next update finishes it.
#[test]
fn v2_files_are_re_keyed_before_a_key_passes_its_seal_budget() {
    TEST_CTR_CHUNK.with(|c| c.set(4));
    TEST_BUDGET.with(|c| c.set(40));
    let fx = Fx::new();
    let mut model = pattern(3 * B as usize, 1);
    let mut f = fx.file(&model);
    let mut epochs = 0;
    let mut crashed_rekeys = 0;
    for session in 0..120u64 {
        if session % 3 == 0 {
            f = fx.open(); // a new session
        }
        let k = &fx.key.key;
        let before = f.state().epoch;
        let armed = session % 7 == 3;
        if armed {
            // A crash inside whatever the write does (a re-key included).
            fault::arm(Step::WriteOld, Fault::Crash);
        }
        let off = (session % 5) * B + 10;
        let d = pattern(100 + session as usize, session as u8);
        let r = f.write_at(KeyArg::Existing(k), off, &d);
        if armed && fault::fired() {
            assert!(r.is_err());
            if f.state().epoch > before {
                crashed_rekeys += 1;
            }
            drop(f);
            f = fx.open();
            let got = f.read_at(Some(k), 0, 1 << 20).unwrap();
            assert!(got.len() >= model.len().min(got.len()), "session {session}: reads after the crash");
            // The interrupted write may or may not have landed: take what is there.
            model = got;
            continue;
        }
        r.unwrap();
        let end = off as usize + d.len();
        if model.len() < end {
            model.resize(end, 0);
        }
        model[off as usize..end].copy_from_slice(&d);
        let st = f.state();
        assert!(st.seals <= 40, "session {session}: {} seals counted under one key", st.seals);
        assert!(!st.converting());
        epochs = epochs.max(st.epoch);
        assert!(f.read_at(Some(k), 0, 1 << 20).unwrap() == model, "session {session}");
    }
    f.commit().unwrap();
    drop(f);
    let f = fx.open();
    assert!(f.read_at(Some(&fx.key.key), 0, 1 << 20).unwrap() == model);
    assert_eq!(f.verify(&fx.key.key).unwrap(), VerifyReport::default());
    assert!(epochs >= 5, "re-keyed {epochs} times");
    eprintln!("{epochs} re-keys, {crashed_rekeys} of the crashes inside one");
    TEST_CTR_CHUNK.with(|c| c.set(CTR_CHUNK));
    TEST_BUDGET.with(|c| c.set(crate::format::v2::SEAL_BUDGET));
}

/// Writes `data` as a v1 file (as an older kmsfs did), block 2 a v1 hole;
/// returns what it reads as.
fn write_v1_file(fx: &Fx, data: &[u8]) -> Vec<u8> {
    let mut h = FileHeader::new(12, 256, VOL, fx.key.file_id, fx.key.wrapped.clone());
    h.seal(&fx.key.key).unwrap();
    let mut bytes = h.to_bytes().unwrap();
    let blocks = data.len().div_ceil(B as usize);
    for (i, c) in data.chunks(B as usize).enumerate() {
        let aad = BlockAad { file_id: &fx.key.file_id, block_log2: 12, index: i as u64, last: i + 1 == blocks };
        if i == 2 {
            bytes.extend(std::iter::repeat_n(0u8, c.len() + 28)); // a v1 hole
            continue;
        }
        bytes.extend(crate::format::block::seal_block(&fx.key.key, &aad, c).unwrap());
    }
    let mut want = data.to_vec();
    want[2 * B as usize..3 * B as usize].fill(0);
    std::fs::write(fx.dir.path().join("f"), &bytes).unwrap();
    want
}

/// A v1 file becomes v2 at its first update, in place; a crash at any
/// step of the conversion leaves a file that reads as before, and the next
/// update finishes the conversion.
#[test]
fn v1_files_convert_in_place_at_their_first_update_and_survive_a_crash() {
    let fx = Fx::new();
    let data = pattern(6 * B as usize + 5, 9);
    for (step, f) in [(None, Fault::Crash), (Some(Step::State), Fault::Crash), (Some(Step::WriteOld), Fault::Crash)] {
        let want = write_v1_file(&fx, &data);
        let mut file = fx.open();
        assert!(!file.is_v2());
        if let Some(s) = step {
            fault::arm(s, f);
            assert!(file.write_at(KeyArg::Existing(&fx.key.key), 7, b"x").is_err(), "{step:?}");
            assert!(fault::fired());
            drop(file);
            file = fx.open();
            let got = file.read_at(Some(&fx.key.key), 0, 1 << 20).unwrap();
            assert!(got == want, "{step:?}: reads as before after the crash");
        }
        file.write_at(KeyArg::Existing(&fx.key.key), 7, b"x").unwrap();
        file.commit().unwrap();
        assert!(file.is_v2() && !file.state().converting(), "{step:?}");
        drop(file);
        let file = fx.open();
        let mut w = want.clone();
        w[7] = b'x';
        assert!(file.read_at(Some(&fx.key.key), 0, 1 << 20).unwrap() == w, "{step:?}");
        assert_eq!(file.verify(&fx.key.key).unwrap(), VerifyReport::default(), "{step:?}");
    }
}

/// A v1 file (written through the v1 codec by hand) converts to v2 in
/// place (as `kmsfs upgrade` does) with the same content, its v1 hole a v2
/// hole, the same file ID and key.
#[test]
fn v1_files_convert_to_v2() {
    let fx = Fx::new();
    let data = pattern(5 * B as usize + 77, 3);
    let want = write_v1_file(&fx, &data);
    let mut v1 = fx.open();
    assert!(!v1.is_v2());
    assert_eq!(v1.read_at(Some(&fx.key.key), 0, 1 << 20).unwrap(), want);
    v1.upgrade_in_place(&fx.key.key).unwrap();
    assert!(v1.is_v2());
    assert_eq!(v1.header().unwrap().file_id, fx.key.file_id);
    drop(v1);
    let f = fx.open();
    assert!(f.is_v2() && !f.state().converting());
    assert_eq!(f.read_at(Some(&fx.key.key), 0, 1 << 20).unwrap(), want);
    assert_eq!(f.verify(&fx.key.key).unwrap(), VerifyReport::default());
}

/// `-o shared`: a second open of the backing file (another mount) sees
/// growth, and a file emptied and rewritten under a new file ID and key,
/// after `refresh`; the update lock excludes across open files.
#[test]
fn refresh_follows_another_writer_and_update_lock_excludes() {
    let fx = Fx::new();
    let mut w = fx.file(&pattern(5000, 1));
    let mut r = fx.open();
    assert!(!r.refresh().unwrap(), "same header");
    w.write_at(KeyArg::Existing(&fx.key.key), 5000, &pattern(3000, 2)).unwrap();
    assert_eq!(r.size(), 5000);
    assert!(!r.refresh().unwrap());
    assert_eq!(r.size(), 8000);
    assert_eq!(r.read_at(Some(&fx.key.key), 5000, 3000).unwrap(), pattern(3000, 2));
    // Emptied and rewritten with another key: a new header.
    let other = Fx::new();
    w.set_len(None, 0).unwrap();
    assert!(r.refresh().unwrap(), "emptied");
    assert!(r.header().is_none());
    w.write_at(KeyArg::Fresh(&other.key), 0, &pattern(100, 3)).unwrap();
    assert!(r.refresh().unwrap(), "new header");
    assert_eq!(r.header().unwrap().file_id, other.key.file_id);
    assert_eq!(r.read_at(Some(&other.key.key), 0, 100).unwrap(), pattern(100, 3));
    // Exclusive against any other open file description, shared with readers.
    let g = UpdateLock::take(w.backing(), true).unwrap();
    let busy = ofd_lock(r.backing().as_raw_fd(), libc::F_OFD_SETLK, libc::F_RDLCK as i16, APP_LOCK_END, 1);
    assert!(busy.is_err());
    drop(g);
    let g1 = UpdateLock::take(w.backing(), false).unwrap();
    let g2 = UpdateLock::take(r.backing(), false).unwrap();
    drop((g1, g2));
    // Application locks (below APP_LOCK_END) never meet the update lock.
    ofd_lock(r.backing().as_raw_fd(), libc::F_OFD_SETLK, libc::F_WRLCK as i16, 0, APP_LOCK_END).unwrap();
    drop(UpdateLock::take(w.backing(), true).unwrap());
}

#[test]
fn failed_or_crashed_updates_keep_earlier_data() {
    let fx = Fx::new();
    let steps = [Step::Reserve, Step::WriteNew, Step::WriteOld, Step::Truncate, Step::State];
    let mut fired = 0;
    for size in [0u64, 1, 100, B - 1, B, B + 100, 3 * B - 5, 3 * B] {
        let old = pattern(size as usize, size as u8);
        for op in ops(size) {
            for step in steps {
                // The 28-byte state write lies in the first sector and
                // the first page: it is never torn, only done or not.
                let fs = faults(&op, old.len());
                for f in fs.into_iter().filter(|f| step != Step::State || matches!(f, Fault::Fail | Fault::Crash)) {
                    let what = format!("size {size}, {op:?}, {f:?} at {step:?}");
                    let mut file = fx.file(&old);
                    fault::arm(step, f);
                    let res = op.apply(&fx, &mut file);
                    if !fault::fired() {
                        res.unwrap_or_else(|e| panic!("{what}: not hit, yet {e}"));
                        continue;
                    }
                    fired += 1;
                    assert!(res.is_err(), "{what}: a failed step must fail the update");
                    drop(file);
                    let new = op.model(&old);
                    match f {
                        Fault::Fail | Fault::FailAfter(_) => {
                            // Undone: the file is exactly as before, with
                            // no stale or torn block left behind.
                            let file = fx.open();
                            assert_eq!(file.size(), size, "{what}");
                            let key = file.header().map(|_| &fx.key.key);
                            assert_eq!(file.read_at(key, 0, 1 << 20).unwrap(), old, "{what}");
                            if let Some(k) = key {
                                let v = file.verify(k).unwrap();
                                assert_eq!(v, VerifyReport::default(), "{what}");
                            }
                        }
                        Fault::Crash | Fault::CrashAfter(_) => {
                            let torn = matches!(f, Fault::CrashAfter(_)) && step == Step::WriteOld;
                            check_after_crash(&fx, &old, &new, torn, &what);
                            // fsck --repair leaves a file that reads whole.
                            let mut file = fx.open();
                            if file.header().is_some() {
                                let v = file.verify(&fx.key.key).unwrap();
                                if file.repair(&fx.key.key, &v).is_ok() {
                                    let v = file.verify(&fx.key.key).unwrap();
                                    assert!(!v.bad_size && v.stale_blocks.is_empty(), "{what}: {v:?}");
                                    assert!(torn || v.bad_blocks.is_empty(), "{what}: {v:?}");
                                }
                            }
                            check_after_crash(&fx, &old, &new, torn, &format!("{what}, repaired"));
                        }
                    }
                }
            }
        }
    }
    eprintln!("{fired} faults fired");
    assert!(fired > 500, "only {fired} faults fired");
}

/// A length change left pending by a crash is not this object's to
/// commit: the next update settles it first (checks and repairs the file),
/// so an overwrite and a commit after such a crash leave a file that reads
/// whole. (Found by the kill -9 harness: the commit after an overwrite made
/// the strict rule apply to a last block one generation behind.)
#[test]
fn a_pending_change_left_by_a_crash_is_settled_before_the_next_update() {
    let fx = Fx::new();
    let old = pattern(3 * B as usize + 100, 5);
    for step in [Step::Reserve, Step::WriteNew, Step::WriteOld] {
        let mut f = fx.file(&old);
        f.commit().unwrap();
        fault::arm(step, Fault::Crash);
        assert!(f.write_at(KeyArg::Existing(&fx.key.key), old.len() as u64, &pattern(2 * B as usize, 6)).is_err());
        assert!(fault::fired());
        drop(f);
        let mut f = fx.open();
        assert!(f.state().pending(), "{step:?}: the crash left the change pending");
        let got = f.read_at(Some(&fx.key.key), 0, 1 << 20).unwrap();
        assert_eq!(&got[..old.len()], &old[..], "{step:?}");
        f.write_at(KeyArg::Existing(&fx.key.key), 10, b"overwrite").unwrap();
        f.commit().unwrap();
        drop(f);
        let f = fx.open();
        assert!(!f.state().pending(), "{step:?}");
        let got = f.read_at(Some(&fx.key.key), 0, 1 << 20).unwrap();
        assert_eq!(&got[10..19], b"overwrite", "{step:?}");
        assert_eq!(&got[19..old.len()], &old[19..], "{step:?}");
        assert_eq!(f.verify(&fx.key.key).unwrap(), VerifyReport::default(), "{step:?}");
    }
}
