"""Atomic writes: a file or a directory appears whole, or not at all.

Everything is written under a temporary name in the same directory (so the final rename stays on one
filesystem, where it is atomic) and renamed into place when complete. A process killed midway leaves
at worst a dot-named temporary, never a partial file under the real name.
"""

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write `data` to `path`: readers see the old file or the whole new one (flushed to disk first)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        name_the_path(error, path)
        raise


def replace_directory(tmp: Path, path: Path) -> None:
    """Rename the finished directory `tmp` to `path`, replacing an existing `path` only at the end.

    rename() cannot replace a non-empty directory, so the old one is moved aside first and deleted last.
    """
    readable_as_umask_allows(tmp)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write into; when the block succeeds it replaces `path`,
    when it fails it is deleted and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed process that had the same pid
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        name_the_path(error, path)
        raise
    replace_directory(tmp, path)


def readable_as_umask_allows(directory: Path) -> None:
    """Give every file under `directory` the read permissions the umask allows: some writers
    (safetensors) create files 0600 whatever the umask, and a team shares a cluster's run directories."""
    umask = os.umask(0)
    os.umask(umask)  # the only way to read it
    for file in directory.rglob("*"):
        if file.is_file() and not file.is_symlink():
            file.chmod(file.stat().st_mode | (0o444 & ~umask))


def name_the_path(error: BaseException, path: Path) -> None:
    """A failed write (no space left, read-only file system) often names no file: name the one that
    was being written, so the message says where."""
    if isinstance(error, OSError) and error.strerror and not error.filename:
        error.filename = str(path)
