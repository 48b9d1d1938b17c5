//! Process plumbing for the mount daemon: readiness pipe, sd_notify, signal
//! waiting, syslog logging and key-memory hygiene.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

/// Environment variable carrying the readiness pipe's fd to the daemon child.
pub const READY_FD_ENV: &str = "KMSFS_READY_FD";

/// A pipe: (read end, write end). The read end is close-on-exec.
pub fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe(2) writes exactly two c_ints through its pointer, and `fds`
    // is a local array of exactly two, borrowed only for this call.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe succeeded, so both numbers are descriptors the kernel just
    // made for this call; nothing else in the process has seen them, so each
    // OwnedFd is the only owner of its descriptor.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let _ = crate::sys::set_cloexec(&r, true);
    Ok((r, w))
}

/// Reads the daemon child's verdict: `Ok` on "ready", else its message.
pub fn wait_ready(read_end: OwnedFd) -> Result<(), String> {
    let mut f = std::fs::File::from(read_end);
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    let s = s.trim();
    if s == "ready" {
        Ok(())
    } else if s.is_empty() {
        Err("the mount daemon exited before the mount was ready (see the system log)".into())
    } else {
        Err(s.to_string())
    }
}

/// Tells the parent (daemon mode) how the mount went, then closes the pipe.
/// Once only: later calls (a failure after "ready") do nothing. The
/// variable stays set (unsetting it with threads running is unsound); the
/// flag below is what makes the descriptor taken once.
pub fn report_ready(msg: &str) {
    static REPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let Some(fd) = std::env::var(READY_FD_ENV).ok().and_then(|v| v.parse::<RawFd>().ok()) else { return };
    if fd <= 2 || REPORTED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    // SAFETY: the parent made this descriptor for this process alone (the
    // write end of the readiness pipe, inherited across exec) and nothing
    // else here wraps its number: it is not stdio (checked above), and the
    // atomic swap above lets exactly one call in the process's life reach
    // this line, so the File is its only owner and closes it once.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    let _ = f.write_all(msg.as_bytes());
}

/// Sends a state string to systemd when NOTIFY_SOCKET is set. Kept by hand
/// rather than the sd-notify crate: its 0.5.0 connects to NOTIFY_SOCKET as a
/// path only, so an abstract socket ("@...", as systemd hands out in some
/// setups) fails there; this is the whole protocol we need.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let Ok(sock) = UnixDatagram::unbound() else { return };
    let bytes = path.as_encoded_bytes();
    let res = if let Some(abs) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abs).and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = res {
        tracing::warn!("sd_notify {state:?} failed: {e}");
    }
}

/// Signals the daemon handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    /// SIGTERM / SIGINT: flush, unmount and exit.
    Stop,
    /// SIGHUP: reopen the log file (logrotate), keep serving.
    Reopen,
    /// SIGUSR1: log statistics.
    Stats,
}

fn sigset() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, for which all-zero bits are a valid
    // value; sigemptyset and sigaddset write only within the sigset_t they are
    // given, here `set`, a local borrowed for each call alone, and the signal
    // numbers are valid constants.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR1] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks the handled signals in this thread and all threads spawned later,
/// so only `wait_signal` sees them. Call first thing in `main`.
pub fn block_signals() {
    let set = sigset();
    // SAFETY: pthread_sigmask reads one sigset_t through its pointer, `set`, a
    // live local; the old-mask pointer is null (allowed), so it writes nothing.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Waits up to `timeout` for a handled signal.
pub fn wait_signal(timeout: Duration) -> Option<Sig> {
    let set = sigset();
    let ts = libc::timespec { tv_sec: timeout.as_secs() as i64, tv_nsec: timeout.subsec_nanos() as i64 };
    // SAFETY: sigtimedwait reads one sigset_t and one timespec through its
    // pointers, `set` and `ts`, live locals; the info pointer is null
    // (allowed), so it writes nothing.
    let s = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
    match s {
        libc::SIGUSR1 => Some(Sig::Stats),
        libc::SIGHUP => Some(Sig::Reopen),
        s if s > 0 => Some(Sig::Stop),
        _ => None,
    }
}

/// How long a stop may spend writing back before the mount goes anyway.
/// scripts/kmsfs@.service gives the whole stop TimeoutStopSec=90, which
/// leaves room for the unmount itself after this budget.
pub const STOP_BUDGET: Duration = Duration::from_secs(60);

/// Makes the kernel write back its dirty pages of the mount whose root is
/// open as `root`, and waits, until `deadline` at most, for this daemon to
/// have answered the WRITEs. It fsyncs each file in `open` (paths relative
/// to the root, from `EncFs::open_files`) through the mount: syncfs(2) will
/// not do, as recent kernels let it return without writing back FUSE pages
/// (sync must not hang on a FUSE server; tests/tools.rs loses all 200,000
/// bytes with syncfs alone), while fsync waits for them on every kernel.
/// The WRITEs come back to this very daemon: the caller keeps the session
/// serving and this runs on its own thread, so a stuck writeback costs the
/// deadline, never a deadlock. True when all went well.
pub fn flush_mount(root: &std::fs::File, open: Vec<std::path::PathBuf>, deadline: Instant) -> bool {
    let Ok(root) = root.try_clone() else { return false };
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new().name("kmsfs-flush".into()).spawn(move || {
        let mut ok = true;
        for rel in open {
            let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
            // Every component is a directory the daemon knows: a symlink on
            // the way was planted (in the cipher dir), and must not lead the
            // root daemon out of the mount.
            let f = match crate::sys::open_beneath(root.as_raw_fd(), rel.as_os_str(), flags, 0) {
                Ok(f) => std::fs::File::from(f),
                Err(e) => {
                    tracing::debug!("flush: cannot reopen {}: {e}", rel.display());
                    continue;
                }
            };
            if let Err(e) = f.sync_data() {
                tracing::error!("flush: writing back /{} failed: {e}", rel.display());
                ok = false;
            }
        }
        let _ = tx.send(ok);
    });
    if let Err(e) = spawned {
        tracing::error!("cannot start the flush thread: {e}");
        return false;
    }
    match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(ok) => ok,
        Err(_) => {
            tracing::error!("writing back the mount's dirty pages did not finish within the stop budget");
            false
        }
    }
}

/// Unmounts `mnt`, lazily (MNT_DETACH) if asked. Without privilege, goes
/// through the setuid `fusermount3` as fuser does.
pub fn unmount(mnt: &Path, lazy: bool) -> std::io::Result<()> {
    let c = std::ffi::CString::new(mnt.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: umount2 reads the NUL-terminated path `c`, a CString alive for
    // the call, and writes no memory.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EPERM) {
        return Err(e);
    }
    let st = std::process::Command::new("fusermount3")
        .arg(if lazy { "-uz" } else { "-u" })
        .arg("--")
        .arg(mnt)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()?;
    if st.success() { Ok(()) } else { Err(std::io::Error::other(format!("fusermount3 failed ({st})"))) }
}

/// Detaches from the terminal: new session, stdio to /dev/null.
pub fn detach() {
    // SAFETY: the only pointer is the static C string "/dev/null", so no
    // memory of ours is written. Replacing descriptors 0..2 breaks no owner:
    // Rust's stdio uses them by number and never closes them, and no OwnedFd
    // holds them (sys::take_inherited_fd refuses 0..2). `null` is closed only
    // when it is a new descriptor above 2, which nothing else has seen.
    unsafe {
        libc::setsid();
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            libc::dup2(null, 2);
            if null > 2 {
                libc::close(null);
            }
        }
    }
}

/// Keeps key material out of core dumps and swap where the system allows.
pub fn harden_memory() {
    // SAFETY: prctl(PR_SET_DUMPABLE) takes integers only (no pointer is passed
    // or read for this option), so no memory of ours is read or written.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        tracing::warn!("cannot disable core dumps: {}", std::io::Error::last_os_error());
    }
    // SAFETY: libc::rlimit is two integers, for which all-zero bits are valid.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: getrlimit writes exactly one rlimit through its pointer, `lim`, a
    // local borrowed for the call alone.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    if lim.rlim_cur == libc::RLIM_INFINITY {
        // Only with an unlimited MEMLOCK: MCL_FUTURE under a finite limit
        // would make later allocations fail.
        // SAFETY: mlockall takes flags only, no pointer: it changes how pages are
        // kept, never their contents, so no Rust value is read or written.
        if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) } != 0 {
            tracing::warn!("cannot lock memory, keys may be swapped: {}", std::io::Error::last_os_error());
        }
    } else {
        tracing::info!(
            "RLIMIT_MEMLOCK is {} bytes: key memory is not locked and may be swapped (set LimitMEMLOCK=infinity)",
            lim.rlim_cur
        );
    }
}

/// Raises the open-file limit to its hard maximum: each known inode holds
/// one O_PATH descriptor.
pub fn raise_nofile() {
    // SAFETY: libc::rlimit is two integers, for which all-zero bits are valid.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: getrlimit writes and setrlimit reads exactly one rlimit through
    // their pointers, `lim`, a local borrowed for each call alone.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The `--log-file`: created 0600 (and put back to 0600 if it was looser),
/// reopened on SIGHUP so logrotate can move it away.
pub struct LogFile {
    path: std::path::PathBuf,
    file: std::sync::Arc<LogSink>,
}

/// The open log file, swappable under a lock.
pub struct LogSink(std::sync::Mutex<std::fs::File>);

impl Write for &LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // One event is one write_all under the lock: lines never interleave.
        let mut f = self.0.lock().map_err(|_| std::io::Error::other("log lock poisoned"))?;
        f.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogFile {
    /// Opens (creating) the log file; an error here fails the mount rather
    /// than logging silently elsewhere.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let path = std::path::absolute(path)?;
        let f = Self::open_file(&path)?;
        Ok(Self { path, file: std::sync::Arc::new(LogSink(std::sync::Mutex::new(f))) })
    }

    fn open_file(path: &Path) -> std::io::Result<std::fs::File> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        if !f.metadata()?.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        Ok(f)
    }

    /// Opens the path again and swaps the new file in.
    pub fn reopen(&self) -> std::io::Result<()> {
        let f = Self::open_file(&self.path)?;
        *self.file.0.lock().map_err(|_| std::io::Error::other("log lock poisoned"))? = f;
        Ok(())
    }

    /// The writer for tracing-subscriber.
    pub fn writer(&self) -> std::sync::Arc<LogSink> {
        self.file.clone()
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Whether stderr is systemd's journal stream (JOURNAL_STREAM names its
/// device and inode), so logs should go to the journal natively.
pub fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = v.to_str().and_then(|v| v.split_once(':')) else { return false };
    // SAFETY: libc::stat is plain integers, for which all-zero bits are valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes exactly one stat through its pointer, `st`, a local
    // borrowed for the call alone; if fd 2 is closed it fails and writes nothing.
    if unsafe { libc::fstat(2, &mut st) } != 0 {
        return false;
    }
    dev.parse::<u64>().is_ok_and(|d| d == st.st_dev) && ino.parse::<u64>().is_ok_and(|i| i == st.st_ino)
}

/// A tracing writer that sends each line to syslog (journald picks it up).
#[derive(Clone, Copy)]
pub struct Syslog;

impl Syslog {
    /// Opens the syslog connection.
    pub fn open() -> Self {
        // SAFETY: openlog keeps the ident pointer; it is a static C string, alive for
        // the whole process.
        unsafe { libc::openlog(c"kmsfs".as_ptr(), libc::LOG_PID, libc::LOG_DAEMON) };
        Syslog
    }
}

impl Write for Syslog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        for line in text.lines().filter(|l| !l.is_empty()) {
            let pri = if line.contains("ERROR") {
                libc::LOG_ERR
            } else if line.contains("WARN") {
                libc::LOG_WARNING
            } else {
                libc::LOG_INFO
            };
            if let Ok(c) = std::ffi::CString::new(line.replace('\0', "")) {
                // SAFETY: the format is the static "%s" with exactly one argument, `c`, a
                // CString alive for the call: no user text is read as a format.
                unsafe { libc::syslog(pri, c"%s".as_ptr(), c.as_ptr()) };
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Syslog {
    type Writer = Syslog;
    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

/// Raises the kernel's readahead for a FUSE mount to `kb` KiB. The FUSE
/// default (128 KiB) caps sequential reads at 128 KiB requests; larger ones
/// halve the round trips per byte. Needs root; harmless if it fails.
pub fn set_readahead(mountpoint: &std::path::Path, kb: u32) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(mountpoint) else { return };
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    match std::fs::write(&path, kb.to_string()) {
        Ok(()) => tracing::debug!("readahead set to {kb} KiB ({path})"),
        Err(e) => tracing::debug!("cannot set readahead ({path}): {e}"),
    }
}

/// One line of /proc/self/mountinfo, with its escapes decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Where it is mounted.
    pub mount_point: std::path::PathBuf,
    /// The fs type, e.g. `fuse.kmsfs`.
    pub fs_type: String,
    /// The mount source (for kmsfs, the cipher dir).
    pub source: String,
}

/// The mounts this process sees. Hand-written on purpose: procfs-core 0.18
/// leaves mountinfo's octal escapes undecoded (and its /proc/mounts decoder
/// misses `\040`, the space), and both work on `String`, while a path is bytes.
pub fn mounts() -> std::io::Result<Vec<MountEntry>> {
    Ok(parse_mountinfo(&std::fs::read("/proc/self/mountinfo")?))
}

/// Parses mountinfo(5): `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [TAGS...] - TYPE SOURCE SUPEROPTS`.
/// Malformed lines are skipped.
pub fn parse_mountinfo(text: &[u8]) -> Vec<MountEntry> {
    use std::os::unix::ffi::OsStringExt;
    let mut out = Vec::new();
    for line in text.split(|&b| b == b'\n') {
        let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == b"-") else { continue };
        if dash < 6 || fields.len() < dash + 3 {
            continue;
        }
        out.push(MountEntry {
            mount_point: std::ffi::OsString::from_vec(unescape_octal(fields[4])).into(),
            fs_type: String::from_utf8_lossy(&unescape_octal(fields[dash + 1])).into_owned(),
            source: String::from_utf8_lossy(&unescape_octal(fields[dash + 2])).into_owned(),
        });
    }
    out
}

/// Decodes the kernel's `\NNN` octal escapes (space, tab, newline,
/// backslash, '#'); anything else is kept as it is.
fn unescape_octal(f: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(f.len());
    let mut i = 0;
    while i < f.len() {
        if f[i] == b'\\'
            && let Some(d) = f.get(i + 1..i + 4)
            && d.iter().all(|c| (b'0'..=b'7').contains(c))
            && d[0] <= b'3'
        {
            out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
            i += 4;
        } else {
            out.push(f[i]);
            i += 1;
        }
    }
    out
}

/// Mounts /dev/fuse at `mnt` with the fs type `fuse.kmsfs`, as root, and
/// returns the session's descriptor for `fuser::Session::from_fd`. fuser
/// 0.18 mounts as root with the bare type `fuse` (it drops the subtype,
/// which only fusermount3 applies), so kmsfs mounts itself there, with the
/// same defaults (nosuid, nodev). `Ok(None)` without the privilege: the
/// caller then lets fuser go through fusermount3, which sets the subtype.
pub fn mount_typed(
    mnt: &Path,
    source: &str,
    options: &[fuser::MountOption],
    allow_other: bool,
) -> std::io::Result<Option<OwnedFd>> {
    use fuser::MountOption as O;
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::OpenOptions::new().read(true).write(true).custom_flags_cloexec().open("/dev/fuse")?;
    let mode = std::fs::metadata(mnt)?.mode() & libc::S_IFMT;
    // SAFETY: getuid and getgid have no arguments and no pointer: they read and
    // write no memory of ours, and they cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = format!("fd={},rootmode={mode:o},user_id={uid},group_id={gid}", dev.as_raw_fd());
    let mut flags: libc::c_ulong = 0;
    let (mut nodev, mut nosuid) = (true, true);
    for o in options {
        match o {
            O::RO => flags |= libc::MS_RDONLY,
            O::NoExec => flags |= libc::MS_NOEXEC,
            O::NoAtime => flags |= libc::MS_NOATIME,
            O::Sync => flags |= libc::MS_SYNCHRONOUS,
            O::DirSync => flags |= libc::MS_DIRSYNC,
            O::Dev => nodev = false,
            O::Suid => nosuid = false,
            O::NoDev => nodev = true,
            O::NoSuid => nosuid = true,
            O::DefaultPermissions => data.push_str(",default_permissions"),
            _ => {}
        }
    }
    if nodev {
        flags |= libc::MS_NODEV;
    }
    if nosuid {
        flags |= libc::MS_NOSUID;
    }
    if allow_other {
        data.push_str(",allow_other");
    }
    let c = |s: &[u8]| std::ffi::CString::new(s).map_err(std::io::Error::other);
    let (src, target, data) = (c(source.as_bytes())?, c(mnt.as_os_str().as_encoded_bytes())?, c(data.as_bytes())?);
    // SAFETY: `src`, `target` and `data` are CStrings alive for the call and the fs
    // type a static C string; mount reads them and writes no memory.
    let r = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), c"fuse.kmsfs".as_ptr(), flags, data.as_ptr().cast()) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::EPERM) { Ok(None) } else { Err(e) };
    }
    Ok(Some(OwnedFd::from(dev)))
}

trait CloexecExt {
    fn custom_flags_cloexec(&mut self) -> &mut Self;
}

impl CloexecExt for std::fs::OpenOptions {
    fn custom_flags_cloexec(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_CLOEXEC)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_decodes_escapes_and_optional_fields() {
        let text = b"36 35 98:0 /mnt1 /mnt/a\\040b\\011c\\134d\\043e rw,noatime master:1 shared:2 - fuse.kmsfs /srv/c\\040d rw,user_id=0\n\
37 35 0:5 / /proc rw - proc proc rw\n\
garbage line\n\
38 35 0:6 / /x rw - tmpfs\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, std::path::PathBuf::from("/mnt/a b\tc\\d#e"));
        assert_eq!(m[0].fs_type, "fuse.kmsfs");
        assert_eq!(m[0].source, "/srv/c d");
        assert_eq!(m[1].mount_point, std::path::PathBuf::from("/proc"));
        assert_eq!(unescape_octal(b"a\\9bc\\"), b"a\\9bc\\");
    }
}
