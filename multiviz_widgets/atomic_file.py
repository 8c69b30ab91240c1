"""Writing a file so that a crash leaves the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Callable, Iterator

try:
    import fcntl
except ImportError:              # pragma: no cover - not POSIX: saves are not serialized
    fcntl = None


def write_atomically(path: Path, write: Callable[[IO], None], *, binary: bool,
                     mode: int | None = None) -> None:
    """Call ``write(f)`` on a temporary file in ``path``'s folder, flush it to disk and rename it
    to ``path``. mode: the new file's permission bits (default: those of the file it replaces,
    else what the process's umask gives a new file, as ``open`` would; the temporary file's own
    0600 would make a file in a shared folder private).

    A symbolic link is followed: the file it points to is replaced (in that file's folder) and
    the link stays, as ``open(path, "w")`` would write through it."""
    path = _real(path)
    folder = _folder(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        try:
            opened = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")
        except BaseException:
            os.close(fd)
            raise
        with opened as f:            # closed however the rest ends: the descriptor never leaks
            if mode is None:
                try:
                    mode = path.stat().st_mode & 0o777
                except OSError:
                    mode = 0o666 & ~_umask()
            try:
                os.chmod(tmp, mode)
            except OSError:
                # a file system without Unix permissions (vfat, some CIFS/FUSE mounts) refuses
                # chmod (EPERM); its files' permissions come from how it is mounted, so there
                # are none to keep, and the data is written all the same
                pass
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _sync_folder(folder)


def _temporary_name(path: Path) -> re.Pattern:
    """The names of the temporary files ``write_atomically`` makes for ``path`` (a resolved
    path): ``.NAME.`` + mkstemp's 8 random characters + ``.tmp``. No other file's temporary has
    such a name (that of a file "NAME.x" has a dot between the two)."""
    return re.compile(re.escape(f".{path.name}.") + r"[A-Za-z0-9_]{8}\.tmp")


def remove_stale_temporaries(path: Path, older_than: float = 0.0) -> list[Path]:
    """Remove the temporary files that writes of ``path`` (``write_atomically``'s) left in its
    folder, last written more than ``older_than`` seconds ago: a write killed before its rename
    (SIGKILL, a crash, a power loss) leaves one, which nothing else removes. Only plain files of
    exactly that name (not a link, nor another file's); one that cannot be removed is left.
    Returns those removed.

    The caller decides which are stale: a temporary file of a write that is still going on must
    not be removed (its rename would fail). Removing every one (``older_than=0``) is safe only
    while holding ``path``'s :func:`file_lock` for real (it yields True) when every writer of
    ``path`` holds that lock while its temporary file exists; else give an age that no write in
    progress reaches."""
    path = _real(path)
    folder = _folder(path)
    pattern = _temporary_name(path)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    now, removed = time.time(), []
    for name in names:
        if not pattern.fullmatch(name):
            continue
        tmp = folder / name
        try:
            st = os.stat(tmp, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and now - st.st_mtime > older_than:
                os.unlink(tmp)
                removed.append(tmp)
        except OSError:              # gone meanwhile, or not ours to remove: left as it is
            continue
    return removed


def _real(path) -> Path:
    """``path`` with its symbolic links followed (also a link to a file not made yet), so that
    a write replaces the file a link points to, not the link, and a link and its file share
    one lock."""
    return Path(os.path.realpath(path))


def _sync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries to disk: until then a power loss may undo the rename (the old
    file back, or none). Where a folder cannot be opened or flushed (Windows, some network file
    systems), the rename stands as the file system keeps it; the write itself went through."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class LockTimeout(TimeoutError):
    """A lock was held longer than the caller would wait (``file_lock``'s timeout):
    ``lock_path`` is the lock file; ``in_process`` says which lock. False: another process held
    the lock file. True: another thread of this process held the process's own lock of it (a
    save of this process still writing), which no tool that lists a file's holders shows."""

    def __init__(self, lock_path: Path, waited: float, in_process: bool = False):
        who = ("another thread of this process held the lock of" if in_process
               else "another save held the lock file")
        super().__init__(errno.ETIMEDOUT, f"{who} {lock_path} for more than {waited:g} s",
                         str(lock_path))
        self.lock_path, self.waited, self.in_process = lock_path, waited, in_process


#: One lock per lock file within this process (fcntl's locks are the process's, so two threads
#: of one process would both get the file's).
_LOCAL_LOCKS: dict[str, threading.Lock] = {}
_LOCAL_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def file_lock(path: Path, timeout: float | None = None) -> Iterator[bool]:
    """Hold an exclusive lock for writing ``path`` meanwhile: a lock file beside it
    (``.NAME.lock``, made once and left there) locked with ``fcntl.lockf``, which other
    processes (NFS clients too, where the server keeps locks) wait for, and a lock of this
    process for its threads. A check of the file on disk and its replacement made under it
    cannot interleave with another writer's. The lock file gets the file's permissions (else
    what the umask gives), so those who may write the file may lock it, when its permissions
    give them write access (a group's file: umask 002). Where the lock file cannot be opened,
    made or locked (another user's 0644 file, a read-only folder, a file system without locks),
    only this process's lock is held.

    timeout: the most seconds to wait for both locks (None: as long as it takes); then a
    :class:`LockTimeout`, so that a process stopped while it holds the lock (paused in a
    debugger, a network file system that hangs) cannot freeze its caller. The lock file is
    polled (a blocking ``lockf`` could not be given up). A symbolic link is followed: the lock
    is the file's, beside the file, as :func:`write_atomically` writes the file.

    Yields whether the lock file is locked (False: only this process's lock is held, as where
    the lock file could not be used, or on a system without fcntl), so that a caller knows
    whether other processes' writers are kept out too."""
    path = _real(path)                  # a link to the file and the file: one lock
    key = str(path)
    lock_path = _folder(path) / f".{path.name}.lock"
    deadline = None if timeout is None else time.monotonic() + timeout
    with _LOCAL_LOCKS_GUARD:
        local = _LOCAL_LOCKS.setdefault(key, threading.Lock())
    if not local.acquire(timeout=-1 if deadline is None else max(0.0, timeout)):
        raise LockTimeout(lock_path, timeout, in_process=True)
    try:
        fd = None
        if fcntl is not None:
            timed_out = False
            try:
                fd = _open_lock_file(path)
                timed_out = not _lock_until(fd, deadline)
            except OSError:
                if fd is not None:
                    os.close(fd)
                fd = None
            if timed_out:
                os.close(fd)
                raise LockTimeout(lock_path, timeout)
        try:
            yield fd is not None
        finally:
            if fd is not None:
                os.close(fd)            # closing the lock file releases the lock
    finally:
        local.release()


def _lock_until(fd: int, deadline: float | None) -> bool:
    """Lock ``fd`` exclusively (``fcntl.lockf``), trying again while another process holds it,
    until ``deadline`` (``time.monotonic()``; None: no end): whether it was locked. An OSError
    other than "held by another" (no locks on this file system) is raised as it is."""
    if deadline is None:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        return True
    pause = 0.01
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.1)


def _open_lock_file(path: Path) -> int:
    """The descriptor of ``path``'s lock file, opened for writing (which fcntl's exclusive
    locks need); made, with the permissions of ``path`` (or the umask's), when missing."""
    lock = _folder(path) / f".{path.name}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return os.open(lock, os.O_RDWR)
    try:
        mode = path.stat().st_mode & 0o666
    except OSError:
        mode = 0o666 & ~_umask()
    try:
        os.fchmod(fd, mode)       # not masked by the umask: a group may share the folder
    except OSError:
        pass
    return fd


def _folder(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022
