"""Atomic writes: every file and folder the package writes appears whole or not at all.

A writer fills a temporary sibling (same folder, so the final ``os.replace`` is a rename
on one file system) and renames it into place only once it is complete; on error the
temporary is removed. Readers therefore never see a half-written checkpoint, shard,
image or sidecar, and a killed job leaves at most a hidden ``.NAME.tmp-*`` behind.
``fsync=True`` also makes the write survive a power loss (the data is on the disk before
the rename, the rename after it); training checkpoints and exports use it.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = atomic_write_text(Path(d) / "a.json", "{}")
    ...     with atomic_dir(Path(d) / "model") as tmp:
    ...         _ = (tmp / "config.json").write_text("{}")
    ...     sorted(p.name for p in Path(d).iterdir())
    ['a.json', 'model']
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_dir", "atomic_file", "atomic_write_bytes", "atomic_write_text", "prepare_output_dir"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _public_modes(root: Path) -> None:
    """Give ``root`` (and, for a folder, everything in it) the modes a plain ``mkdir``/``open``
    would have: ``mkdtemp``/``mkstemp`` make 0700 folders and 0600 files, which would lock
    other users out of a shared model folder."""
    umask = _umask()
    os.chmod(root, (0o777 if root.is_dir() else 0o666) & ~umask)
    if root.is_dir():
        for path in root.rglob("*"):
            if not path.is_symlink():
                os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _fsync_path(path: Path) -> None:
    """Flush ``path`` (a file, or a folder's list of entries) to the disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` (deepest first), then ``root`` itself."""
    if root.is_dir():
        for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if not path.is_symlink():
                _fsync_path(path)
    _fsync_path(root)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path``.

    The temporary name is unique (``mkstemp``), so concurrent writers never share one.
    ``fsync=True`` flushes the file to the disk before the rename and the folder after it,
    so that after a power loss ``path`` holds the old content or the whole new one.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     with atomic_file(Path(d) / "x.bin", fsync=True) as tmp:
        ...         _ = tmp.write_bytes(b"1")
        ...     (Path(d) / "x.bin").read_bytes()
        b'1'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _public_modes(tmp)
        if fsync:
            _fsync_path(tmp)
        os.replace(tmp, path)
        if fsync:
            _fsync_path(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (``fsync``: see :func:`atomic_file`); returns ``path``."""
    with atomic_file(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (``fsync``: see :func:`atomic_file`); returns ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, replace: bool = False, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``out_dir`` to fill; on success it becomes ``out_dir``.

    ``replace=False`` (the default) refuses an existing ``out_dir`` with ``FileExistsError``
    before anything is written; ``replace=True`` swaps the old folder out only after the new
    one is complete, so a reader sees the old folder or the new one, never a mixture: the old
    folder is first renamed aside (into a hidden ``.NAME.old-*``), then the new one renamed in,
    then the old one deleted. Should the second rename fail, the old folder is put back. A
    process killed between the two renames leaves no ``out_dir``, the old folder aside and the
    new one as its hidden temporary, both whole.

    ``fsync=True`` flushes every file and folder of the new tree before the rename and the
    parent folder after it (checkpoints: a power loss never leaves a renamed folder whose
    files were not yet on the disk).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     with atomic_dir(f"{d}/x") as tmp:
        ...         _ = (tmp / "a.txt").write_text("hi")
        ...     sorted(p.name for p in Path(d).iterdir())
        ['x']
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not replace:
        raise FileExistsError(f"{out_dir} already exists; remove it or choose another folder.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        _public_modes(tmp)
        if fsync:
            _fsync_tree(tmp)
        if out_dir.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, aside / "x")
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                os.replace(aside / "x", out_dir)
                aside.rmdir()
                raise
            if fsync:
                _fsync_path(out_dir.parent)
            shutil.rmtree(aside)
        else:
            os.replace(tmp, out_dir)
            if fsync:
                _fsync_path(out_dir.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def prepare_output_dir(folder: str | os.PathLike, *, option: str = "-o") -> Path:
    """Create ``folder`` (and its parents) and check that a file can be written in it, so a
    command refuses a folder that cannot take its outputs (a file in the way, no permission, a
    read-only file system) before any model loads, not after the compute is spent. ``option``
    names the command-line option in the messages. Returns the folder.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     prepare_output_dir(Path(d) / "out").is_dir()
        True
    """
    from .errors import CLIError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".kosmos-g-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except FileExistsError as e:  # mkdir: the folder exists and is not a folder
        raise NotADirectoryError(f"output folder {folder} is a file; pass {option} a folder.") from e
    except NotADirectoryError as e:  # mkdir: a folder above it is a file
        parent = next((p for p in folder.parents if p.exists()), folder.parent)
        raise NotADirectoryError(f"output folder {folder} cannot be made: {parent} is a file.") from e
    except PermissionError as e:
        raise PermissionError(f"output folder {folder} is not writable ({e.strerror}); "
                              f"pass {option} a folder you can write to.") from e
    except OSError as e:  # e.g. a read-only file system, a full disk
        raise CLIError(f"output folder {folder} cannot be written: {e.strerror or e}.") from e
    return folder
