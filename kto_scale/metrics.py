"""Training metrics: a JSONL file always, plus Weights & Biases and/or TensorBoard when asked.

`output_dir/metrics.jsonl` is the source of truth (the plot script reads it). Each line is one JSON
object:

    {"step": 120, "split": "train", "time": 1718000000.5, "loss": 0.41, "kl": 0.02, ...}

A metric that is missing, None, NaN or infinite is left out of the line (and out of wandb and
TensorBoard) rather than written as null: JSON has no NaN, and a line without a key is what a reader
sees when the trainer had nothing to report (e.g. no undesirable examples in the logging window).

Only rank 0 should log. Every rank constructs the logger (with enabled=(rank == 0)) so that a bad
`report_to` fails on all ranks alike instead of killing rank 0 while the others wait in a collective.
"""

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

from kto_scale.atomic import write_atomic

METRICS_FILE = "metrics.jsonl"
REPORTERS = ("wandb", "tensorboard", "none")
SPLITS = ("train", "eval")
_RESERVED_KEYS = ("step", "split", "time")


def _finite_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics as plain floats, without None, NaN and +-inf (which JSON cannot hold).

    float() also unwraps 0-d torch tensors and numpy scalars, so the trainer may pass either.
    """
    values = {key: float(value) for key, value in metrics.items() if value is not None}
    return {key: value for key, value in values.items() if math.isfinite(value)}


def _check_report_to(report_to: list[str]) -> None:
    """Raise ValueError if `report_to` names an integration this logger does not know."""
    unknown = [name for name in report_to if name not in REPORTERS]
    if unknown:
        raise ValueError(f"unknown report_to {unknown}; valid entries are {list(REPORTERS)}")


def _start_wandb(output_dir: Path, run_config: dict, run_name: str | None) -> Any:
    """Start a wandb run in `output_dir`/wandb, project from $WANDB_PROJECT (default "kto-scale")."""
    # Imported here: wandb is slow to import and only needed when asked for.
    import wandb

    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "kto-scale"),
        name=run_name,
        config=run_config,
        dir=str(output_dir),
    )


class MetricsLogger:
    """Writes metrics to metrics.jsonl and the requested integrations; does nothing when disabled."""

    def __init__(
        self,
        output_dir: str | Path,
        report_to: list[str],
        run_config: dict,
        *,
        enabled: bool,
        run_name: str | None = None,
        resume_step: int | None = None,
    ) -> None:
        """Open the JSONL file and start the integrations.

        Args:
            output_dir: the run directory; metrics.jsonl, tensorboard/ and wandb/ go under it.
            report_to: any of "wandb", "tensorboard", "none" (an empty list means "none").
            run_config: the run's configuration, recorded as the wandb run config.
            enabled: False on every rank but 0; a disabled logger writes nothing.
            run_name: the wandb display name (wandb picks one when None).
            resume_step: when resuming from the checkpoint of this step, keep the existing lines up
                to it (those after it were logged by the crashed run and are logged again) and
                append; None starts a fresh file.
        """
        _check_report_to(report_to)
        self.enabled = enabled
        self._file = None
        self._wandb_run = None
        self._tb_writer = None
        if not enabled:
            return
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self._file, _ = open_log(output_dir / METRICS_FILE, resume_step)
        if "wandb" in report_to:
            self._wandb_run = _start_wandb(output_dir, run_config, run_name)
        if "tensorboard" in report_to:
            # Imported here so a run that does not ask for TensorBoard does not need it installed.
            from torch.utils.tensorboard import SummaryWriter

            self._tb_writer = SummaryWriter(str(output_dir / "tensorboard"))

    def log(self, metrics: dict[str, float], *, step: int, split: str = "train") -> None:
        """Record `metrics` at optimizer step `step`; keys go to wandb/TensorBoard as "{split}/{key}".

        The JSONL line is flushed before returning, so a crash later loses nothing logged so far.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        clashes = [key for key in _RESERVED_KEYS if key in metrics]
        if clashes:
            raise ValueError(f"metric names {clashes} are reserved for the JSONL record itself")
        if not self.enabled:
            return
        values = _finite_metrics(metrics)
        record = {"step": int(step), "split": split, "time": time.time(), **values}
        # allow_nan=False: a non-finite value reaching the file would make it invalid JSON.
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        tagged = {f"{split}/{key}": value for key, value in values.items()}
        if self._wandb_run is not None and tagged:
            self._wandb_run.log(tagged, step=int(step))
        if self._tb_writer is not None:
            for tag, value in tagged.items():
                self._tb_writer.add_scalar(tag, value, global_step=int(step))

    def log_table(self, key: str, rows: list[dict], *, step: int) -> None:
        """Show `rows` (dicts with the same keys) as a wandb Table under `key`; a no-op without wandb."""
        if self._wandb_run is None or not rows:
            return
        import wandb

        columns = list(rows[0])
        table = wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])
        self._wandb_run.log({key: table}, step=int(step))

    def close(self) -> None:
        """Flush and close everything; safe to call more than once."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb_writer is not None:
            self._tb_writer.close()
            self._tb_writer = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def open_log(path: Path, resume_step: int | None) -> tuple[TextIO, list[dict]]:
    """Open a JSONL log of records with a "step" key for appending, and return the records it keeps.

    resume_step: when resuming from the checkpoint of this step, keep the lines up to it (those after
    it were logged by the crashed run and are logged again); None starts the file empty.
    """
    kept = []
    if resume_step is not None and path.exists():
        kept = [r for r in read_metrics(path) if r["step"] <= resume_step]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))  # a crash here keeps the old file
    return open(path, "a", encoding="utf-8"), kept


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file, in file order.

    A line that is not valid JSON (e.g. cut short when the machine died mid-write) is skipped with a
    warning so that the rest of a crashed run can still be read and plotted.
    """
    records = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{number}: skipping a line that is not valid JSON", stacklevel=2)
    return records
