"""What every launch script shares: `--help` (every KTOConfig option with its type, default and
meaning, read from the fields' docstrings in config.py, the one place an option is documented),
`run_command`, which turns the errors a user can act on into one line, and `config_from_command_line`,
a config-driven script's start.

Torch-free, like kto_scale.config: a script answers --help and a mistyped option from these two before
it imports torch, transformers and deepspeed (seconds of CPU), which it does only once the config
is known to be good.
"""

import ast
import dataclasses
import inspect
import logging
import os
import sys
import types
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from kto_scale.config import KTOConfig
from kto_scale.config_io import load_config
from kto_scale.preemption import REQUEUE_EXIT, Preempted

T = TypeVar("T")


def _field_docs() -> dict[str, str]:
    """Each KTOConfig field's docstring (the string under it in config.py): the one source of --help."""
    tree = ast.parse(inspect.getsource(KTOConfig))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _type_name(annotation: object) -> str:
    options = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if isinstance(annotation, types.UnionType) and len(options) > 1:
        return "|".join(_type_name(a) for a in options)
    option = options[0]
    return "LIST" if typing.get_origin(option) is list else getattr(option, "__name__", str(option)).upper()


def options_help() -> str:
    """Every option: `--name TYPE (default: value)` and its meaning, from the dataclass and its docs."""
    docs, hints = _field_docs(), typing.get_type_hints(KTOConfig)
    lines = ["options (--config FILE.yaml first, then any of these as --name value; values are YAML):"]
    for f in dataclasses.fields(KTOConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        lines += [f"  --{f.name} {_type_name(hints[f.name])} (default: {default})", f"      {docs.get(f.name, '')}"]
    return "\n".join(lines)


def exit_if_help(argv: list[str], usage: str) -> None:
    """For the config-driven scripts: print `usage` and every option, then exit, on -h/--help."""
    if "-h" in argv or "--help" in argv:
        print(f"usage: {usage.strip()}\n\n{options_help()}")
        raise SystemExit(0)


def os_error_line(error: OSError) -> str:
    """`PATH: No space left on device` (or Read-only file system, Permission denied, ...)."""
    cause = error.strerror or str(error)
    return f"{error.filename}: {cause}" if error.filename else cause


def run_command(work: Callable[[], T]) -> T:
    """Run a launch script's job. The library raises ValueError (ConfigError, DataError, ...) for the
    user's input and RuntimeError for a run that failed (e.g. max_bad_steps), OSError for a disk that is
    full, read-only or not ours to write: each ends the script with one line `error: ...` and exit code 1,
    not a traceback (KTO_SCALE_TRACEBACK=1 shows it). A run stopped by SIGTERM exits with REQUEUE_EXIT."""
    try:
        return work()
    except Preempted as stopped:
        from kto_scale.distributed import exit_without_teardown  # here only: plot.py need not load deepspeed

        if os.environ.get("RANK", "0") == "0":  # one line for the job, not one per rank
            print(stopped, file=sys.stderr)
        exit_without_teardown(REQUEUE_EXIT)
    except (ValueError, RuntimeError, OSError) as error:
        if os.environ.get("KTO_SCALE_TRACEBACK") == "1":
            raise
        sys.exit(f"error: {os_error_line(error) if isinstance(error, OSError) else error}")


def config_from_command_line(argv: list[str], usage: str, default_config: str | Path | None = None) -> KTOConfig:
    """A config-driven script's start, before its heavy imports: --help (`usage` and every option), the
    log format, and the config from `argv` (--config FILE first, then --name value), validated. A
    mistake in it ends the script with one line `error: ...`."""
    exit_if_help(argv, usage)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # DeepSpeed calls torch.distributed functions that torch has deprecated: one warning per call.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    return run_command(lambda: load_config(argv, default_config))
