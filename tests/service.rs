#![allow(clippy::unwrap_used, clippy::expect_used)]
//! systemd and fstab integration: the unit lints clean, READY=1 arrives only
//! once the mount serves, SIGTERM unmounts, and `mount -t fuse.kmsfs` plus an
//! fstab line work through mount(8) and mount.fuse3.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn unit_file_lints_clean() {
    require_tools!("systemd-analyze");
    let v = Command::new("systemd-analyze").arg("--version").output().unwrap();
    assert!(v.status.success());
    let tmp = tempfile::tempdir().unwrap();
    // Lint a copy that points at the built binary (ExecStart must exist).
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kmsfs@.service")).unwrap();
    let unit = unit.replace("/usr/local/bin/kmsfs", BIN);
    let path = tmp.path().join("kmsfs@lint.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg("--man=no").arg(&path).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.trim().is_empty(), "systemd-analyze verify said: {text}");
}

#[test]
fn notify_ready_only_when_serving_and_sigterm_unmounts() {
    require_mount!();
    let v = Volume::new();
    let mnt = v.tmp.path().join("m");
    std::fs::create_dir_all(&mnt).unwrap();
    let sock_path = v.tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut child = Command::new(BIN)
        .arg("mount")
        .arg(&v.cipher)
        .arg(&mnt)
        .arg("-f")
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("READY=1 within 30 s");
    assert_eq!(&buf[..n], b"READY=1");
    // At READY=1 the mount already serves.
    assert!(mounted(&mnt), "READY=1 before the mount was up");
    std::fs::write(mnt.join("f"), b"served").unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let n = sock.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1");
    let st = child.wait().unwrap();
    assert!(st.success(), "exit status {st}");
    assert!(!mounted(&mnt), "SIGTERM left the mount up");
    // The write survived the shutdown.
    let m = v.mount("m2", &[]);
    assert_eq!(std::fs::read(m.path("f")).unwrap(), b"served");
}

/// mount.fuse3 runs `kmsfs` from a reset PATH: make sure one is there.
struct InstalledBin(bool);

impl InstalledBin {
    fn ensure() -> Self {
        let p = std::path::Path::new("/usr/local/bin/kmsfs");
        if p.exists() {
            return InstalledBin(false);
        }
        std::os::unix::fs::symlink(BIN, p).unwrap();
        InstalledBin(true)
    }
}

impl Drop for InstalledBin {
    fn drop(&mut self) {
        if self.0 {
            let _ = std::fs::remove_file("/usr/local/bin/kmsfs");
        }
    }
}

#[test]
fn mount_t_fuse_kmsfs_and_fstab() {
    require_mount!();
    let _bin = InstalledBin::ensure();
    let v = Volume::new();
    let mnt = v.tmp.path().join("m");
    std::fs::create_dir_all(&mnt).unwrap();
    let out = Command::new("mount")
        .args(["-t", "fuse.kmsfs"])
        .arg(&v.cipher)
        .arg(&mnt)
        .arg("-o")
        .arg(format!("key_file={}", v.key.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "mount -t fuse.kmsfs: {}", String::from_utf8_lossy(&out.stderr));
    // mount returned, so the mount must already serve.
    assert!(mounted(&mnt));
    std::fs::write(mnt.join("f"), b"via mount(8)").unwrap();
    assert!(Command::new("umount").arg(&mnt).status().unwrap().success());
    assert!(!mounted(&mnt));
    // An fstab line with nofail and _netdev.
    let fstab = v.tmp.path().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "{} {} fuse.kmsfs key_file={},nofail,_netdev 0 0\n",
            v.cipher.display(),
            mnt.display(),
            v.key.display()
        ),
    )
    .unwrap();
    let out = Command::new("mount").arg("-T").arg(&fstab).arg(&mnt).output().unwrap();
    assert!(out.status.success(), "mount from fstab: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"via mount(8)");
    assert!(Command::new("umount").arg(&mnt).status().unwrap().success());
    // nofail: a broken entry (missing key file) fails, but `mount -a` goes on.
    let other = v.tmp.path().join("m-bad");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(
        &fstab,
        format!(
            "{} {} fuse.kmsfs key_file=/nonexistent,nofail 0 0\n{} {} fuse.kmsfs key_file={},nofail 0 0\n",
            v.cipher.display(),
            other.display(),
            v.cipher.display(),
            mnt.display(),
            v.key.display()
        ),
    )
    .unwrap();
    // Exit status is mount(8)'s business here; what matters is what mounted.
    let _ = Command::new("mount").arg("-a").arg("-T").arg(&fstab).output().unwrap();
    assert!(mounted(&mnt), "the good entry mounted");
    assert!(!mounted(&other));
    assert!(Command::new("umount").arg(&mnt).status().unwrap().success());
}
