"""Atomic file writes: temp file in the same folder, fsync, rename. A crash or a concurrent reader never sees
half a file, and the previous version stays intact until the new one is complete.

Files get the mode the process umask gives (``0o666 & ~umask``, as ``open`` would), not ``mkstemp``'s private 0600:
a results folder is shared. A crash mid-write leaves a hidden ``.<name>.XXXX.tmp``; ``remove_leftovers`` clears a
row's on its next run. A full disk (or quota) is a ``WriteError``: one line naming the file.
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path


class WriteError(RuntimeError):
    """A write that failed for want of space; ``str(e)`` is one line naming the file."""


def umask() -> int:
    """The process umask, read without changing it where Linux says it (/proc), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _disk_full(e: BaseException | None) -> OSError | None:
    """The ENOSPC / EDQUOT behind ``e`` (torch's serializer wraps it in a RuntimeError), or None."""
    for _ in range(8):
        if e is None:
            return None
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        e = e.__cause__ or e.__context__
    return None


def _temp(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~umask())
    return fd, tmp


def _raise_if_full(e: BaseException, path: Path) -> None:
    full = _disk_full(e)
    if full is not None:
        raise WriteError(f"cannot write {path}: {full.strerror.lower()} on its device; free space there (or pass "
                         "--results DIR to write elsewhere) and run again: finished rows are kept") from None


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w"):
    """``with atomic_open(p, "wb") as f: ...`` writes ``p`` all at once, or not at all."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = _temp(path)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        _raise_if_full(e, path)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def create_exclusive(path: str | Path, text: str) -> bool:
    """Write ``path`` with ``text`` only if it does not exist, atomically: a complete temp file hard-linked to the
    name (the link fails if the name exists; O_CREAT | O_EXCL where a filesystem has no hard links). True if this
    call created it, False if it was there."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = _temp(path)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this filesystem
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return True
    except OSError as e:
        _raise_if_full(e, path)
        raise
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def remove_leftovers(folder: str | Path, name: str) -> list[str]:
    """Delete the temp files a crashed ``atomic_open`` left for the files named ``name.*`` in ``folder`` (call it
    only while no other process writes them: under the row's lock); returns their names."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    gone = []
    for leftover in sorted(folder.glob(f".{name}.*.tmp")):
        leftover.unlink(missing_ok=True)
        gone.append(leftover.name)
    return gone
