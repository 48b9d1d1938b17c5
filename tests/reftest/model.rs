//! The reference model: an in-memory tree of files (byte contents),
//! directories, symlinks, hard links and xattrs, with the errno POSIX (and
//! Linux's rename(2) checks) gives for each failure. Deliberately simple: no
//! permissions, no times, no encryption.

use std::collections::BTreeMap;

/// A model inode number (not the filesystem's).
pub type Ino = usize;
/// The root directory.
pub const ROOT: Ino = 0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
}

#[derive(Clone, Debug)]
pub enum Body {
    File(Vec<u8>),
    Dir(BTreeMap<String, Ino>),
    Symlink(Vec<u8>),
    Fifo,
}

#[derive(Clone, Debug)]
pub struct Inode {
    pub body: Body,
    /// Names that point here (a directory has one).
    pub links: u32,
    /// Directories: the directory holding it.
    pub parent: Ino,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

impl Inode {
    pub fn kind(&self) -> Kind {
        match self.body {
            Body::File(_) => Kind::File,
            Body::Dir(_) => Kind::Dir,
            Body::Symlink(_) => Kind::Symlink,
            Body::Fifo => Kind::Fifo,
        }
    }
}

/// An open file: the inode it keeps alive, and whether it may write.
#[derive(Clone, Copy, Debug)]
pub struct Handle {
    pub ino: Ino,
    pub write: bool,
}

pub type R<T> = Result<T, i32>;

pub struct Model {
    pub inodes: BTreeMap<Ino, Inode>,
    next: Ino,
    pub handles: Vec<Handle>,
    /// Plaintext names: the volume's own names at the root are reserved.
    pub plaintext_names: bool,
}

/// The volume config and kmsfs's bookkeeping prefix (`.kmsfs*`).
pub fn reserved(name: &str) -> bool {
    name == "kmsfs.conf" || name.starts_with(".kmsfs")
}

impl Model {
    pub fn new(plaintext_names: bool) -> Self {
        let root = Inode { body: Body::Dir(BTreeMap::new()), links: 1, parent: ROOT, xattrs: BTreeMap::new() };
        Self { inodes: BTreeMap::from([(ROOT, root)]), next: 1, handles: Vec::new(), plaintext_names }
    }

    pub fn inode(&self, i: Ino) -> &Inode {
        &self.inodes[&i]
    }

    fn inode_mut(&mut self, i: Ino) -> &mut Inode {
        self.inodes.get_mut(&i).expect("live inode")
    }

    pub fn entries(&self, dir: Ino) -> &BTreeMap<String, Ino> {
        match &self.inode(dir).body {
            Body::Dir(e) => e,
            _ => panic!("not a directory"),
        }
    }

    fn entries_mut(&mut self, dir: Ino) -> &mut BTreeMap<String, Ino> {
        match &mut self.inode_mut(dir).body {
            Body::Dir(e) => e,
            _ => panic!("not a directory"),
        }
    }

    pub fn kind(&self, i: Ino) -> Kind {
        self.inode(i).kind()
    }

    /// Link count as stat(2) shows it: names, or 2 + subdirectories.
    pub fn nlink(&self, i: Ino) -> u32 {
        match &self.inode(i).body {
            Body::Dir(e) => 2 + e.values().filter(|c| self.kind(**c) == Kind::Dir).count() as u32,
            _ => self.inode(i).links,
        }
    }

    pub fn data(&self, i: Ino) -> &[u8] {
        match &self.inode(i).body {
            Body::File(d) => d,
            _ => panic!("not a file"),
        }
    }

    fn data_mut(&mut self, i: Ino) -> &mut Vec<u8> {
        match &mut self.inode_mut(i).body {
            Body::File(d) => d,
            _ => panic!("not a file"),
        }
    }

    /// Whether `name` in `dir` is the volume's own and not an entry.
    fn hidden(&self, dir: Ino, name: &str) -> bool {
        self.plaintext_names && dir == ROOT && reserved(name)
    }

    fn child(&self, dir: Ino, name: &str) -> Option<Ino> {
        if self.hidden(dir, name) {
            return None;
        }
        self.entries(dir).get(name).copied()
    }

    /// What holds the last component of `path`, after looking up every
    /// other one (ENOENT, ENOTDIR on the way). It may not be a directory:
    /// the core says ENOTDIR when it gets to it (after checking names).
    pub fn parent_any(&self, path: &[String]) -> R<Ino> {
        let mut cur = ROOT;
        for c in &path[..path.len() - 1] {
            if self.kind(cur) != Kind::Dir {
                return Err(libc::ENOTDIR);
            }
            cur = self.child(cur, c).ok_or(libc::ENOENT)?;
        }
        Ok(cur)
    }

    fn is_dir(&self, i: Ino) -> R<()> {
        if self.kind(i) == Kind::Dir { Ok(()) } else { Err(libc::ENOTDIR) }
    }

    /// The directory holding the last component of `path`.
    pub fn parent(&self, path: &[String]) -> R<Ino> {
        let p = self.parent_any(path)?;
        self.is_dir(p)?;
        Ok(p)
    }

    pub fn lookup(&self, path: &[String]) -> R<Ino> {
        let p = self.parent(path)?;
        self.child(p, last(path)).ok_or(libc::ENOENT)
    }

    /// Every entry below the root, as (path, inode), depth first.
    pub fn all_paths(&self) -> Vec<(Vec<String>, Ino)> {
        let mut out = Vec::new();
        let mut stack = vec![(Vec::new(), ROOT)];
        while let Some((p, d)) = stack.pop() {
            for (name, &c) in self.entries(d) {
                let mut q = p.clone();
                q.push(name.clone());
                if self.kind(c) == Kind::Dir {
                    stack.push((q.clone(), c));
                }
                out.push((q, c));
            }
        }
        out
    }

    /// Directories, the root (empty path) first.
    pub fn all_dirs(&self) -> Vec<Vec<String>> {
        let mut v = vec![Vec::new()];
        v.extend(self.all_paths().into_iter().filter(|(_, i)| self.kind(*i) == Kind::Dir).map(|(p, _)| p));
        v
    }

    fn new_inode(&mut self, body: Body, parent: Ino) -> Ino {
        let i = self.next;
        self.next += 1;
        self.inodes.insert(i, Inode { body, links: 1, parent, xattrs: BTreeMap::new() });
        i
    }

    /// Drops an inode no name and no handle keeps.
    fn collect(&mut self, i: Ino) {
        if self.inode(i).links == 0 && !self.handles.iter().any(|h| h.ino == i) {
            self.inodes.remove(&i);
        }
    }

    /// Removes one name of `i` (from `dir`).
    fn drop_name(&mut self, dir: Ino, name: &str) {
        let i = self.entries_mut(dir).remove(name).expect("entry");
        self.inode_mut(i).links -= 1;
        self.collect(i);
    }

    fn check_new_name(&self, dir: Ino, name: &str) -> R<()> {
        if self.hidden(dir, name) { Err(libc::EPERM) } else { Ok(()) }
    }

    fn add_handle(&mut self, h: Handle) -> usize {
        self.handles.push(h);
        self.handles.len() - 1
    }

    /// open(2) with O_CREAT: a new file, or (without O_EXCL) the file there.
    pub fn create(&mut self, path: &[String], excl: bool, trunc: bool) -> R<usize> {
        let p = self.parent(path)?;
        let name = last(path);
        self.check_new_name(p, name)?;
        match self.child(p, name) {
            None => {
                let i = self.new_inode(Body::File(Vec::new()), p);
                self.entries_mut(p).insert(name.to_string(), i);
                Ok(self.add_handle(Handle { ino: i, write: true }))
            }
            Some(_) if excl => Err(libc::EEXIST),
            Some(i) => match self.kind(i) {
                Kind::Dir => Err(libc::EISDIR),
                Kind::Symlink | Kind::Fifo => Err(libc::EEXIST),
                Kind::File => {
                    if trunc {
                        self.data_mut(i).clear();
                    }
                    Ok(self.add_handle(Handle { ino: i, write: true }))
                }
            },
        }
    }

    /// open(2) of an existing file (not a symlink: the kernel follows those).
    pub fn open(&mut self, path: &[String], write: bool, trunc: bool) -> R<usize> {
        let i = self.lookup(path)?;
        match self.kind(i) {
            Kind::Dir => Err(libc::EISDIR),
            Kind::Symlink | Kind::Fifo => unreachable!("symlinks and FIFOs are not opened"),
            Kind::File => {
                if trunc && write {
                    self.data_mut(i).clear();
                }
                Ok(self.add_handle(Handle { ino: i, write }))
            }
        }
    }

    pub fn close(&mut self, h: usize) {
        let hd = self.handles.remove(h);
        self.collect(hd.ino);
    }

    pub fn write(&mut self, h: usize, off: u64, data: &[u8]) {
        if data.is_empty() {
            return; // writes nothing, extends nothing
        }
        let d = self.data_mut(self.handles[h].ino);
        let end = off as usize + data.len();
        if d.len() < end {
            d.resize(end, 0);
        }
        d[off as usize..end].copy_from_slice(data);
    }

    /// fallocate(2) with mode 0, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE,
    /// ZERO_RANGE, or ZERO_RANGE|KEEP_SIZE; `len` > 0.
    pub fn fallocate(&mut self, h: usize, off: u64, len: u64, mode: i32) {
        let d = self.data_mut(self.handles[h].ino);
        let (size, end) = (d.len() as u64, off + len);
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        if mode == 0 {
            if end > size {
                d.resize(end as usize, 0);
            }
            return;
        }
        if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) == 0 {
            return; // KEEP_SIZE alone preallocates: nothing to see
        }
        let stop = if keep { end.min(size) } else { end };
        if stop > off {
            if stop > size {
                d.resize(stop as usize, 0);
            }
            d[off as usize..stop as usize].fill(0);
        }
    }

    /// copy_file_range(2): what reading `from` gives, written to `to`.
    pub fn copy_range(&mut self, from: usize, off_in: u64, to: usize, off_out: u64, len: usize) -> usize {
        let data = self.read(from, off_in, len.min(1 << 20));
        self.write(to, off_out, &data);
        data.len()
    }

    pub fn read(&self, h: usize, off: u64, len: usize) -> Vec<u8> {
        let d = self.data(self.handles[h].ino);
        let s = (off as usize).min(d.len());
        d[s..(s + len).min(d.len())].to_vec()
    }

    pub fn truncate(&mut self, path: &[String], size: u64) -> R<()> {
        let i = self.lookup(path)?;
        match self.kind(i) {
            Kind::Dir => Err(libc::EISDIR),
            Kind::Symlink | Kind::Fifo => unreachable!("symlinks and FIFOs are not truncated"),
            Kind::File => {
                self.data_mut(i).resize(size as usize, 0);
                Ok(())
            }
        }
    }

    fn make(&mut self, path: &[String], body: Body) -> R<()> {
        let p = self.parent(path)?;
        let name = last(path);
        self.check_new_name(p, name)?;
        if self.child(p, name).is_some() {
            return Err(libc::EEXIST);
        }
        let i = self.new_inode(body, p);
        self.entries_mut(p).insert(name.to_string(), i);
        Ok(())
    }

    pub fn mkdir(&mut self, path: &[String]) -> R<()> {
        self.make(path, Body::Dir(BTreeMap::new()))
    }

    pub fn symlink(&mut self, path: &[String], target: &[u8]) -> R<()> {
        self.make(path, Body::Symlink(target.to_vec()))
    }

    pub fn mkfifo(&mut self, path: &[String]) -> R<()> {
        self.make(path, Body::Fifo)
    }

    pub fn unlink(&mut self, path: &[String]) -> R<()> {
        let p = self.parent(path)?;
        let name = last(path);
        self.check_new_name(p, name)?;
        let i = self.child(p, name).ok_or(libc::ENOENT)?;
        if self.kind(i) == Kind::Dir {
            return Err(libc::EISDIR);
        }
        self.drop_name(p, name);
        Ok(())
    }

    pub fn rmdir(&mut self, path: &[String]) -> R<()> {
        let p = self.parent(path)?;
        let name = last(path);
        self.check_new_name(p, name)?;
        let i = self.child(p, name).ok_or(libc::ENOENT)?;
        if self.kind(i) != Kind::Dir {
            return Err(libc::ENOTDIR);
        }
        if !self.entries(i).is_empty() {
            return Err(libc::ENOTEMPTY);
        }
        self.drop_name(p, name);
        Ok(())
    }

    pub fn link(&mut self, from: &[String], to: &[String]) -> R<()> {
        let i = self.lookup(from)?;
        let p = self.parent_any(to)?;
        let name = last(to);
        self.check_new_name(p, name)?;
        self.is_dir(p)?;
        if self.child(p, name).is_some() {
            return Err(libc::EEXIST);
        }
        if self.kind(i) == Kind::Dir {
            return Err(libc::EPERM);
        }
        self.entries_mut(p).insert(name.to_string(), i);
        self.inode_mut(i).links += 1;
        Ok(())
    }

    /// Whether directory `a` is `d` or one of its ancestors.
    fn is_ancestor_or_self(&self, a: Ino, mut d: Ino) -> bool {
        loop {
            if d == a {
                return true;
            }
            if d == ROOT {
                return false;
            }
            d = self.inode(d).parent;
        }
    }

    /// rename(2) with 0, RENAME_NOREPLACE or RENAME_EXCHANGE, checked in the
    /// order Linux's do_renameat2 and vfs_rename check.
    pub fn rename(&mut self, from: &[String], to: &[String], flags: u32) -> R<()> {
        let p = self.parent_any(from)?;
        let q = self.parent_any(to)?;
        let (fname, tname) = (last(from), last(to));
        self.check_new_name(p, fname)?;
        self.check_new_name(q, tname)?;
        self.is_dir(p)?;
        self.is_dir(q)?;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let src = self.child(p, fname).ok_or(libc::ENOENT)?;
        let dst = self.child(q, tname);
        if exchange && dst.is_none() {
            return Err(libc::ENOENT);
        }
        if flags & libc::RENAME_NOREPLACE != 0 && dst.is_some() {
            return Err(libc::EEXIST);
        }
        // The source may not become its own descendant...
        if self.kind(src) == Kind::Dir && self.is_ancestor_or_self(src, q) {
            return Err(libc::EINVAL);
        }
        // ...nor the target be an ancestor of the source.
        if let Some(d) = dst
            && self.kind(d) == Kind::Dir
            && self.is_ancestor_or_self(d, p)
        {
            return Err(if exchange { libc::EINVAL } else { libc::ENOTEMPTY });
        }
        if dst == Some(src) {
            return Ok(()); // two names of one inode: nothing happens
        }
        if let Some(d) = dst
            && !exchange
        {
            match (self.kind(src) == Kind::Dir, self.kind(d) == Kind::Dir) {
                (true, false) => return Err(libc::ENOTDIR),
                (false, true) => return Err(libc::EISDIR),
                (true, true) if !self.entries(d).is_empty() => return Err(libc::ENOTEMPTY),
                _ => {}
            }
        }
        if exchange {
            let d = dst.expect("exchange target");
            self.entries_mut(p).insert(fname.to_string(), d);
            self.entries_mut(q).insert(tname.to_string(), src);
            if self.kind(d) == Kind::Dir {
                self.inode_mut(d).parent = p;
            }
        } else {
            if dst.is_some() {
                self.drop_name(q, tname);
            }
            self.entries_mut(p).remove(fname);
            self.entries_mut(q).insert(tname.to_string(), src);
        }
        if self.kind(src) == Kind::Dir {
            self.inode_mut(src).parent = q;
        }
        Ok(())
    }

    pub fn setxattr(&mut self, path: &[String], name: &str, value: &[u8], flags: i32) -> R<()> {
        let i = self.lookup(path)?;
        if matches!(self.kind(i), Kind::Symlink | Kind::Fifo) {
            return Err(libc::EPERM); // user.* xattrs live on files and directories only
        }
        let exists = self.inode(i).xattrs.contains_key(name);
        if flags == libc::XATTR_CREATE && exists {
            return Err(libc::EEXIST);
        }
        if flags == libc::XATTR_REPLACE && !exists {
            return Err(libc::ENODATA);
        }
        self.inode_mut(i).xattrs.insert(name.to_string(), value.to_vec());
        Ok(())
    }

    pub fn removexattr(&mut self, path: &[String], name: &str) -> R<()> {
        let i = self.lookup(path)?;
        if matches!(self.kind(i), Kind::Symlink | Kind::Fifo) {
            return Err(libc::EPERM); // user.* xattrs live on files and directories only
        }
        self.inode_mut(i).xattrs.remove(name).map(|_| ()).ok_or(libc::ENODATA)
    }
}

pub fn last(path: &[String]) -> &str {
    &path[path.len() - 1]
}
