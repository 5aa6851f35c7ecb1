"""Plot one or more runs' metrics.jsonl (see kto_scale.metrics) as a grid of panels against step.

One colour per run; train values are solid lines, eval values dashed lines with markers. A panel
whose metric no run logged says "no data".

matplotlib is imported in the functions that draw, not with this module: the trainer imports plot_runs,
and only a process that writes a plot pays matplotlib's import (about 1.4 s).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from kto_scale.atomic import write_atomic
from kto_scale.metrics import METRICS_FILE, SPLITS, read_metrics

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

# (metric key in metrics.jsonl, panel title), in grid order.
PANELS = (
    ("loss", "loss"),
    ("kl", "KL baseline z_ref"),
    ("rewards/desirable", "reward, desirable"),
    ("rewards/undesirable", "reward, undesirable"),
    ("margins", "reward margin (desirable - undesirable)"),
    ("reward_accuracy", "reward accuracy (eval)"),
    ("pair_accuracy", "pair accuracy (eval)"),
    ("learning_rate", "learning rate"),
)
GRID_COLUMNS = 4
SPLIT_STYLES = {"train": {"linestyle": "-"}, "eval": {"linestyle": "--", "marker": "o", "markersize": 3}}

Series = tuple[list[int], list[float]]


def load_run(run_dir: str | Path) -> list[dict]:
    """The records of `run_dir`/metrics.jsonl; FileNotFoundError naming the file if it is missing."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {METRICS_FILE} found (looked for {path})")
    return read_metrics(path)


def series(records: list[dict], key: str, split: str) -> Series:
    """(steps, values) of `key` in `split`, sorted by step.

    A step logged twice (a resumed run re-logging steps after its last checkpoint) keeps its last
    value, so the curve never runs backwards.
    """
    by_step = {r["step"]: r[key] for r in records if r["split"] == split and r.get(key) is not None}
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def run_labels(run_dirs: list[str | Path]) -> list[str]:
    """Legend labels: each run directory's name, or its full path where two names collide."""
    names = [Path(run_dir).name for run_dir in run_dirs]
    return [
        name if names.count(name) == 1 else str(run_dir)
        for name, run_dir in zip(names, run_dirs, strict=True)
    ]


def draw_panel(ax: Axes, key: str, title: str, runs: list[list[dict]], colors: list[str]) -> None:
    """Draw every run's train and eval curves of `key` on `ax`, or "no data" if there are none."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=10)
    drawn = False
    for records, color in zip(runs, colors, strict=True):
        for split in SPLITS:
            steps, values = series(records, key, split)
            if steps:
                ax.plot(steps, values, color=color, **SPLIT_STYLES[split])
                drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if key == "learning_rate":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))


def legend_handles(labels: list[str], colors: list[str]) -> list[Line2D]:
    """One colour swatch per run, then black samples of the train and eval line styles."""
    from matplotlib.lines import Line2D

    runs = [Line2D([], [], color=color, label=label) for label, color in zip(labels, colors, strict=True)]
    splits = [Line2D([], [], color="black", label=split, **SPLIT_STYLES[split]) for split in SPLITS]
    return runs + splits


def render(run_dirs: list[str | Path]) -> Figure:
    """A figure with one panel per entry of PANELS, every run overlaid."""
    from matplotlib.figure import Figure  # here, not at the top (so in draw_panel, legend_handles): see above

    runs = [load_run(run_dir) for run_dir in run_dirs]
    labels = run_labels(run_dirs)
    # The default colour cycle ("C0", "C1", ...) repeats after ten runs; fine for a comparison plot.
    colors = [f"C{i % 10}" for i in range(len(runs))]
    rows = -(-len(PANELS) // GRID_COLUMNS)
    # A plain Figure, not pyplot: no global figure registry, and savefig renders PNGs with Agg.
    fig = Figure(figsize=(4.5 * GRID_COLUMNS, 3.5 * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, GRID_COLUMNS, squeeze=False).flatten()
    # The last grid row may have more cells than there are panels left; those are hidden below.
    for ax, (key, title) in zip(axes, PANELS, strict=False):
        draw_panel(ax, key, title, runs, colors)
    for ax in axes[len(PANELS) :]:
        ax.set_visible(False)
    handles = legend_handles(labels, colors)
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 6), fontsize=9)
    return fig


def default_output(run_dirs: list[str | Path]) -> Path:
    """RUN_DIR/plots.png for one run, ./kto_runs.png for several."""
    return Path(run_dirs[0]) / "plots.png" if len(run_dirs) == 1 else Path("kto_runs.png")


def save_png(fig: Figure, output: Path) -> None:
    """Write `fig` to `output` atomically, so a reader never sees a half-written PNG."""
    output.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    write_atomic(output, png.getvalue())


def plot_runs(run_dirs: list[str | Path], output: str | Path | None = None) -> Path:
    """Render the runs' metrics to a PNG at `output` (default: see default_output); return its path."""
    if not run_dirs:
        raise ValueError("plot_runs needs at least one run directory")
    output = Path(output) if output is not None else default_output(run_dirs)
    save_png(render(run_dirs), output)
    return output
