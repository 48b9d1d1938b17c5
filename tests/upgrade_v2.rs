#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `kmsfs upgrade` rewrites format v1 files as v2: content, holes, mode,
//! times and xattrs kept; a hard-linked file converted in place; a second
//! run finds nothing left to do (resume). And a v1 file written through a
//! mount becomes v2 at its first write. The v1 files are written here with
//! the v1 codec, as an older kmsfs wrote them.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::Volume;
use common::cli::{p, run_split};
use kmsfs::format::block::{BlockAad, seal_block};
use kmsfs::format::header::FileHeader;
use kmsfs::keys::local::LocalProvider;
use kmsfs::keys::{KeyContext, KeyProvider};

const B: usize = 4096;

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) | 1).collect()
}

/// Writes `data` as a v1 backing file at `path` (blocks in `holes` stored
/// as all-zero slots, v1's holes).
fn write_v1(v: &Volume, path: &Path, data: &[u8], holes: &[usize]) {
    let vol: [u8; 16] = kmsfs::format::unhex(v.config()["volume_id"].as_str().unwrap()).unwrap();
    let provider = LocalProvider::open(&v.key).unwrap();
    let file_id = kmsfs::format::random_id().unwrap();
    let (key, wrapped) = provider.generate(&KeyContext::file(vol, file_id)).unwrap();
    let mut h = FileHeader::new(12, 256, vol, file_id, wrapped);
    h.seal(&key).unwrap();
    let mut bytes = h.to_bytes().unwrap();
    let n = data.len().div_ceil(B);
    for (i, c) in data.chunks(B).enumerate() {
        if holes.contains(&i) {
            bytes.extend(std::iter::repeat_n(0u8, c.len() + 28));
            continue;
        }
        let aad = BlockAad { file_id: &file_id, block_log2: 12, index: i as u64, last: i + 1 == n };
        bytes.extend(seal_block(&key, &aad, c).unwrap());
    }
    std::fs::write(path, bytes).unwrap();
}

fn version(path: &Path) -> u8 {
    std::fs::read(path).unwrap()[4]
}

#[test]
fn upgrade_rewrites_v1_files_as_v2_and_resumes() {
    require_mount!();
    let v = Volume::plain();
    let a = pattern(3 * B + 100, 1);
    let mut sparse = pattern(6 * B + 5, 2);
    sparse[2 * B..4 * B].fill(0);
    write_v1(&v, &v.cipher.join("a"), &a, &[]);
    write_v1(&v, &v.cipher.join("sparse"), &sparse, &[2, 3]);
    write_v1(&v, &v.cipher.join("linked"), &a, &[]);
    std::fs::hard_link(v.cipher.join("linked"), v.cipher.join("linked2")).unwrap();
    {
        let m = v.mount("m", &[]);
        assert!(std::fs::read(m.path("a")).unwrap() == a, "v1 reads");
        assert!(std::fs::read(m.path("sparse")).unwrap() == sparse);
        xattr_set(&m.path("a"), "user.note", b"kept");
        std::fs::set_permissions(m.path("a"), std::fs::Permissions::from_mode(0o640)).unwrap();
    }
    let before = std::fs::metadata(v.cipher.join("a")).unwrap();
    assert_eq!(version(&v.cipher.join("a")), 1);
    let (code, out, err) = run_split(&["upgrade", p(&v.cipher), "--key-file", p(&v.key)]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("3 files rewritten in format v2"), "{out}");
    for f in ["a", "sparse", "linked"] {
        assert_eq!(version(&v.cipher.join(f)), 2, "{f} is v2 now");
    }
    assert_eq!(std::fs::metadata(v.cipher.join("linked2")).unwrap().nlink(), 2, "still one inode");
    let after = std::fs::metadata(v.cipher.join("a")).unwrap();
    assert_eq!(
        (after.mode(), after.uid(), after.mtime(), after.mtime_nsec()),
        (before.mode(), before.uid(), before.mtime(), before.mtime_nsec())
    );
    {
        let m = v.mount("m", &[]);
        assert!(std::fs::read(m.path("a")).unwrap() == a);
        assert!(std::fs::read(m.path("sparse")).unwrap() == sparse);
        assert!(std::fs::read(m.path("linked2")).unwrap() == a);
        assert_eq!(xattr_get(&m.path("a"), "user.note"), b"kept");
    }
    // A second run (after an interrupted one, say) has nothing left to do.
    let (code, out, _) = run_split(&["upgrade", p(&v.cipher), "--key-file", p(&v.key)]);
    assert_eq!(code, 0);
    assert!(out.contains("0 files rewritten in format v2, 4 already current, 0 skipped"), "{out}");
    let (code, out, err) = run_split(&["fsck", p(&v.cipher), "--key-file", p(&v.key)]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("ZEROED  /sparse"), "v2 holes are proven: {out}");
}

fn xattr_set(path: &Path, name: &str, value: &[u8]) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C strings and a buffer of the given length.
    let r = unsafe { libc::setxattr(c.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
}

fn xattr_get(path: &Path, name: &str) -> Vec<u8> {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of the given length.
    let r = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(r >= 0, "getxattr: {}", std::io::Error::last_os_error());
    buf.truncate(r as usize);
    buf
}

/// A v1 file written through a mount becomes v2 at its first write, with
/// its old content and the new bytes; one that is only read stays v1.
#[test]
fn a_v1_file_becomes_v2_at_its_first_write() {
    require_mount!();
    let v = Volume::plain();
    let data = pattern(5 * B + 9, 3);
    write_v1(&v, &v.cipher.join("w"), &data, &[1]);
    write_v1(&v, &v.cipher.join("r"), &data, &[]);
    let mut want = data.clone();
    want[B..2 * B].fill(0);
    {
        let m = v.mount("m", &[]);
        assert!(std::fs::read(m.path("r")).unwrap() == data);
        let f = std::fs::OpenOptions::new().write(true).open(m.path("w")).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"new", 3 * B as u64).unwrap();
        f.sync_all().unwrap();
        drop(f);
        want[3 * B..3 * B + 3].copy_from_slice(b"new");
        assert!(std::fs::read(m.path("w")).unwrap() == want);
    }
    assert_eq!(version(&v.cipher.join("w")), 2, "written: v2");
    assert_eq!(version(&v.cipher.join("r")), 1, "only read: still v1");
    let m = v.mount("m", &[]);
    assert!(std::fs::read(m.path("w")).unwrap() == want);
    drop(m);
    let (code, out, err) = run_split(&["fsck", p(&v.cipher), "--key-file", p(&v.key)]);
    assert_eq!(code, 0, "{out}{err}");
}
