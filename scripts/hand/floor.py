#!/usr/bin/env python3
"""The file system's own cost of a small file on this machine (docs/PERFORMANCE.md,
session 7): N x 4 KiB files created and written, then renamed, then made durable with one
syncfs per 64 files (netdisk's group commit), then read back as a sender would. Prints
wall time, this process's CPU and all CPUs' busy time (from /proc/stat, so the kernel's
writeback threads count too), per file. usage: scripts/hand/floor.py [DIR] [N]"""
import ctypes, os, sys, tempfile, time

libc = ctypes.CDLL("libc.so.6", use_errno=True)
base = sys.argv[1] if len(sys.argv) > 1 else None
N = int(sys.argv[2]) if len(sys.argv) > 2 else 10000
DATA = os.urandom(4096)
HZ = os.sysconf("SC_CLK_TCK")


def busy():
    v = list(map(int, open("/proc/stat").readline().split()[1:]))
    return sum(v) - v[3] - v[4]  # all but idle and iowait


def measure(label, work):
    os.sync()
    b0, c0, w0 = busy(), time.process_time(), time.perf_counter()
    work()
    w, c, b = time.perf_counter() - w0, time.process_time() - c0, busy() - b0
    print(f"{label:34} wall {w / N * 1e6:6.1f} µs/file   process CPU {c / N * 1e6:6.1f}"
          f"   all CPUs busy {b / HZ / N * 1e6:6.1f}")


def writes(rename, sync_every):
    folder = tempfile.mkdtemp(dir=base)
    dfd = os.open(folder, os.O_RDONLY)

    def work():
        for i in range(N):
            name = f"f{i:05}"
            tmp = name + ".tmp" if rename else name
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dfd)
            os.write(fd, DATA)
            os.close(fd)
            if rename:
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            if sync_every and (i + 1) % sync_every == 0:
                libc.syncfs(dfd)
        if sync_every:
            libc.syncfs(dfd)
    return folder, dfd, work


for label, rename, sync_every in [("create+write", False, 0),
                                  ("create+write+rename", True, 0),
                                  ("create+write+rename, syncfs per 64", True, 64)]:
    folder, dfd, work = writes(rename, sync_every)
    measure(label, work)


def reads():
    for name in sorted(os.listdir(folder)):
        fd = os.open(name, os.O_RDONLY, dir_fd=dfd)
        os.read(fd, 65536)
        os.close(fd)


measure("open+read+close (cached)", reads)
