"""Tests for kto_scale.plot and launch/plot.py, on synthetic runs written by MetricsLogger."""

import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from kto_scale.metrics import MetricsLogger
from kto_scale.plot import PANELS, plot_runs, render, series

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_run(run_dir: Path, offset: float) -> None:
    """A short synthetic run: train metrics every step, eval every 5 steps, no pair_accuracy."""
    logger = MetricsLogger(run_dir, ["none"], {}, enabled=True)
    for step in range(1, 21):
        reward = 0.05 * step + offset
        train = {"loss": 0.7 - 0.01 * step, "kl": 0.01 * step, "rewards/desirable": reward}
        train |= {"rewards/undesirable": -reward, "margins": 2 * reward, "learning_rate": 1e-5}
        logger.log(train, step=step)
        if step % 5 == 0:
            logger.log(
                {"loss": 0.72 - 0.01 * step, "reward_accuracy": 0.5 + step / 50}, step=step, split="eval"
            )
    logger.close()


@pytest.fixture
def two_runs(tmp_path) -> list[Path]:
    runs = [tmp_path / "run_a", tmp_path / "run_b"]
    for offset, run_dir in enumerate(runs):
        write_run(run_dir, offset=0.1 * offset)
    return runs


def panel(fig, key: str):
    """The axes of PANELS entry `key` (panels are laid out in PANELS order)."""
    return fig.axes[[k for k, _ in PANELS].index(key)]


def test_png_is_valid_and_not_blank(two_runs, tmp_path):
    output = plot_runs(two_runs, tmp_path / "out" / "both.png")
    assert output == tmp_path / "out" / "both.png"
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(output)
    assert pixels.shape[0] > 400 and pixels.shape[1] > 800
    assert pixels[..., :3].std() > 0.05
    assert [p.name for p in output.parent.iterdir()] == ["both.png"]  # no temporary file left


def test_panels_overlay_runs_and_say_no_data(two_runs):
    fig = render(two_runs)
    # Two runs x (train, eval) on the loss panel; eval-only metrics draw one line per run.
    assert len(panel(fig, "loss").lines) == 4
    assert len(panel(fig, "reward_accuracy").lines) == 2
    assert [t.get_text() for t in panel(fig, "pair_accuracy").texts] == ["no data"]
    assert not panel(fig, "margins").texts
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["run_a", "run_b", "train", "eval"]


def test_default_output_paths(two_runs, tmp_path, monkeypatch):
    assert plot_runs(two_runs[:1]) == two_runs[0] / "plots.png"
    monkeypatch.chdir(tmp_path)
    assert plot_runs(two_runs) == Path("kto_runs.png")
    assert (tmp_path / "kto_runs.png").is_file()


def test_missing_metrics_file_names_the_run(two_runs, tmp_path):
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_run"):
        plot_runs([two_runs[0], tmp_path / "empty_run"])


def test_series_keeps_last_value_of_a_relogged_step():
    records = [
        {"step": 1, "split": "train", "loss": 0.9},
        {"step": 2, "split": "train", "loss": 0.8},
        {"step": 2, "split": "eval", "loss": 0.7},
        {"step": 2, "split": "train", "loss": 0.6},  # re-logged after resuming from step 1
        {"step": 3, "split": "train"},
    ]
    assert series(records, "loss", "train") == ([1, 2], [0.9, 0.6])
    assert series(records, "loss", "eval") == ([2], [0.7])


@pytest.mark.e2e
def test_command_line(two_runs, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, str(REPO_ROOT / "launch" / "plot.py")]
    done = subprocess.run(command + [str(two_runs[0])], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(two_runs[0] / "plots.png")
    missing = tmp_path / "nowhere"
    done = subprocess.run(command + [str(missing)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and f"error: {missing}: no metrics.jsonl" in done.stderr
