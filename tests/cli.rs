#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The command line: init, encrypt/decrypt, inspect, fsck, rewrap, and the
//! errors users hit first.

mod common;

use std::os::unix::fs::{FileExt, PermissionsExt};

use common::*;

#[test]
fn init_refuses_nonempty_and_existing_and_key_inside() {
    let v = Volume::new();
    let (code, _, err) = run_split(&["init", p(&v.cipher), "--key-file", p(&v.tmp.path().join("k2"))]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("already a kmsfs volume"), "{err}");
    let d = v.tmp.path().join("nonempty");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("x"), b"x").unwrap();
    let (code, _, err) = run_split(&["init", p(&d), "--key-file", p(&v.tmp.path().join("k3"))]);
    assert_eq!(code, 3);
    assert!(err.contains("not empty"), "{err}");
    let e = v.tmp.path().join("empty");
    let (code, _, err) = run_split(&["init", p(&e), "--key-file", p(&e.join("inside.key"))]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("outside the cipher dir"), "{err}");
    assert_eq!(std::fs::metadata(&v.key).unwrap().permissions().mode() & 0o777, 0o600);
}

#[test]
fn loose_key_file_is_refused_with_a_clear_message() {
    let v = Volume::new();
    std::fs::set_permissions(&v.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = run_split(&["fsck", p(&v.cipher)]);
    assert_eq!(code, 4);
    assert!(err.contains("too open") && err.contains("chmod 600"), "{err}");
    assert_eq!(err.lines().count(), 1, "one-line error: {err}");
}

#[test]
fn encrypt_decrypt_inspect_and_drop_into_volume() {
    let v = Volume::plain();
    let plain = v.tmp.path().join("plain.bin");
    let data = random_bytes(3 * 4096 + 11, 42);
    std::fs::write(&plain, &data).unwrap();
    let enc = v.cipher.join("dropped");
    let (code, _, err) = run_split(&["encrypt", "--volume", p(&v.cipher), p(&plain), p(&enc)]);
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = run_split(&["inspect", "--json", p(&enc)]);
    assert_eq!(code, 0);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    for k in
        ["version", "file_id", "provider", "key_id", "block_size", "header_size", "plaintext_size", "wrapped_key_len"]
    {
        assert!(j.get(k).is_some(), "inspect lacks {k}: {out}");
    }
    assert_eq!(j["plaintext_size"], data.len());
    assert_eq!(j["provider"], "local");
    let back = v.tmp.path().join("back.bin");
    let (code, _, err) = run_split(&["decrypt", "--volume", p(&v.cipher), p(&enc), p(&back)]);
    assert_eq!(code, 0, "{err}");
    assert!(std::fs::read(&back).unwrap() == data);
    // Key file alone works too, and stdin/stdout.
    let (ok, out) = sh(&format!(
        "{BIN} encrypt --key-file {k} - - < {pl} | {BIN} decrypt --key-file {k} - - | cmp - {pl}",
        k = p(&v.key),
        pl = p(&plain)
    ));
    assert!(ok, "{out}");
    // Empty input stays empty.
    let (ok, out) = sh(&format!("{BIN} encrypt --key-file {} - - < /dev/null | wc -c", p(&v.key)));
    assert!(ok && out.trim() == "0", "{out}");
    // Dropped into the volume, it reads through a mount.
    if can_mount!() {
        let m = v.mount("m", &[]);
        assert!(std::fs::read(m.path("dropped")).unwrap() == data);
        std::fs::write(m.path("written"), &data).unwrap();
        drop(m);
        // And a backing file copied out decrypts offline.
        let out_file = v.tmp.path().join("offline");
        let (code, _, err) =
            run_split(&["decrypt", "--key-file", p(&v.key), p(&v.cipher.join("written")), p(&out_file)]);
        assert_eq!(code, 0, "{err}");
        assert!(std::fs::read(&out_file).unwrap() == data);
    }
}

#[test]
fn decrypt_of_tampered_file_fails_and_leaves_no_output() {
    let v = Volume::plain();
    let plain = v.tmp.path().join("p");
    std::fs::write(&plain, random_bytes(20_000, 1)).unwrap();
    let enc = v.tmp.path().join("e");
    assert_eq!(run_split(&["encrypt", "--key-file", p(&v.key), p(&plain), p(&enc)]).0, 0);
    // Flip a bit: overwriting with a constant left the random nonce byte
    // unchanged one run in 256, and the decrypt then rightly succeeded.
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&enc).unwrap();
    let at = 256 + 4124 * 2 + 3;
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x01], at).unwrap();
    let out = v.tmp.path().join("o");
    let (code, _, err) = run_split(&["decrypt", "--key-file", p(&v.key), p(&enc), p(&out)]);
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("block 2"), "{err}");
    assert!(!out.exists(), "partial plaintext left behind");
}

#[test]
fn fsck_reports_damage_and_zeroed_blocks() {
    require_mount!();
    let v = Volume::plain();
    {
        let m = v.mount("m", &[]);
        std::fs::create_dir_all(m.path("d")).unwrap();
        std::fs::write(m.path("d/good"), random_bytes(50_000, 1)).unwrap();
        std::fs::write(m.path("bad"), random_bytes(50_000, 2)).unwrap();
        let f = std::fs::File::create(m.path("sparse")).unwrap();
        f.set_len(100_000).unwrap();
    }
    let (code, out, err) = run_split(&["fsck", p(&v.cipher)]);
    assert_eq!(code, 0, "{out}{err}");
    // Format v2 proves the holes the user made (a marker closes each run),
    // so fsck has nothing to suspect in them; v1 files list zero blocks.
    assert!(!out.contains("ZEROED"), "{out}");
    // A block zeroed by someone else is damage, named by its index.
    let g = std::fs::OpenOptions::new().write(true).open(v.cipher.join("d/good")).unwrap();
    g.write_all_at(&[0u8; 4124], 256 + 4124 * 2).unwrap();
    let (code, out, _) = run_split(&["fsck", p(&v.cipher), "--json"]);
    assert_eq!(code, 6, "{out}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["damaged"][0]["path"], "/d/good");
    assert_eq!(j["damaged"][0]["bad_blocks"][0], 2);
    g.write_all_at(&[0u8; 4124], 256 + 4124 * 2).unwrap();
    std::fs::remove_file(v.cipher.join("d/good")).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(v.cipher.join("bad")).unwrap();
    f.write_all_at(&[1, 2, 3], 256 + 4124 * 5 + 40).unwrap();
    let (code, out, _) = run_split(&["fsck", p(&v.cipher), "--json"]);
    assert_eq!(code, 6);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["damaged"][0]["path"], "/bad");
    assert_eq!(j["damaged"][0]["bad_blocks"][0], 5);
    assert_eq!(j["files"], 2);
}

#[test]
fn rewrap_local_to_new_key_file() {
    require_mount!();
    let v = Volume::plain();
    let data = random_bytes(30_000, 3);
    {
        let m = v.mount("m", &[]);
        for i in 0..4 {
            std::fs::write(m.path(&format!("f{i}")), &data).unwrap();
        }
        std::fs::File::create(m.path("empty")).unwrap();
    }
    let before = std::fs::read(v.cipher.join("f0")).unwrap();
    let new_key = v.tmp.path().join("new.key");
    let (code, out, err) = run_split(&["rewrap", p(&v.cipher), "--to-key-file", p(&new_key)]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("4 re-wrapped, 0 already under the new key, 1 empty"), "{out}");
    let after = std::fs::read(v.cipher.join("f0")).unwrap();
    assert!(before[256..] == after[256..], "data blocks changed");
    // The old key file is no longer needed.
    std::fs::remove_file(&v.key).unwrap();
    let m = v.mount("m2", &[]);
    for i in 0..4 {
        assert!(std::fs::read(m.path(&format!("f{i}"))).unwrap() == data);
    }
    // Refused while mounted.
    let (code, _, err) = run_split(&["rewrap", p(&v.cipher), "--to-key-file", p(&v.tmp.path().join("third.key"))]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("mounted"), "{err}");
}

#[test]
fn help_on_every_command() {
    for c in ["init", "mount", "unmount", "encrypt", "decrypt", "inspect", "rewrap", "fsck", "stats"] {
        let (code, out, _) = run_split(&[c, "--help"]);
        assert_eq!(code, 0, "{c} --help");
        assert!(out.contains("Usage"), "{c}: {out}");
    }
}
