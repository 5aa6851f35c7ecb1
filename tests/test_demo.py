"""The demo (`python launch/train.py`, no arguments) learns a preference that generalises: its tiny
random-init model scores held-out examples right, not only the ones it trained on."""

import pytest
from runs import ROOT, TRAIN, metrics, run


@pytest.mark.e2e
def test_demo_held_out_reward_accuracy_rises_above_chance(tmp_path):
    """A shortened demo (20 of its 68 steps): held-out reward accuracy far above the 0.5 of chance.
    (Any option turns the demo config off, so it is named.)"""
    run([*TRAIN, "--config", str(ROOT / "configs" / "demo.yaml"), "--output_dir", str(tmp_path / "demo"), "--max_steps", "20", "--eval_steps", "20",
         "--save_steps", "1000", "--disable_tqdm", "true"])
    final = metrics(tmp_path / "demo", "eval")[-1]
    assert final["step"] == 20 and final["reward_accuracy"] >= 0.8, final
