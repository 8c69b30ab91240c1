"""Atomic writes and their lock: through a symbolic link, on a file system that refuses chmod."""
from __future__ import annotations

import errno
import os
import threading
import time

import pytest

from multiviz_widgets.atomic_file import (LockTimeout, file_lock, remove_stale_temporaries,
                                          write_atomically)

from .test_annotations import _hold_file_lock

needs_links = pytest.mark.skipif(not hasattr(os, "symlink") or os.name != "posix",
                                 reason="symbolic links: POSIX")


def _write(text: str):
    return lambda f: f.write(text)


@needs_links
def test_a_write_to_a_link_writes_the_file_it_points_to_and_keeps_the_link(tmp_path):
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    real.write_text("OLD")
    link.symlink_to(real)
    write_atomically(link, _write("NEW"), binary=False)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text() == "NEW"
    assert sorted(os.listdir(tmp_path)) == ["link.json", "real.json"]   # no temporary left


@needs_links
def test_a_link_to_a_file_in_another_folder_not_made_yet_makes_that_file(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "links").mkdir()
    real, link = tmp_path / "data" / "c.json", tmp_path / "links" / "c.json"
    link.symlink_to(real)
    write_atomically(link, _write("{}"), binary=False)
    assert link.is_symlink() and real.read_text() == "{}"


@needs_links
def test_a_link_and_its_file_share_one_lock(tmp_path):
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    real.write_text("OLD")
    link.symlink_to(real)
    release, outcome = threading.Event(), []
    t = _hold_file_lock(real, release)
    try:
        try:
            with file_lock(link, timeout=0.2):
                outcome.append("taken while the file's lock was held")
        except LockTimeout as e:
            outcome.append(e.lock_path.name)
    finally:
        release.set()
        t.join(10)
    assert outcome == [".real.json.lock"]
    with file_lock(link, timeout=5):          # free again
        pass


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_a_file_system_that_refuses_chmod_still_gets_the_data_and_no_descriptor_leaks(
        tmp_path, monkeypatch):
    """vfat, CIFS and some FUSE mounts refuse chmod (EPERM): their permissions come from the
    mount, so the save goes on without them."""
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "chmod", refuse)
    monkeypatch.setattr(os, "fchmod", refuse, raising=False)
    path = tmp_path / "c.json"
    path.write_text("OLD")
    before = len(os.listdir("/proc/self/fd"))
    for i in range(3):
        write_atomically(path, _write(f"NEW {i}"), binary=False)
        with pytest.raises(RuntimeError):          # a write that fails leaks nothing either
            write_atomically(path, lambda f: (_ for _ in ()).throw(RuntimeError("boom")),
                             binary=True)
    assert len(os.listdir("/proc/self/fd")) == before
    assert path.read_text() == "NEW 2" and os.listdir(tmp_path) == ["c.json"]


@pytest.mark.skipif(os.name != "posix", reason="fcntl locks: POSIX only")
def test_the_lock_says_whether_the_lock_file_is_held_and_stale_temporaries_go_by_age(
        tmp_path, monkeypatch):
    """file_lock yields whether other processes are kept out (the lock file locked), which
    tells a caller whether any temporary file of the file is a dead writer's; without it, only
    those older than the age given are removed, of that file only."""
    import multiviz_widgets.atomic_file as atomic_file
    path = tmp_path / "c.json"
    with file_lock(path) as locked:
        assert locked is True
    monkeypatch.setattr(atomic_file, "_open_lock_file", _no_locks)
    with file_lock(path) as locked:
        assert locked is False
    names = [".c.json.a1b2c3d4.tmp", ".c.json.old_0000.tmp", ".d.json.a1b2c3d4.tmp"]
    for name in names:
        (tmp_path / name).write_text("{")
    os.utime(tmp_path / names[1], (time.time() - 7200, time.time() - 7200))
    assert remove_stale_temporaries(path, 3600) == [tmp_path / names[1]]
    assert sorted(os.listdir(tmp_path)) == sorted([names[0], names[2], ".c.json.lock"])
    assert remove_stale_temporaries(path) == [tmp_path / names[0]]
    assert (tmp_path / names[2]).exists()


def _no_locks(path):
    raise OSError(37, "No locks available")
