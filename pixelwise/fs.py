"""Atomic file writes, the one place every writer of pixelwise goes through.

Writers write to a temporary file in the destination folder and ``os.replace`` it onto the
final name, so a reader never sees a half-written file and an interrupted write leaves the
old file (or nothing) in place.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Literal

from pixelwise.errors import DataError

__all__ = ["DiskFullError", "atomic_directory", "atomic_open", "atomic_write_bytes", "atomic_write_text"]


class DiskFullError(DataError):
    """The disk (or quota) filled up while writing ``path``; the temporary file is gone and the
    previous file, if any, is untouched. One line: "no space left on device while writing FILE;
    nothing was replaced"."""

    def __init__(self, path: object):
        super().__init__(path, "no space left on device", "free some space and run again")
        Exception.__init__(self, f"no space left on device while writing {self.path}; nothing was replaced")


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: Literal["wb", "w"] = "wb", *, fsync: bool = True,
                encoding: str = "utf-8") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on a clean exit it replaces ``path``.

    The temporary file is ``.<name>.<random>.tmp`` in the same folder (same file system, so
    the final ``os.replace`` is atomic) and is removed if the block raises. The file gets the
    usual permissions (0o666 minus the umask). A full disk raises :class:`DiskFullError`
    (one line, the old file kept). ``fsync=True`` flushes it to disk before the
    rename, so a crash cannot leave an empty file under the final name.

    Example::

        with atomic_open("model.pt") as f:
            torch.save(state, f)
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    folder = path.parent
    while True:
        tmp = folder / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue
    try:
        with os.fdopen(fd, mode, **({"encoding": encoding, "newline": ""} if mode == "w" else {})) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            raise DiskFullError(path) from None
        raise


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`); returns the path."""
    with atomic_open(path, "wb", fsync=fsync) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, *, encoding: str = "utf-8", fsync: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_open`); returns the path."""
    return atomic_write_bytes(path, text.encode(encoding), fsync=fsync)


@contextlib.contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name; on a clean exit it is renamed to ``path``.

    Yields the temporary folder (``.<name>.<random>.tmp`` next to ``path``) to fill. If the
    block raises, the temporary folder is deleted and ``path`` is untouched, so a
    half-written dataset is never left behind. An existing ``path`` is replaced only when it
    is empty or ``overwrite=True``.

    Raises:
        DataError: ``path`` is a file, or a non-empty folder and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise DataError(path, "exists and is not a folder", "choose another output folder")
        if not overwrite and any(path.iterdir()):
            raise DataError(path, "output folder exists and is not empty",
                            "pass overwrite=True (CLI: --overwrite) or choose another folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(4)
    tmp = path.parent / f".{path.name}.{token}.tmp"
    tmp.mkdir()
    old = path.parent / f".{path.name}.{token}.old"
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)  # the previous content, deleted once the new one is in place
        try:
            os.replace(tmp, path)
        except BaseException:
            if old.exists():
                os.replace(old, path)
            raise
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, DiskFullError) or (isinstance(e, OSError) and e.errno in _DISK_FULL):
            raise DiskFullError(path) from None
        raise
    shutil.rmtree(old, ignore_errors=True)
