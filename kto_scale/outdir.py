"""Output directories: what a run owns, one writer at a time, and previous runs set aside, never deleted.

- Ownership: a directory kto-scale writes into holds `.kto-scale-owned.json`, the names of the entries
  kto-scale wrote there. Only those are ever replaced, moved, rotated or deleted; anything else is the
  user's, and an entry that merely has a name kto-scale would write (`adapter/`, `metrics.jsonl`, an HF
  Trainer's `checkpoint-500/`) stops the command with the list, before anything is written.
- `lock_directory` takes an exclusive `fcntl.flock` on a lock file for the life of the process. The
  OS releases it when the process ends however it ends (a SIGKILLed job leaves no stale lock), and
  the file names the holder's host and pid, so a second writer is refused with who holds it.
- A training run's output_dir: `prepare_output_dir` claims it (refusing inputs inside it, someone's
  files, or a run it would overwrite) and `set_aside_previous_run` moves an earlier run into a dated
  `.previous-run-*` directory inside it (one rename per entry, nothing copied or deleted).
"""

import fcntl
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

from kto_scale.atomic import write_atomic
from kto_scale.config import ConfigError, KTOConfig

logger = logging.getLogger(__name__)

LOCK_FILE = ".kto-scale.lock"
OWNED = ".kto-scale-owned.json"
PREVIOUS_RUN = ".previous-run-"
LATEST = "latest"
CHECKPOINT = re.compile(r"checkpoint-(\d+)")
# What a training run writes into output_dir besides checkpoint-<step>/ (the prepared data lives in prepared_data_dir).
RUN_NAMES = ("adapter", "base_model", LATEST, "kto_config.yaml", "config_changes.jsonl", "metrics.jsonl",
             "generations.jsonl", "plots.png", "tensorboard", "wandb")
INPUTS = ("model_name_or_path", "sft_adapter", "dataset_name", "eval_dataset_name", "ref_cache")
_held: dict[Path, IO] = {}  # lock files this process holds, open for as long as it lives


class DirectoryBusy(ConfigError):
    """Another process is writing the same directory."""


# --- ownership ------------------------------------------------------------------------------------


def owned(directory: str | Path) -> set[str]:
    """The names of the entries of `directory` that kto-scale recorded writing."""
    path = Path(directory) / OWNED
    return set(json.loads(path.read_text())["owned"]) if path.is_file() else set()


def record_owned(directory: str | Path, names: Iterable[str]) -> None:
    """Record `names` as kto-scale's in `directory` (one process writes it: rank 0). Called before the
    entries are created, so a kill in between leaves a name recorded for an entry that is not there."""
    known = owned(directory)
    if not known.issuperset(names):
        Path(directory).mkdir(parents=True, exist_ok=True)
        write_atomic(Path(directory) / OWNED, json.dumps({"owned": sorted(known.union(names))}, indent=1))


def record_contents(directory: Path) -> None:
    """Record every entry of a directory written as a whole (an evaluation, a merge) as kto-scale's."""
    record_owned(directory, [p.name for p in directory.iterdir()])


def refuse_unrecorded(directory: Path, looks_ours: Callable[[str], bool], what: str) -> None:
    """Refuse a directory holding entries named like what kto-scale writes there (`looks_ours`) that
    it did not record: they are someone's own and would be replaced."""
    known = owned(directory)
    present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    foreign = [name for name in present if looks_ours(name) and name not in known]
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(f"{what} {directory} holds {listed}, which no kto-scale run recorded writing there "
                          f"({OWNED}): they are someone's own files and kto-scale never replaces, moves or deletes "
                          f"them. Move them out, or choose another {what}.")


# --- locks ----------------------------------------------------------------------------------------


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
    foreign = [name for name in present if not writes(name) and name != OWNED]
    if foreign:
        return (f"--output {output} holds files an {what} does not write ({', '.join(foreign[:5])}), so it is not "
                f"an earlier {what} output and will not be replaced. Choose another path.")
    try:  # named like an earlier output's files, but not recorded as one
        refuse_unrecorded(output, lambda name: name != OWNED, "--output")
    except ConfigError as error:
        return str(error)
    return None


# --- a training run's output_dir ------------------------------------------------------------------


def _looks_like_run(name: str) -> bool:
    return name in RUN_NAMES or bool(CHECKPOINT.fullmatch(name))


def checkpoints(output_dir: str | Path) -> list[Path]:
    """This run's complete checkpoint directories, oldest first (a checkpoint-N kto-scale did not
    record writing, e.g. an HF Trainer's, is not one of them)."""
    output_dir = Path(output_dir)
    found = [output_dir / n for n in owned(output_dir) if CHECKPOINT.fullmatch(n) and (output_dir / n).is_dir()]
    return sorted(found, key=lambda p: int(CHECKPOINT.fullmatch(p.name).group(1)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint `<output_dir>/latest` names, or None when the run saved none yet."""
    output_dir = Path(output_dir)
    if LATEST not in owned(output_dir) or not (output_dir / LATEST).is_file():
        return None
    path = output_dir / (output_dir / LATEST).read_text().strip()
    if path not in checkpoints(output_dir):
        raise ConfigError(f"{output_dir / LATEST} names {path.name}, which is not a checkpoint of this run (missing, "
                          "or not written by kto-scale): resume from another checkpoint by path, or start afresh.")
    return path


def refuse_inputs_inside(config: KTOConfig, output: Path, what: str) -> None:
    """Refuse any local input that is, holds or lies inside `output` (output_dir, a ref_cache): whatever
    the options, a command must never be able to replace, move or set aside what it reads."""
    for name in INPUTS:
        value = getattr(config, name)
        if value and Path(value).exists() and Path(value).resolve() != output.resolve() and overlapping_input(
                output, [Path(value)]):
            raise ConfigError(f"{name} {value} lies inside {what} {output} (or holds it): copy it out of "
                              f"{what}, or choose another {what}.")


def _run_entries(output: Path) -> list[str]:
    """What an earlier run left in output: its recorded entries, less the set-aside runs."""
    return sorted(n for n in owned(output) if not n.startswith(PREVIOUS_RUN) and (output / n).exists())


def _previous_run(config: KTOConfig) -> bool:
    """Whether output_dir holds an earlier run to set aside before this one writes; raise ConfigError
    when it holds one this run may neither continue nor set aside."""
    output = Path(config.output_dir)
    run = _run_entries(output)
    if not run:
        return False
    resume = config.resume_from_checkpoint
    if resume and (resume != "latest" or latest_checkpoint(output)):
        return False  # continue it
    if config.overwrite_output_dir:
        return True
    finished = "adapter" in run
    if resume and not finished:  # a requeued job that died before its first checkpoint: start over
        logger.warning("%s holds a run that saved no checkpoint before it stopped: starting over.", output)
        return True
    if resume:
        raise ConfigError(f"{output} holds a finished run with no checkpoint to resume (it saved none): pass "
                          "--overwrite_output_dir true to move it into .previous-run-*, or choose another output_dir.")
    raise ConfigError(f"{output} already holds a run ({', '.join(run[:4])}): pass --resume_from_checkpoint latest "
                      "to continue it, --overwrite_output_dir true to move it aside, or choose another output_dir.")


def prepare_output_dir(config: KTOConfig) -> None:
    """Claim output_dir for this run and lock it (rank 0 calls, for the life of the process).

    Refused: an input inside it, someone's files named like a run's, a run it would overwrite. Nothing
    is moved here: `set_aside_previous_run` does that once the run has passed its checks.
    """
    output = Path(config.output_dir)
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output_dir {output} is a file: choose a directory path.")
    refuse_inputs_inside(config, output, "output_dir")
    lock_directory(output / LOCK_FILE, f"output_dir {output}")
    refuse_unrecorded(output, _looks_like_run, "output_dir")
    _previous_run(config)


def set_aside_previous_run(config: KTOConfig) -> None:
    """Move an earlier run in output_dir into `.previous-run-<time>/` inside it (see `_previous_run`),
    then record the names this run writes (rank 0 calls). Nothing is deleted unless keep_previous_runs."""
    output = Path(config.output_dir)
    if _previous_run(config):
        aside = move_previous_run(output, _run_entries(output))
        if config.keep_previous_runs is not None:
            previous = previous_runs(output)
            for old in previous[: max(len(previous) - config.keep_previous_runs, 0)]:
                logger.warning("keep_previous_runs=%d: deleting %s (%s).", config.keep_previous_runs, old, _size(old))
                shutil.rmtree(old)
        previous = previous_runs(output)
        logger.warning("The previous run in %s (%s) was moved to %s; %d set-aside run(s) there hold %s in all. "
                       "Nothing else is deleted: remove one with `rm -r %s` when you no longer need it, or set "
                       "keep_previous_runs.", output, _size(aside), aside, len(previous), _size(*previous), aside)
    record_owned(output, RUN_NAMES)


def move_previous_run(output_dir: Path, names: list[str]) -> Path:
    """Move the entries `names` of `output_dir` into a new `<output_dir>/.previous-run-<UTC time>/`, with
    an ownership record listing them (it marks the folder as set aside by kto-scale); return it."""
    now = time.time()  # to the microsecond: the names sort oldest first, however fast runs follow each other
    name = f"{PREVIOUS_RUN}{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}.{int(now % 1 * 1e6):06d}"
    aside, suffix = output_dir / name, 1
    while aside.exists():  # two overwrites within a second
        aside, suffix = output_dir / f"{name}-{suffix}", suffix + 1
    present = [n for n in names if (output_dir / n).exists()]
    record_owned(output_dir, [aside.name])
    aside.mkdir()
    record_owned(aside, present)
    for entry in present:
        os.replace(output_dir / entry, aside / entry)  # same filesystem: each rename is atomic
    write_atomic(output_dir / OWNED, json.dumps({"owned": sorted(owned(output_dir) - set(present))}, indent=1))
    return aside


def previous_runs(output_dir: Path) -> list[Path]:
    """The runs kto-scale set aside in `output_dir`, oldest first."""
    names = [n for n in owned(output_dir) if n.startswith(PREVIOUS_RUN) and (output_dir / n / OWNED).is_file()]
    return [output_dir / n for n in sorted(names)]


def _size(*paths: Path) -> str:
    total = float(sum(f.stat().st_size for p in paths for f in p.rglob("*") if f.is_file() and not f.is_symlink()))
    for unit in ("B", "KB", "MB"):
        if total < 1024:
            return f"{total:.1f} {unit}"
        total /= 1024
    return f"{total:.1f} GB"
