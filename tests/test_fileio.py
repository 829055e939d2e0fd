"""Atomic writes: whole or nothing, and with ``fsync=True`` durable before and after the rename."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kosmos_g import fileio
from kosmos_g.fileio import atomic_dir, atomic_file, atomic_write_bytes, atomic_write_text


@pytest.fixture()
def events(monkeypatch):
    """Every fsync (by inode, and whether of a folder) and every rename, in order."""
    seen: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        seen.append(("fsync", st.st_ino, stat.S_ISDIR(st.st_mode)))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        seen.append(("replace", Path(src).name, Path(dst).name))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    monkeypatch.setattr(fileio.os, "replace", replace)
    return seen


def _index(events, event) -> int:
    return events.index(event)


def test_without_fsync_nothing_is_synced(tmp_path, events):
    atomic_write_text(tmp_path / "a.txt", "a")
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x").write_text("x")
    assert not [e for e in events if e[0] == "fsync"]


def test_atomic_file_fsync_syncs_the_file_before_and_the_folder_after_the_rename(tmp_path, events):
    path = atomic_write_bytes(tmp_path / "w.bin", b"123", fsync=True)
    assert path.read_bytes() == b"123"
    (rename,) = [e for e in events if e[0] == "replace"]
    assert rename[2] == "w.bin"
    file_sync = ("fsync", path.stat().st_ino, False)
    folder_sync = ("fsync", tmp_path.stat().st_ino, True)
    assert _index(events, file_sync) < _index(events, rename) < _index(events, folder_sync)
    atomic_write_text(tmp_path / "t.txt", "t", fsync=True)
    assert ("fsync", (tmp_path / "t.txt").stat().st_ino, False) in events
    with atomic_file(tmp_path / "f.bin", fsync=True) as tmp:
        tmp.write_bytes(b"f")
    assert ("fsync", (tmp_path / "f.bin").stat().st_ino, False) in events


def test_atomic_dir_fsync_syncs_every_file_and_folder_of_the_tree(tmp_path, events):
    with atomic_dir(tmp_path / "ckpt", fsync=True) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "a.bin").write_bytes(b"a")
        (tmp / "sub" / "b.bin").write_bytes(b"b")
    out = tmp_path / "ckpt"
    (rename,) = [e for e in events if e[0] == "replace"]
    for path in (out / "a.bin", out / "sub" / "b.bin", out / "sub", out):
        assert _index(events, ("fsync", path.stat().st_ino, path.is_dir())) < _index(events, rename), path
    assert _index(events, rename) < _index(events, ("fsync", tmp_path.stat().st_ino, True))


def test_atomic_dir_replace_moves_the_old_folder_aside_before_the_new_one_is_renamed(tmp_path, events):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.bin").write_text("old")
    with atomic_dir(out, replace=True, fsync=True) as tmp:
        (tmp / "new.bin").write_text("new")
    renames = [e for e in events if e[0] == "replace"]
    assert [(src.startswith(".ckpt.tmp-"), dst) for _, src, dst in renames] == [(False, "x"), (True, "ckpt")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert [p.name for p in out.iterdir()] == ["new.bin"]


def test_atomic_dir_puts_the_old_folder_back_when_the_new_one_cannot_be_renamed(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.bin").write_text("old")
    real_replace = os.replace

    def failing(src, dst, *args, **kwargs):
        if Path(dst).name == "ckpt" and Path(src).name.startswith(".ckpt.tmp-"):
            raise OSError("disk full")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(fileio.os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        with atomic_dir(out, replace=True) as tmp:
            (tmp / "new.bin").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no hidden temporaries either
    assert (out / "old.bin").read_text() == "old"


def test_failed_writes_leave_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "a.bin", fsync=True) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "d", fsync=True) as tmp:
            (tmp / "x").write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
