"""Writing a file so that a crash leaves the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import os
import tempfile
import threading
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
    0600 would make a file in a shared folder private)."""
    folder = _folder(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        if mode is None:
            try:
                mode = path.stat().st_mode & 0o777
            except OSError:
                mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
        opened = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")
        with opened as f:
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


#: One lock per lock file within this process (fcntl's locks are the process's, so two threads
#: of one process would both get the file's).
_LOCAL_LOCKS: dict[str, threading.Lock] = {}
_LOCAL_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock for writing ``path`` meanwhile: a lock file beside it
    (``.NAME.lock``, made once and left there) locked with ``fcntl.lockf``, which other
    processes (NFS clients too, where the server keeps locks) wait for, and a lock of this
    process for its threads. A check of the file on disk and its replacement made under it
    cannot interleave with another writer's. The lock file gets the file's permissions (else
    what the umask gives), so those who may write the file may lock it, when its permissions
    give them write access (a group's file: umask 002). Where the lock file cannot be opened,
    made or locked (another user's 0644 file, a read-only folder, a file system without locks),
    only this process's lock is held."""
    key = str(_folder(path).resolve() / path.name)
    with _LOCAL_LOCKS_GUARD:
        local = _LOCAL_LOCKS.setdefault(key, threading.Lock())
    with local:
        fd = None
        if fcntl is not None:
            try:
                fd = _open_lock_file(path)
                fcntl.lockf(fd, fcntl.LOCK_EX)
            except OSError:
                if fd is not None:
                    os.close(fd)
                fd = None
        try:
            yield
        finally:
            if fd is not None:
                os.close(fd)            # closing the lock file releases the lock


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
