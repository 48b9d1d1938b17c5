#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Under systemd (JOURNAL_STREAM names stderr) the daemon logs to the
//! journal natively, with real priorities. No journald runs here (systemd is
//! not PID 1), so the test stands in for it: it binds the journal's socket
//! and reads the datagrams kmsfs sends (the journal's native protocol).

mod common;

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const SOCKET: &str = "/run/systemd/journal/socket";

#[test]
fn journal_gets_native_entries_with_real_priorities() {
    require_mount!();
    if Path::new(SOCKET).exists() {
        // A real journald owns the socket: its entries cannot be read here.
        let _ = std::io::Write::write_all(&mut std::io::stderr(), b"SKIPPED: a journald is running\n");
        return;
    }
    std::fs::create_dir_all(Path::new(SOCKET).parent().unwrap()).unwrap();
    let rx = UnixDatagram::bind(SOCKET).unwrap();
    struct Unlink;
    impl Drop for Unlink {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(SOCKET);
        }
    }
    let _unlink = Unlink;
    rx.set_read_timeout(Some(Duration::from_millis(200))).unwrap();

    let v = Volume::plain();
    {
        let m = v.mount("m", &[]);
        std::fs::write(m.path("f"), random_bytes(10_000, 1)).unwrap();
    }
    // Damage a block so the mount has an error to report.
    let backing = v.cipher.join("f");
    let mut b = std::fs::read(&backing).unwrap();
    b[256 + 4124 + 40] ^= 1;
    std::fs::write(&backing, b).unwrap();

    let mnt = v.tmp.path().join("j");
    std::fs::create_dir_all(&mnt).unwrap();
    let stderr = std::fs::File::create(v.tmp.path().join("stderr")).unwrap();
    let st = stderr.metadata().unwrap();
    let mut child = Command::new(BIN)
        .args(["mount", v.cipher.to_str().unwrap(), mnt.to_str().unwrap(), "-f"])
        .env("JOURNAL_STREAM", format!("{}:{}", st.dev(), st.ino()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    wait_until("the mount to come up", 20, || mounted(&mnt));
    let e = std::fs::read(mnt.join("f")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    let _ = Command::new("fusermount3").arg("-u").arg(&mnt).status();
    let _ = child.wait();

    let mut entries = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    while let Ok(n) = rx.recv(&mut buf) {
        if n > 0 {
            entries.push(parse(&buf[..n]));
        }
    }
    let get = |e: &Vec<(String, String)>, k: &str| e.iter().find(|(f, _)| f == k).map(|(_, v)| v.clone());
    let with = |prio: &str, text: &str| {
        entries
            .iter()
            .any(|e| get(e, "PRIORITY").as_deref() == Some(prio) && get(e, "MESSAGE").is_some_and(|m| m.contains(text)))
    };
    // tracing-journald maps INFO to notice (5), WARN to 4 and ERROR to 3.
    assert!(with("5", "mounted"), "an INFO entry at priority 5: {entries:?}");
    assert!(with("3", "block 1"), "the bad block at priority 3 (err): {entries:?}");
    assert!(entries.iter().all(|e| get(e, "SYSLOG_IDENTIFIER").as_deref() == Some("kmsfs")), "{entries:?}");
    assert!(
        entries.iter().any(|e| get(e, "F_PATH").is_some_and(|p| p.ends_with("/j/f"))),
        "the bad block's entry names the file: {entries:?}"
    );
    // Nothing went to plain stderr instead.
    let plain = std::fs::read_to_string(v.tmp.path().join("stderr")).unwrap();
    assert!(!plain.contains("mounted"), "{plain}");
}

/// Parses one entry of the journal's native protocol: `KEY=value` lines,
/// or `KEY`, a newline, a little-endian u64 length, the value, a newline.
fn parse(mut b: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let nl = b.iter().position(|&c| c == b'\n').unwrap_or(b.len());
        let line = &b[..nl];
        if let Some(eq) = line.iter().position(|&c| c == b'=') {
            out.push((String::from_utf8_lossy(&line[..eq]).into(), String::from_utf8_lossy(&line[eq + 1..]).into()));
            b = &b[(nl + 1).min(b.len())..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let rest = &b[nl + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            out.push((key, String::from_utf8_lossy(&rest[8..8 + len]).into()));
            b = &rest[(8 + len + 1).min(rest.len())..];
        }
    }
    out
}
