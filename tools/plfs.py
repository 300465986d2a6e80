"""plfs: a FUSE passthrough filesystem that simulates power loss and injects I/O faults.

Run as a daemon (``python tools/plfs.py BACKING MOUNTPOINT --status FILE``) or drive it from
tests with `PlfsMount`. Every operation is applied to BACKING at once, so reads, ``stat`` and
mmap see exactly what the application wrote; alongside, plfs keeps an undo log of everything a
power cut could still take away (design measured in /work/shared/notes/powerloss.md):

* file data: per inode, the pre-image of every ``write`` and ``truncate`` since the last
  FSYNC of that inode (fsync, fdatasync, msync(MS_SYNC) and writes on O_DSYNC fds all arrive
  as FSYNC). Appends past the end cost no pre-image bytes.
* directory entries: create, mknod, mkdir, symlink, link, unlink, rmdir and rename, in order.
  Under ``--ns-model posix`` (default) an entry is durable once its directory (for a rename:
  the destination directory) is fsynced after it; under ``journal`` any fsync makes every
  earlier entry durable (roughly ext4/xfs).

Writing a command to the virtual file ``MOUNT/.plfs-ctl`` controls it; the write returns once
the command is done and ``--status`` holds the JSON result:

* ``crash MODE SEED TEAR``: power loss. ``drop`` undoes everything not durable; ``prefix``
  keeps, per file, a random prefix of the unsynced writes (the first lost one torn at a
  multiple of TEAR bytes) and a random prefix of the non-durable directory entries;
  ``pages`` keeps or reverts each dirty 4 KiB page independently (out-of-order writeback).
  Afterwards BACKING *is* the disk after the power cut and the mount answers EIO to
  everything: the machine is dead. Unmount and mount again to "reboot".
* ``fail OP ERRNO COUNT [SKIP] [MATCH] [partial]``: the next COUNT calls (-1: all) of OP
  (write, fsync, fsyncdir, create, mkdir, rename, unlink, truncate, open, read) whose path
  contains MATCH (``-``: any), after SKIP matching calls, fail with ERRNO (a name such as
  ENOSPC). ``partial`` makes a failing write first succeed for half its bytes (a short write).
  A failed fsync models fsyncgate: the writes it should have covered are never made
  durable by a later fsync, so a crash reverts them (appended bytes come back as zeros).
* ``clear``: drop every pending fault. ``status``: just refresh the status file.

Not modelled (see notes/powerloss.md): chmod/chown/utimes/xattrs roll-back, fsync byte
ranges, sync(2)/syncfs(2), ordering across files, fallocate, renameat2 flags, bit rot.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

CTL_NAME = ".plfs-ctl"
STASH_NAME = ".plfs-stash"
PAGE_BYTES = 4096
FUSE_CAP_WRITEBACK_CACHE = 1 << 16  # libfuse3 fuse_common.h
MOUNT_TIMEOUT_SECONDS = 10.0
_STRIP_FLAGS = (os.O_APPEND | os.O_TRUNC | os.O_CREAT | os.O_EXCL | os.O_ACCMODE | os.O_DSYNC | os.O_SYNC
                | getattr(os, "O_DIRECT", 0))


# =========================================================================== the filesystem


@dataclass
class _FileLog:
    """What a power cut can still take from one inode: pre-images since its last fsync.

    `fd` is a private O_RDWR descriptor, so undo works after the application closed, renamed
    or unlinked the file. Entries are (offset, pre-image, size before, size after, bytes
    written or -1 for a truncate).
    """

    fd: int
    synced_size: int
    size: int
    entries: list[tuple[int, bytes, int, int, int]] = field(default_factory=list)
    poisoned: list[tuple[int, bytes, int, int, int]] = field(default_factory=list)


@dataclass
class _NsOp:
    kind: str  # create | mkdir | unlink | rmdir | rename
    dfd: int  # O_PATH fd of the directory holding `name`
    dir_ino: int  # inode of the directory whose fsync makes this durable
    name: str
    dfd2: int = -1  # rename: destination directory
    name2: str = ""
    stash: str = ""  # unlink / rename-over: where the removed object waits
    mode: int = 0o755  # rmdir: mode to recreate


@dataclass
class _Fault:
    op: str
    err: int
    count: int
    skip: int
    match: str
    partial: bool
    fired: int = 0


def _build_fs() -> Any:
    """Import mfusepy (forcing libfuse3) and return the filesystem and FUSE classes."""
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    import mfusepy

    FuseOSError = mfusepy.FuseOSError

    class _Fuse(mfusepy.FUSE):  # type: ignore[misc]
        # mfusepy 3.1.1 drops the file handle of truncate/chmod/utimens under libfuse3; with
        # nullpath_ok the path is then None and ftruncate(fd) would fail with EINVAL.
        def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
            fh = fip.contents.fh if fip else None
            return self.operations.truncate(None if path is None else path.decode(), length, fh)  # type: ignore

        def chmod_fuse_3(self, path: bytes | None, mode: int, fip: Any) -> int:
            fh = fip.contents.fh if fip else None
            return self.operations.chmod(None if path is None else path.decode(), mode, fh)  # type: ignore

        def utimens_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
            fh = fip.contents.fh if fip else None
            times = None
            if buf:
                times = (mfusepy.time_of_timespec(buf.contents.actime, use_ns=True),
                         mfusepy.time_of_timespec(buf.contents.modtime, use_ns=True))
            return self.operations.utimens(None if path is None else path.decode(), times, fh)  # type: ignore

    class Plfs(mfusepy.Operations):  # type: ignore[misc]
        """The passthrough. Attribute names avoid FUSE op names (an attribute called `lock`
        would be registered as the lock op)."""

        use_ns = True

        def __init__(self, backing: str, status_path: str, ns_model: str) -> None:
            self._root = os.path.realpath(backing)
            self._status_path = status_path
            self._ns_model = ns_model
            self._stash = os.path.join(self._root, STASH_NAME)
            shutil.rmtree(self._stash, ignore_errors=True)
            os.mkdir(self._stash, 0o700)
            self._handles: dict[int, tuple[int, int, str]] = {}  # fh -> (fd, inode, path); fd -1 = ctl
            self._dirs: dict[int, tuple[str, int]] = {}  # fh -> (path, inode)
            self._next_fh = 10
            self._logs: dict[int, _FileLog] = {}
            self._ns: list[_NsOp] = []
            self._faults: list[_Fault] = []
            self._dead = False
            self._counts = {"writes": 0, "write_bytes": 0, "fsyncs": 0, "fsyncdirs": 0, "faults_fired": 0,
                            "ns_ops": 0}
            self._result: dict[str, Any] = {}
            self._write_status("mounted")

        # ------------------------------------------------------------ helpers

        def _real(self, path: str) -> str:
            return self._root + path

        def _alive(self) -> None:
            if self._dead:
                raise FuseOSError(errno.EIO)

        def _fault(self, op: str, path: str) -> _Fault | None:
            for fault in self._faults:
                if fault.op != op or (fault.match and fault.match not in path) or fault.count == 0:
                    continue
                if fault.skip > 0:
                    fault.skip -= 1
                    continue
                return fault
            return None

        def _fire(self, fault: _Fault) -> None:
            if fault.count > 0:
                fault.count -= 1
            fault.fired += 1
            self._counts["faults_fired"] += 1
            raise FuseOSError(fault.err)

        def _check(self, op: str, path: str) -> None:
            self._alive()
            if self._faults:
                fault = self._fault(op, path)
                if fault is not None:
                    self._fire(fault)

        def _new_fh(self) -> int:
            self._next_fh += 1
            return self._next_fh

        def _filelog(self, ino: int, fd: int) -> _FileLog:
            fl = self._logs.get(ino)
            if fl is None:
                private = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
                size = os.fstat(private).st_size
                fl = self._logs[ino] = _FileLog(private, size, size)
            return fl

        def _dir_of(self, path: str) -> tuple[int, int, str]:
            """O_PATH fd and inode of the directory holding `path`, and the entry name."""
            parent, name = os.path.split(path)
            dfd = os.open(self._real(parent) or "/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            return dfd, os.fstat(dfd).st_ino, name

        def _record(self, op: _NsOp) -> None:
            self._counts["ns_ops"] += 1
            self._ns.append(op)

        def _stash_entry(self, dfd: int, name: str) -> str:
            """Keep the object at dfd/name reachable from the stash, so its removal can be undone."""
            target = uuid.uuid4().hex
            st = os.lstat(name, dir_fd=dfd)
            if stat.S_ISDIR(st.st_mode):
                return ""  # only empty directories are removed; recreating them is enough
            os.link(name, target, src_dir_fd=dfd, dst_dir_fd=self._stash_fd(), follow_symlinks=False)
            return target

        def _stash_fd(self) -> int:
            fd = getattr(self, "_stash_dfd", -1)
            if fd < 0:
                fd = os.open(self._stash, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                self._stash_dfd = fd
            return fd

        def _write_status(self, state: str) -> None:
            if not self._status_path:
                return
            doc = {"state": state, "dead": self._dead, "pending_files": len(self._logs),
                   "pending_writes": sum(len(fl.entries) for fl in self._logs.values()),
                   "pending_ns_ops": len(self._ns), "faults": [f.__dict__ for f in self._faults],
                   **self._counts, "result": self._result}
            tmp = self._status_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(doc, f)
            os.replace(tmp, self._status_path)

        @staticmethod
        def _attrs(st: os.stat_result) -> dict[str, Any]:
            return {"st_mode": st.st_mode, "st_nlink": st.st_nlink, "st_uid": st.st_uid, "st_gid": st.st_gid,
                    "st_size": st.st_size, "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns,
                    "st_ctime": st.st_ctime_ns, "st_blocks": st.st_blocks, "st_blksize": st.st_blksize,
                    "st_rdev": st.st_rdev}

        # ------------------------------------------------------------ setup

        def init_with_config(self, conn: Any, config: Any) -> None:
            if config is not None:
                # nullpath_ok: operations on open-but-unlinked files keep working (readers
                # hold deleted segments open). libfuse then passes path=None to every op
                # that has a file handle, so everything below works on handles.
                config.nullpath_ok = 1
                config.hard_remove = 1  # no .fuse_hidden* renames
                config.use_ino = 0  # plain names from readdir need libfuse's inode numbers
            if conn is not None:
                # Every write must reach the daemon in order, when it happens.
                conn.want &= ~FUSE_CAP_WRITEBACK_CACHE

        def destroy(self, path: str) -> None:
            if not self._dead:
                # A clean unmount is a sync: everything that was written is on the disk.
                for fl in self._logs.values():
                    os.close(fl.fd)
                self._logs.clear()
                self._drop_ns(self._ns)
                shutil.rmtree(self._stash, ignore_errors=True)
            self._write_status("unmounted")

        # ------------------------------------------------------------ metadata

        def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
            if path == "/" + CTL_NAME:
                return {"st_mode": stat.S_IFREG | 0o600, "st_nlink": 1, "st_size": 0}
            self._alive()
            if fh is not None and fh in self._handles:
                if self._handles[fh][0] < 0:
                    return {"st_mode": stat.S_IFREG | 0o600, "st_nlink": 1, "st_size": 0}
                return self._attrs(os.fstat(self._handles[fh][0]))
            if path is None:
                raise FuseOSError(errno.EBADF)
            if path == "/" + STASH_NAME:
                raise FuseOSError(errno.ENOENT)
            return self._attrs(os.lstat(self._real(path)))

        def access(self, path: str, amode: int) -> int:
            return 0

        def statfs(self, path: str) -> dict[str, int]:
            sv = os.statvfs(self._root)
            return {k: getattr(sv, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                                "f_files", "f_ffree", "f_favail", "f_flag", "f_namemax")}

        def chmod(self, path: str | None, mode: int, fh: int | None = None) -> int:
            self._alive()
            if fh is not None and fh in self._handles:
                os.fchmod(self._handles[fh][0], mode)
            else:
                os.chmod(self._real(path or "/"), mode)
            return 0

        def chown(self, path: str | None, uid: int, gid: int) -> int:
            self._alive()
            os.lchown(self._real(path or "/"), uid, gid)
            return 0

        def utimens(self, path: str | None, times: tuple[int, int] | None = None, fh: int | None = None) -> int:
            self._alive()
            target: Any = self._handles[fh][0] if fh is not None and fh in self._handles else self._real(path or "/")
            try:
                if times is None:
                    os.utime(target)
                else:
                    os.utime(target, ns=times)
            except (OSError, ValueError):
                pass  # UTIME_NOW/UTIME_OMIT arrive as odd values through mfusepy; times are not modelled
            return 0

        def readlink(self, path: str) -> str:
            self._alive()
            return os.readlink(self._real(path))

        # ------------------------------------------------------------ directories

        def opendir(self, path: str) -> int:
            self._alive()
            fh = self._new_fh()
            self._dirs[fh] = (path, os.stat(self._real(path)).st_ino)
            return fh

        def readdir(self, path: str | None, fh: int) -> list[str]:
            self._alive()
            dpath = self._dirs[fh][0] if fh in self._dirs else path or "/"
            names = os.listdir(self._real(dpath))
            if dpath == "/":
                names = [n for n in names if n != STASH_NAME]
            return [".", "..", *names]

        def releasedir(self, path: str | None, fh: int) -> int:
            self._dirs.pop(fh, None)
            return 0

        def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
            dpath, ino = self._dirs.get(fh, (path or "/", -1))
            self._check("fsyncdir", dpath)
            self._counts["fsyncdirs"] += 1
            if self._ns_model == "journal":
                self._drop_ns(self._ns)
                self._ns = []
            else:
                durable = [op for op in self._ns if op.dir_ino == ino]
                if durable:
                    self._ns = [op for op in self._ns if op.dir_ino != ino]
                    self._drop_ns(durable)
            return 0

        def _drop_ns(self, ops: list[_NsOp]) -> None:
            """These entries are durable now: forget how to undo them."""
            for op in ops:
                for fd in (op.dfd, op.dfd2):
                    if fd >= 0:
                        os.close(fd)
                if op.stash:
                    try:
                        os.unlink(os.path.join(self._stash, op.stash))
                    except FileNotFoundError:
                        pass

        def mkdir(self, path: str, mode: int) -> int:
            self._check("mkdir", path)
            os.mkdir(self._real(path), mode)
            dfd, ino, name = self._dir_of(path)
            self._record(_NsOp("mkdir", dfd, ino, name))
            return 0

        def rmdir(self, path: str) -> int:
            self._check("unlink", path)
            dfd, ino, name = self._dir_of(path)
            mode = stat.S_IMODE(os.lstat(name, dir_fd=dfd).st_mode)
            try:
                os.rmdir(name, dir_fd=dfd)
            except OSError:
                os.close(dfd)
                raise
            self._record(_NsOp("rmdir", dfd, ino, name, mode=mode))
            return 0

        def unlink(self, path: str) -> int:
            self._check("unlink", path)
            dfd, ino, name = self._dir_of(path)
            try:
                stash = self._stash_entry(dfd, name)
                os.unlink(name, dir_fd=dfd)
            except OSError:
                os.close(dfd)
                raise
            self._record(_NsOp("unlink", dfd, ino, name, stash=stash))
            return 0

        def rename(self, old: str, new: str) -> int:
            self._check("rename", new)
            dfd, _ino, name = self._dir_of(old)
            dfd2, ino2, name2 = self._dir_of(new)
            try:
                stash = ""
                if os.path.lexists(self._real(new)):
                    stash = self._stash_entry(dfd2, name2)
                os.rename(name, name2, src_dir_fd=dfd, dst_dir_fd=dfd2)
            except OSError:
                os.close(dfd)
                os.close(dfd2)
                raise
            self._record(_NsOp("rename", dfd, ino2, name, dfd2=dfd2, name2=name2, stash=stash))
            return 0

        def symlink(self, target: str, source: str) -> int:
            self._check("create", target)
            os.symlink(source, self._real(target))
            dfd, ino, name = self._dir_of(target)
            self._record(_NsOp("create", dfd, ino, name))
            return 0

        def link(self, target: str, source: str) -> int:
            self._check("create", target)
            os.link(self._real(source), self._real(target))
            dfd, ino, name = self._dir_of(target)
            self._record(_NsOp("create", dfd, ino, name))
            return 0

        def mknod(self, path: str, mode: int, dev: int) -> int:
            self._check("create", path)
            os.mknod(self._real(path), mode, dev)
            dfd, ino, name = self._dir_of(path)
            self._record(_NsOp("create", dfd, ino, name))
            return 0

        # ------------------------------------------------------------ files

        def _open_fd(self, path: str, flags: int, mode: int = 0o600, extra: int = 0) -> tuple[int, int]:
            # O_APPEND must not reach the backing fd: the kernel already turned the append
            # into an offset, and pwrite on an O_APPEND fd would ignore it. O_DSYNC is not
            # needed either: the kernel sends FSYNC after such writes by itself.
            fd = os.open(self._real(path), (flags & ~_STRIP_FLAGS) | extra | os.O_RDWR | os.O_CLOEXEC, mode)
            return fd, os.fstat(fd).st_ino

        def open(self, path: str, flags: int) -> int:
            fh = self._new_fh()
            if path == "/" + CTL_NAME:
                self._handles[fh] = (-1, -1, path)
                return fh
            self._check("open", path)
            fd, ino = self._open_fd(path, flags)
            self._handles[fh] = (fd, ino, path)
            if flags & os.O_TRUNC:
                self._truncate_fd(fd, ino, 0)
            return fh

        def create(self, path: str, mode: int, flags: int = 0) -> int:
            self._check("create", path)
            existed = os.path.lexists(self._real(path))
            fd, ino = self._open_fd(path, flags, mode, os.O_CREAT | (flags & os.O_EXCL))
            fh = self._new_fh()
            self._handles[fh] = (fd, ino, path)
            if not existed:
                dfd, dino, name = self._dir_of(path)
                self._record(_NsOp("create", dfd, dino, name))
            elif flags & os.O_TRUNC:
                self._truncate_fd(fd, ino, 0)
            return fh

        def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
            fd, _ino, hpath = self._handles[fh]
            if fd < 0:
                return b""
            self._check("read", hpath)
            return os.pread(fd, size, offset)

        def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
            fd, ino, hpath = self._handles[fh]
            if fd < 0:
                return self._control(data)
            self._alive()
            if self._faults:
                fault = self._fault("write", hpath)
                if fault is not None:
                    if fault.partial and len(data) > 1:
                        fault.partial = False  # half now, the error on the next call
                        data = data[: len(data) // 2]
                    else:
                        self._fire(fault)
            fl = self._filelog(ino, fd)
            before = fl.size
            pre = os.pread(fl.fd, min(len(data), before - offset), offset) if offset < before else b""
            n = os.pwrite(fd, data, offset)
            fl.size = max(before, offset + n)
            fl.entries.append((offset, pre, before, fl.size, n))
            self._counts["writes"] += 1
            self._counts["write_bytes"] += n
            return n

        def _truncate_fd(self, fd: int, ino: int, length: int) -> None:
            fl = self._filelog(ino, fd)
            before = fl.size
            pre = os.pread(fl.fd, before - length, length) if length < before else b""
            os.ftruncate(fd, length)
            fl.size = length
            fl.entries.append((length, pre, before, length, -1))

        def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
            if fh is not None and fh in self._handles:
                fd, ino, hpath = self._handles[fh]
                self._check("truncate", hpath)
                self._truncate_fd(fd, ino, length)
                return 0
            assert path is not None
            self._check("truncate", path)
            fd = os.open(self._real(path), os.O_RDWR | os.O_CLOEXEC)
            try:
                self._truncate_fd(fd, os.fstat(fd).st_ino, length)
            finally:
                os.close(fd)
            return 0

        def fsync(self, path: str | None, datasync: int, fh: int) -> int:
            fd, ino, hpath = self._handles[fh]
            if fd < 0:
                return 0
            self._alive()
            fl = self._logs.get(ino)
            if self._faults:
                fault = self._fault("fsync", hpath)
                if fault is not None:
                    if fl is not None:
                        # fsyncgate: the kernel marked the pages clean although they never
                        # reached the disk; no later fsync will write them.
                        fl.poisoned.extend(fl.entries)
                        fl.entries = []
                    self._fire(fault)
            self._counts["fsyncs"] += 1
            if fl is not None:
                if fl.poisoned:
                    fl.entries = []
                    fl.synced_size = fl.size
                else:
                    os.close(fl.fd)
                    del self._logs[ino]
            if self._ns_model == "journal":
                self._drop_ns(self._ns)
                self._ns = []
            return 0

        def flush(self, path: str | None, fh: int) -> int:
            return 0

        def release(self, path: str | None, fh: int) -> int:
            entry = self._handles.pop(fh, None)
            if entry is not None and entry[0] >= 0:
                os.close(entry[0])
            return 0

        # ------------------------------------------------------------ control

        def _control(self, data: bytes) -> int:
            words = data.decode().split()
            try:
                if not words:
                    pass
                elif words[0] == "crash":
                    mode = words[1] if len(words) > 1 else "drop"
                    seed = int(words[2]) if len(words) > 2 else 0
                    tear = int(words[3]) if len(words) > 3 else 1
                    self._crash(mode, seed, max(1, tear))
                elif words[0] == "fail":
                    op, err, count = words[1], getattr(errno, words[2]), int(words[3])
                    skip = int(words[4]) if len(words) > 4 else 0
                    match = words[5] if len(words) > 5 and words[5] != "-" else ""
                    partial = "partial" in words[6:]
                    self._faults.append(_Fault(op, err, count, skip, match, partial))
                elif words[0] == "clear":
                    self._faults.clear()
                elif words[0] != "status":
                    raise ValueError(f"unknown command {words[0]!r}")
            except (ValueError, IndexError, AttributeError) as exc:
                self._result = {"error": str(exc)}
                self._write_status("error")
                raise FuseOSError(errno.EINVAL)
            self._write_status("crashed" if self._dead else "mounted")
            return len(data)

        def _crash(self, mode: str, seed: int, tear: int) -> None:
            if mode not in ("drop", "prefix", "pages"):
                raise ValueError(f"unknown crash mode {mode!r}")
            started = time.monotonic()
            rng = random.Random(seed)
            self._dead = True
            files: dict[str, Any] = {}
            for ino in sorted(self._logs):
                fl = self._logs[ino]
                files[str(ino)] = self._undo_file(fl, mode, rng, tear)
                os.close(fl.fd)
            self._logs.clear()
            ns = self._ns
            keep = rng.randint(0, len(ns)) if mode == "prefix" else 0
            undone = ns[keep:]
            for op in reversed(undone):
                self._undo_ns(op)
            self._drop_ns(ns[:keep])
            for op in undone:
                for fd in (op.dfd, op.dfd2):
                    if fd >= 0:
                        os.close(fd)
            self._ns = []
            shutil.rmtree(self._stash, ignore_errors=True)
            self._result = {"mode": mode, "seed": seed, "tear": tear, "files": files,
                            "ns_undone": [f"{op.kind} {op.name}" for op in undone], "ns_kept": keep,
                            "seconds": round(time.monotonic() - started, 4)}

        def _undo_file(self, fl: _FileLog, mode: str, rng: random.Random, tear: int) -> dict[str, Any]:
            entries = fl.entries
            fd = fl.fd
            info: dict[str, Any] = {"writes": len(entries), "poisoned": len(fl.poisoned)}
            if mode == "pages" and entries:
                info.update(self._undo_pages(fl, rng))
            elif entries:
                keep = rng.randint(0, len(entries) - 1) if mode == "prefix" else 0
                lost = entries[keep:]
                # Pre-images go back newest first, so each byte ends with its oldest pre-image;
                # one truncate at the end instead of one per entry (1.4 s -> 0.3 s for 100 k).
                for off, pre, _before, _after, _n in reversed(lost[1:]):
                    if pre:
                        os.pwrite(fd, pre, off)
                off, pre, before, _after, n = lost[0]
                torn = 0
                if mode == "prefix" and n > 0:
                    torn = rng.randrange(0, n, tear) if n > tear else 0
                if torn:
                    if len(pre) > torn:
                        os.pwrite(fd, pre[torn:], off + torn)
                    os.ftruncate(fd, max(before, off + torn))
                else:
                    if pre:
                        os.pwrite(fd, pre, off)
                    os.ftruncate(fd, before)
                info.update({"kept": keep, "torn_bytes": torn, "size": os.fstat(fd).st_size})
            for off, pre, before, _after, n in reversed(fl.poisoned):
                # Writes a failed fsync dropped: the old bytes, and zeros where there were none.
                size = os.fstat(fd).st_size
                if pre:
                    os.pwrite(fd, pre, off)
                if n > 0:
                    start, end = max(off, before), min(off + n, size)
                    if end > start:
                        os.pwrite(fd, bytes(end - start), start)
            info["size"] = os.fstat(fd).st_size
            return info

        def _undo_pages(self, fl: _FileLog, rng: random.Random) -> dict[str, Any]:
            fd = fl.fd
            old_size, new_size = fl.synced_size, fl.size
            pages: dict[int, bytearray] = {}
            for off, _pre, before, _after, n in fl.entries:
                end = off + n if n >= 0 else before
                for p in range(off // PAGE_BYTES, (max(end, off + 1) - 1) // PAGE_BYTES + 1):
                    if p not in pages:
                        pages[p] = bytearray(os.pread(fd, PAGE_BYTES, p * PAGE_BYTES).ljust(PAGE_BYTES, b"\0"))
            # The synced image of each dirty page: current bytes with pre-images applied newest first.
            for off, pre, _before, _after, _n in reversed(fl.entries):
                for i in range(0, len(pre)):
                    pos = off + i
                    page = pages.get(pos // PAGE_BYTES)
                    if page is not None:
                        page[pos % PAGE_BYTES] = pre[i]
            reverted = 0
            final = rng.choice([old_size, new_size])
            for p in sorted(pages):
                if rng.random() < 0.5:
                    continue
                reverted += 1
                image = pages[p]
                start = p * PAGE_BYTES
                # Past the synced size the old disk had nothing: a hole reads as zeros.
                keep = max(0, min(PAGE_BYTES, old_size - start))
                image[keep:] = bytes(PAGE_BYTES - keep)
                os.pwrite(fd, bytes(image), start)
            os.ftruncate(fd, final)
            return {"dirty_pages": len(pages), "reverted_pages": reverted, "old_size": old_size,
                    "new_size": new_size}

        def _undo_ns(self, op: _NsOp) -> None:
            try:
                if op.kind == "create":
                    os.unlink(op.name, dir_fd=op.dfd)
                elif op.kind == "mkdir":
                    shutil.rmtree(f"/proc/self/fd/{op.dfd}/{op.name}")
                elif op.kind == "rmdir":
                    os.mkdir(op.name, op.mode, dir_fd=op.dfd)
                elif op.kind == "unlink":
                    if op.stash:
                        os.rename(op.stash, op.name, src_dir_fd=self._stash_fd(), dst_dir_fd=op.dfd)
                elif op.kind == "rename":
                    os.rename(op.name2, op.name, src_dir_fd=op.dfd2, dst_dir_fd=op.dfd)
                    if op.stash:
                        os.rename(op.stash, op.name2, src_dir_fd=self._stash_fd(), dst_dir_fd=op.dfd2)
            except FileNotFoundError:
                pass  # a later durable entry moved it already

    return Plfs, _Fuse


def serve(backing: str, mountpoint: str, status_path: str, ns_model: str, threads: bool) -> None:
    """Mount plfs and serve until unmounted (the daemon process)."""
    os.umask(0)  # the kernel already applied the caller's umask to every mode we get
    plfs_cls, fuse_cls = _build_fs()
    fuse_cls(plfs_cls(backing, status_path, ns_model), mountpoint, foreground=True, nothreads=not threads,
             fsname="plfs", hard_remove=True)


# =========================================================================== the harness

_PR_SET_PDEATHSIG = 1
_MNT_DETACH = 2


def available() -> str:
    """Why plfs cannot run here, or "" when it can (root, /dev/fuse, libfuse3, mfusepy)."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if os.geteuid() != 0:
        return "mounting FUSE here needs root"
    import ctypes.util

    if ctypes.util.find_library("fuse3") is None:
        return "libfuse3 is not installed (apt-get install libfuse3-3)"
    try:
        import importlib.util

        if importlib.util.find_spec("mfusepy") is None:
            return "mfusepy is not installed (pip install mfusepy==3.1.1)"
    except ImportError:
        return "mfusepy is not installed"
    return ""


def _fuse_mounts() -> dict[str, str]:
    """Mount point -> "major:minor" of every FUSE mount (works for dead mounts too, unlike
    os.path.ismount, which returns False on ENOTCONN)."""
    found: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            if parts[sep + 1].startswith("fuse"):
                found[parts[4].replace("\\040", " ")] = parts[2]
    return found


def _set_pdeathsig() -> None:
    # The daemon unmounts itself (libfuse's SIGTERM handler) if the test process dies.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class PlfsError(RuntimeError):
    pass


class PlfsMount:
    """A plfs daemon serving `backing` at `mountpoint`; a context manager.

    `crash()` simulates power loss; after it, `stop()` and a new PlfsMount "reboot" the machine.
    """

    def __init__(self, backing: str | os.PathLike[str], mountpoint: str | os.PathLike[str], *,
                 ns_model: str = "posix", threads: bool = False) -> None:
        self.backing = os.path.realpath(backing)
        self.mountpoint = os.path.realpath(mountpoint)
        self.ns_model = ns_model
        self.threads = threads
        self.status_path = self.backing.rstrip("/") + ".plfs-status.json"
        self.proc: subprocess.Popen[bytes] | None = None
        self.dev = ""

    def start(self) -> PlfsMount:
        os.makedirs(self.backing, exist_ok=True)
        os.makedirs(self.mountpoint, exist_ok=True)
        if self.mountpoint in _fuse_mounts():
            raise PlfsError(f"{self.mountpoint} is already a FUSE mount")
        cmd = [sys.executable, os.path.abspath(__file__), self.backing, self.mountpoint,
               "--status", self.status_path, "--ns-model", self.ns_model]
        if self.threads:
            cmd.append("--threads")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, preexec_fn=_set_pdeathsig)
        deadline = time.monotonic() + MOUNT_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            dev = _fuse_mounts().get(self.mountpoint)
            if dev:
                self.dev = dev
                return self
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise PlfsError(f"plfs exited with {self.proc.returncode} before mounting: {err[-2000:]}")
            time.sleep(0.005)
        self.stop()
        raise PlfsError(f"plfs did not mount {self.mountpoint} within {MOUNT_TIMEOUT_SECONDS} s")

    def ctl(self, command: str) -> dict[str, Any]:
        """Send one command to the daemon; return its status JSON."""
        fd = os.open(os.path.join(self.mountpoint, CTL_NAME), os.O_WRONLY)
        try:
            os.write(fd, command.encode())
        except OSError as exc:
            raise PlfsError(f"plfs refused {command!r}: {exc}; status: {self.status()}") from exc
        finally:
            os.close(fd)
        return self.status()

    def status(self) -> dict[str, Any]:
        with open(self.status_path) as f:
            doc: dict[str, Any] = json.load(f)
        return doc

    def crash(self, mode: str = "drop", seed: int = 0, tear: int = 1) -> dict[str, Any]:
        """Power loss now; returns what was undone. The mount answers EIO from here on."""
        return self.ctl(f"crash {mode} {seed} {tear}")

    def fail(self, op: str, err: str, count: int = 1, *, skip: int = 0, match: str = "",
             partial: bool = False) -> None:
        """Make the next `count` calls of `op` fail with errno `err` (a name, e.g. "ENOSPC")."""
        self.ctl(f"fail {op} {err} {count} {skip} {match or '-'}{' partial' if partial else ''}")

    def clear_faults(self) -> None:
        self.ctl("clear")

    def stop(self) -> None:
        """Unmount (lazily and aborting the connection if files are still open); reap the daemon."""
        libc = ctypes.CDLL(None, use_errno=True)
        mounts = _fuse_mounts()
        if self.mountpoint in mounts:
            dev = mounts[self.mountpoint] or self.dev
            if libc.umount2(self.mountpoint.encode(), 0) != 0:
                # Busy (a process still holds a file) or dead: detach it and abort the
                # connection, or the daemon would wait for the last close.
                libc.umount2(self.mountpoint.encode(), _MNT_DETACH)
                self._abort(dev)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            if self.proc.stderr is not None:
                self.proc.stderr.close()
            self.proc = None

    @staticmethod
    def _abort(dev: str) -> None:
        minor = dev.split(":")[-1]
        ctl_dir = "/sys/fs/fuse/connections"
        if not os.path.isdir(os.path.join(ctl_dir, minor)):
            subprocess.run(["mount", "-t", "fusectl", "fusectl", ctl_dir], capture_output=True, check=False)
        try:
            with open(os.path.join(ctl_dir, minor, "abort"), "w") as f:
                f.write("1")
        except OSError:
            pass  # already gone

    def __enter__(self) -> PlfsMount:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="FUSE passthrough that simulates power loss")
    parser.add_argument("backing")
    parser.add_argument("mountpoint")
    parser.add_argument("--status", default="", help="JSON status file, rewritten after every command")
    parser.add_argument("--ns-model", choices=["posix", "journal"], default="posix")
    parser.add_argument("--threads", action="store_true", help="multi-threaded libfuse loop")
    args = parser.parse_args(argv)
    serve(args.backing, args.mountpoint, args.status, args.ns_model, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
