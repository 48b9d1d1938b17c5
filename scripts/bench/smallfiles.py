#!/usr/bin/env python3
"""Small-file benchmark helper for scripts/bench.sh.

    smallfiles.py DIR COUNT SIZE [--drop-caches]

Creates DIR (must not exist; all files go directly in it), then times four phases over COUNT files of SIZE
bytes each: create (open O_CREAT|O_EXCL, write, close), stat (lstat), read
(open, read to EOF, close) and delete (unlink). With --drop-caches it runs
`sync` and drops the page/dentry/inode caches before the stat, read and delete
phases (untimed), so those phases reach the file system instead of the
kernel's caches. DIR is removed at the end.

Prints one line: "<create_s> <stat_s> <read_s> <delete_s>". Any error (short
read, wrong content, failed syscall) exits non-zero with a message on stderr.
"""
import os
import sys
import time


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    drop = "--drop-caches" in sys.argv[1:]
    if len(args) != 3:
        sys.exit(__doc__)
    top, count, size = args[0], int(args[1]), int(args[2])
    os.mkdir(top)
    paths = [os.path.join(top, "f%05d" % i) for i in range(count)]
    payload = os.urandom(size)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)

    t0 = time.perf_counter()
    for p in paths:
        fd = os.open(p, flags, 0o644)
        try:
            if os.write(fd, payload) != size:
                sys.exit("smallfiles: short write on %s" % p)
        finally:
            os.close(fd)
    t_create = time.perf_counter() - t0

    if drop:
        drop_caches()
    t0 = time.perf_counter()
    for p in paths:
        st = os.lstat(p)
        if st.st_size != size:
            sys.exit("smallfiles: %s has size %d, expected %d" % (p, st.st_size, size))
    t_stat = time.perf_counter() - t0

    if drop:
        drop_caches()
    t0 = time.perf_counter()
    for p in paths:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            data = os.read(fd, size + 1)
        finally:
            os.close(fd)
        if data != payload:
            sys.exit("smallfiles: %s read back %d bytes that differ from what was written"
                     % (p, len(data)))
    t_read = time.perf_counter() - t0

    if drop:
        drop_caches()
    t0 = time.perf_counter()
    for p in paths:
        os.unlink(p)
    t_delete = time.perf_counter() - t0

    os.rmdir(top)
    print("%.6f %.6f %.6f %.6f" % (t_create, t_stat, t_read, t_delete))


if __name__ == "__main__":
    main()
