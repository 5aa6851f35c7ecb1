"""Output directories: one writer at a time, and a previous run moved aside, never deleted.

- `lock_directory` takes an exclusive `fcntl.flock` on a lock file for the life of the process. The
  OS releases it when the process ends however it ends (a SIGKILLed job leaves no stale lock), and
  the file names the holder's host and pid, so a second writer is refused with who holds it.
- `move_previous_run` puts what an earlier run wrote into an output directory into a dated
  `.previous-run-*` directory inside it (one rename per entry, nothing copied or deleted).
"""

import fcntl
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from kto_scale.config import ConfigError

LOCK_FILE = ".kto-scale.lock"
PREVIOUS_RUN = ".previous-run-"
_held: dict[Path, IO] = {}  # lock files this process holds, open for as long as it lives


class DirectoryBusy(ConfigError):
    """Another process is writing the same directory."""


def lock_directory(lock_file: str | Path, what: str) -> None:
    """Hold an exclusive lock on `lock_file` until this process exits; raise DirectoryBusy when another
    process holds it. `what` names the directory in the message. Taking a lock twice is a no-op."""
    lock_file = Path(lock_file).resolve()
    if lock_file in _held:
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(lock_file, "a+")  # never truncated before the lock is ours: it names the holder
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "an unknown process"
            handle.close()
            raise DirectoryBusy(f"{what} is in use by {holder} ({lock_file} is locked). Wait for that job to "
                                "end or stop it, or choose another directory.") from None
        if lock_file.exists() and os.stat(lock_file).st_ino == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()  # a finished holder removed the file between our open and our lock: take the new one
    handle.seek(0)
    handle.truncate()
    handle.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
    handle.flush()
    _held[lock_file] = handle


def unlock_and_remove(lock_file: str | Path) -> None:
    """Remove a lock file this process holds and release it (for locks that sit next to the output)."""
    lock_file = Path(lock_file).resolve()
    handle = _held.pop(lock_file, None)
    if handle is not None:
        lock_file.unlink(missing_ok=True)  # still locked: a newcomer opens a new file, see lock_directory
        handle.close()


def move_previous_run(output_dir: str | Path, run_files: re.Pattern) -> Path | None:
    """Move the entries of `output_dir` whose names match `run_files` (what a run writes; the user's
    own files, the lock and earlier moved-aside runs stay) into `<output_dir>/.previous-run-<UTC time>/`;
    return that directory, or None when there was nothing to move."""
    output_dir = Path(output_dir)
    entries = [p for p in sorted(output_dir.iterdir()) if run_files.fullmatch(p.name)]
    if not entries:
        return None
    name = f"{PREVIOUS_RUN}{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    aside, suffix = output_dir / name, 1
    while aside.exists():  # two overwrites within a second
        aside, suffix = output_dir / f"{name}-{suffix}", suffix + 1
    aside.mkdir()
    for entry in entries:
        os.replace(entry, aside / entry.name)  # same filesystem: each rename is atomic
    return aside


def overlapping_input(output: str | Path, inputs: list[Path]) -> Path | None:
    """The first input that `output` is, contains or lies inside (after resolving links and ".."):
    replacing `output` would delete it."""
    resolved = Path(output).resolve()
    for path in inputs:
        source = path.resolve()
        if resolved == source or resolved in source.parents or source in resolved.parents:
            return path
    return None


def replace_refusal(output: Path, inputs: list[Path], writes: Callable[[str], bool], what: str,
                    overwrite: bool = True) -> str | None:
    """Why `what` ("export", "evaluation") must not replace the directory `output` as a whole, or None:
    it is, holds or lies inside an input; it is a file; it is not empty and `overwrite` is off; or it
    holds files that `what` does not write (`writes(name)` is False), so it is not an earlier output."""
    clash = overlapping_input(output, [p for p in inputs if p.exists()])
    if clash:
        return (f"--output {output} contains or lies inside the input {clash}; replacing it would delete that "
                f"input. Write the {what} somewhere else.")
    if output.exists() and not output.is_dir():
        return f"--output {output} is a file; pass a directory path."
    present = sorted(p.name for p in output.iterdir()) if output.is_dir() else []
    if present and not overwrite:
        return f"--output {output} is not empty; pass --overwrite to replace it, or another path."
    foreign = [name for name in present if not writes(name)]
    if foreign:
        return (f"--output {output} holds files an {what} does not write ({', '.join(foreign[:5])}), so it is not "
                f"an earlier {what} output and will not be replaced. Choose another path.")
    return None
