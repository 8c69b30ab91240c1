"""Writing a file so that a crash leaves the old file or the new one, never half of one."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable


def write_atomically(path: Path, write: Callable[[IO], None], *, binary: bool,
                     mode: int | None = None) -> None:
    """Call ``write(f)`` on a temporary file in ``path``'s folder, flush it to disk and rename it
    to ``path``. mode: the new file's permission bits (default: those of the file it replaces,
    else 0o644; the temporary file's own 0600 would make a file in a shared folder private)."""
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        if mode is None:
            try:
                mode = path.stat().st_mode & 0o777
            except OSError:
                mode = 0o644
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
