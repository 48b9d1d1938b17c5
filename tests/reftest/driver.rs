//! The system under test: `EncFs` over a local-key volume in a tempdir,
//! driven in-process the way the kernel drives it through `fuse.rs` (path
//! components looked up one by one, lookups forgotten after each operation
//! except for inodes with open handles). No mount, no /dev/fuse, no root.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kmsfs::error::FsError;
use kmsfs::fs::{Attr, Caller, DirEntry, EncFs, FsOptions, ROOT_INO};
use kmsfs::keys::KeyProvider;
use kmsfs::keys::cache::KeyCache;
use kmsfs::keys::local::LocalProvider;
use kmsfs::keys::pool::KeyPool;
use kmsfs::keys::stats::KeyStats;
use kmsfs::volume::{ProviderKind, VolumeConfig};

pub type R<T> = Result<T, i32>;

fn en(e: FsError) -> i32 {
    e.errno()
}

pub struct Driver {
    pub fs: EncFs,
    pub cipher: PathBuf,
    pub block_size: u64,
    caller: Caller,
    provider: Arc<dyn KeyProvider>,
    /// `-o shared`: sizes and headers re-read from the backing files.
    shared: bool,
    /// Lookups handed out and not yet forgotten, per inode.
    lookups: HashMap<u64, u64>,
    /// Open files: (fh, ino), in the model's handle order.
    pub handles: Vec<(u64, u64)>,
    _tmp: tempfile::TempDir,
}

impl Driver {
    /// A fresh volume (local key file, 4 KiB blocks) with plaintext or
    /// encrypted names, as `kmsfs init` makes it, and its filesystem
    /// (`-o shared` if `shared`).
    pub fn new(encrypted_names: bool, shared: bool) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cipher = tmp.path().join("cipher");
        std::fs::create_dir(&cipher).expect("cipher dir");
        let key_file = tmp.path().join("volume.key");
        let provider: Arc<dyn KeyProvider> = Arc::new(LocalProvider::create_key_file(&key_file).expect("key file"));
        let mut cfg = VolumeConfig::new(ProviderKind::Local, provider.key_id(), Some(key_file), 4096).expect("config");
        if encrypted_names {
            cfg.create_name_key(provider.as_ref()).expect("name key");
        }
        cfg.create_auth_key(provider.as_ref()).expect("auth key");
        cfg.store(&cipher).expect("store config");
        let (fs, block_size) = mount(&cipher, &provider, shared);
        // Whoever runs the test creates entries as itself (root or not).
        let md = std::fs::metadata(&cipher).expect("stat");
        let caller = Caller { uid: md.uid(), gid: md.gid() };
        Self {
            fs,
            cipher,
            block_size,
            caller,
            provider,
            shared,
            lookups: HashMap::new(),
            handles: Vec::new(),
            _tmp: tmp,
        }
    }

    /// Unmounts (every handle closed, every lookup forgotten, keys dropped)
    /// and mounts again from the config on disk: nothing may live only in
    /// the old filesystem's memory.
    pub fn remount(&mut self) {
        while !self.handles.is_empty() {
            self.close(0).expect("close");
        }
        self.forget_all();
        self.fs.shutdown();
        self.fs = mount(&self.cipher, &self.provider, self.shared).0;
    }

    fn counted(&mut self, a: Attr) -> Attr {
        *self.lookups.entry(a.ino).or_default() += 1;
        a
    }

    pub fn lookup_in(&mut self, parent: u64, name: &str) -> R<Attr> {
        let a = self.fs.lookup(parent, OsStr::new(name)).map_err(en)?;
        Ok(self.counted(a))
    }

    /// Looks up every component but the last, as the kernel's path walk does.
    pub fn parent(&mut self, path: &[String]) -> R<u64> {
        let mut cur = ROOT_INO;
        for c in &path[..path.len() - 1] {
            cur = self.lookup_in(cur, c)?.ino;
        }
        Ok(cur)
    }

    pub fn lookup(&mut self, path: &[String]) -> R<Attr> {
        let p = self.parent(path)?;
        self.lookup_in(p, last(path))
    }

    /// The kernel forgets what it no longer caches; here, everything but
    /// the inodes of open files, after every operation.
    pub fn forget_all(&mut self) {
        let open: Vec<u64> = self.handles.iter().map(|h| h.1).collect();
        self.lookups.retain(|&ino, n| {
            if open.contains(&ino) {
                return true;
            }
            self.fs.forget(ino, *n);
            false
        });
    }

    pub fn create(&mut self, path: &[String], excl: bool, trunc: bool) -> R<usize> {
        let p = self.parent(path)?;
        let mut flags = libc::O_RDWR | libc::O_CREAT;
        if excl {
            flags |= libc::O_EXCL;
        }
        if trunc {
            flags |= libc::O_TRUNC;
        }
        let (a, fh) = self.fs.create(p, OsStr::new(last(path)), 0o644, flags, self.caller).map_err(en)?;
        self.counted(a);
        self.handles.push((fh, a.ino));
        Ok(self.handles.len() - 1)
    }

    pub fn open(&mut self, path: &[String], write: bool, trunc: bool) -> R<usize> {
        let a = self.lookup(path)?;
        let mut flags = if write { libc::O_RDWR } else { libc::O_RDONLY };
        if trunc {
            flags |= libc::O_TRUNC;
        }
        let fh = self.fs.open(a.ino, flags, self.caller).map_err(en)?;
        self.handles.push((fh, a.ino));
        Ok(self.handles.len() - 1)
    }

    pub fn close(&mut self, h: usize) -> R<()> {
        let (fh, _) = self.handles.remove(h);
        self.fs.release(fh).map_err(en)
    }

    pub fn write(&mut self, h: usize, off: u64, data: &[u8]) -> R<u32> {
        self.fs.write(self.handles[h].0, off, data, false).map_err(en)
    }

    pub fn read_fh(&self, fh: u64, off: u64, len: u32) -> R<Vec<u8>> {
        self.fs.read_with(fh, off, len, |r| r.map(|d| d.to_vec())).map_err(en)
    }

    /// open, write, close: what `echo > path` does through the kernel.
    pub fn write_path(&mut self, path: &[String], off: u64, data: &[u8]) -> R<()> {
        let a = self.lookup(path)?;
        let fh = self.fs.open(a.ino, libc::O_WRONLY, self.caller).map_err(en)?;
        let r = self.fs.write(fh, off, data, false).map_err(en);
        self.fs.release(fh).map_err(en)?;
        r.map(|_| ())
    }

    pub fn truncate(&mut self, path: &[String], size: u64) -> R<()> {
        let a = self.lookup(path)?;
        self.fs.setattr(a.ino, self.caller, None, None, None, Some(size), None, None).map(|_| ()).map_err(en)
    }

    pub fn mkdir(&mut self, path: &[String]) -> R<()> {
        let p = self.parent(path)?;
        let a = self.fs.mkdir(p, OsStr::new(last(path)), 0o755, self.caller).map_err(en)?;
        self.counted(a);
        Ok(())
    }

    pub fn symlink(&mut self, path: &[String], target: &[u8]) -> R<()> {
        use std::os::unix::ffi::OsStrExt;
        let p = self.parent(path)?;
        let a = self.fs.symlink(p, OsStr::new(last(path)), OsStr::from_bytes(target), self.caller).map_err(en)?;
        self.counted(a);
        Ok(())
    }

    pub fn mkfifo(&mut self, path: &[String]) -> R<()> {
        let p = self.parent(path)?;
        let a = self.fs.mknod(p, OsStr::new(last(path)), libc::S_IFIFO | 0o644, 0, self.caller).map_err(en)?;
        self.counted(a);
        Ok(())
    }

    pub fn unlink(&mut self, path: &[String]) -> R<()> {
        let p = self.parent(path)?;
        self.fs.unlink(p, OsStr::new(last(path))).map_err(en)
    }

    pub fn rmdir(&mut self, path: &[String]) -> R<()> {
        let p = self.parent(path)?;
        self.fs.rmdir(p, OsStr::new(last(path))).map_err(en)
    }

    pub fn link(&mut self, from: &[String], to: &[String]) -> R<()> {
        let a = self.lookup(from)?;
        let p = self.parent(to)?;
        let b = self.fs.link(a.ino, p, OsStr::new(last(to))).map_err(en)?;
        self.counted(b);
        Ok(())
    }

    pub fn rename(&mut self, from: &[String], to: &[String], flags: u32) -> R<()> {
        let p = self.parent(from)?;
        let q = self.parent(to)?;
        self.fs.rename(p, OsStr::new(last(from)), q, OsStr::new(last(to)), flags).map_err(en)
    }

    pub fn setxattr(&mut self, path: &[String], name: &str, value: &[u8], flags: i32) -> R<()> {
        let a = self.lookup(path)?;
        self.fs.setxattr(a.ino, OsStr::new(name), value, flags).map_err(en)
    }

    pub fn removexattr(&mut self, path: &[String], name: &str) -> R<()> {
        let a = self.lookup(path)?;
        self.fs.removexattr(a.ino, OsStr::new(name)).map_err(en)
    }

    pub fn fallocate(&self, h: usize, off: u64, len: u64, mode: i32) -> R<()> {
        self.fs.fallocate(self.handles[h].0, off, len, mode, self.caller).map_err(en)
    }

    pub fn copy_range(&self, from: usize, off_in: u64, to: usize, off_out: u64, len: u64) -> R<u32> {
        self.fs.copy_range(self.handles[from].0, off_in, self.handles[to].0, off_out, len, self.caller).map_err(en)
    }

    pub fn lseek(&self, h: usize, off: u64, whence: i32) -> R<u64> {
        self.fs.lseek(self.handles[h].0, off, whence).map_err(en)
    }

    /// A directory's entries, without `.` and `..` (returned apart).
    pub fn list(&self, ino: u64) -> R<(Vec<DirEntry>, u64)> {
        let fh = self.fs.opendir(ino).map_err(en)?;
        let r = self.fs.readdir(fh, 0).map_err(en);
        self.fs.release(fh).map_err(en)?;
        let all = r?;
        let dotdot = all.iter().find(|e| e.name == "..").map_or(0, |e| e.ino);
        Ok((all.into_iter().filter(|e| e.name != "." && e.name != "..").collect(), dotdot))
    }

    /// A whole file's plaintext, through a handle of its own.
    pub fn read_all(&self, ino: u64, size: u64) -> R<Vec<u8>> {
        let fh = self.fs.open(ino, libc::O_RDONLY, self.caller).map_err(en)?;
        let r = self.read_fh(fh, 0, size as u32 + 4096);
        self.fs.release(fh).map_err(en)?;
        r
    }

    pub fn xattrs(&self, ino: u64) -> R<Vec<(String, Vec<u8>)>> {
        let list = self.fs.listxattr(ino).map_err(en)?;
        let mut out = Vec::new();
        for n in list.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            let name = String::from_utf8(n.to_vec()).expect("xattr names are ASCII");
            let v = self.fs.getxattr(ino, OsStr::new(&name), 1 << 16).map_err(en)?;
            out.push((name, v));
        }
        out.sort();
        Ok(out)
    }

    pub fn cipher(&self) -> &Path {
        &self.cipher
    }

    /// Closes what is open and drops the keys.
    pub fn finish(mut self) {
        while !self.handles.is_empty() {
            let _ = self.close(0);
        }
        self.forget_all();
        self.fs.shutdown();
    }
}

/// The filesystem over `cipher`, as `kmsfs mount` builds it from the
/// volume's config (no look-ahead pool: local keys are generated inline).
fn mount(cipher: &Path, provider: &Arc<dyn KeyProvider>, shared: bool) -> (EncFs, u64) {
    let cfg = VolumeConfig::load(cipher).expect("load config");
    let layout = cfg.layout().expect("layout");
    let stats = Arc::new(KeyStats::default());
    let age = Duration::from_secs(600);
    let cache = Arc::new(KeyCache::new(provider.clone(), 64, age, stats.clone()));
    let pool = KeyPool::start(provider.clone(), cfg.volume_id(), 0, 0, age, stats);
    let names = Arc::new(cfg.names(provider.as_ref()).expect("names"));
    let fs = EncFs::new(cipher, layout, cfg.volume_id(), cache, pool, names, FsOptions { read_only: false })
        .expect("EncFs")
        .with_shared(shared);
    (fs, layout.block_size())
}

pub fn last(path: &[String]) -> &str {
    &path[path.len() - 1]
}
