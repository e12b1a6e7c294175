"""Durable file writes: after a crash or a power loss a file holds what was written in full, or its
earlier content, never a part.

    write_durably(path, write)     create `path`, write(f) into it, flush, fsync: on disk once it returns
    write_atomic(path, write)      the same into a hidden temporary beside `path`, renamed over `path`,
                                   the rename made durable: a reader sees the old file or the new one
    write_text_atomic(path, text)  write_atomic of a UTF-8 text
    fsync_dir(directory)           make the renames and creations inside `directory` durable

A rename is atomic only within one filesystem, hence the temporary in `path`'s own folder; it is on
disk only once the folder itself is fsync-ed (POSIX: the directory entry is the folder's data).
"""

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_durably(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Create (or truncate) `path`, let `write` fill it, and fsync it before returning."""
    with open(path, "wb") as f:
        _fill(f, write)


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Replace `path` by what `write` writes, atomically and durably; a failure leaves `path` as it was
    and no temporary behind."""
    path = Path(path)
    # A unique hidden name: two writers of one path never share a temporary. os.open with 0o666 lets
    # the umask set the usual permissions (tempfile.mkstemp would give 0o600).
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            _fill(f, write)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _fill(f: BinaryIO, write: Callable[[BinaryIO], object]) -> None:
    write(f)
    f.flush()
    os.fsync(f.fileno())


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace `path` by `text` (UTF-8), atomically and durably."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def fsync_dir(directory: str | Path) -> None:
    """Make a rename or creation inside `directory` durable (a no-op where a folder cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
