"""The suite's runs are forked from tests/zygote.py (tests/runs.py's _start). A forked run must be the
plain run it stands for, or every end-to-end test would prove something about the fork instead."""

import json

import pytest
from runs import TRAIN, generations, launch, metrics, ranks

# What a run logs about the clock: the only numbers two runs of one config may differ in.
TIMING = {"time", "examples_per_s", "tokens_per_s"}


@pytest.mark.e2e
def test_a_forked_run_is_a_plain_run(tmp_path, one_process_run):
    """one_process_run (forked) again as a plain process, `python launch/train.py`, imports and all: the
    same logged numbers, generations and adapter bytes. Exact equality: both run the same kernels on the
    same shapes with one thread (OMP_NUM_THREADS=1 in the zygote's environment as in the plain one)."""
    plain = tmp_path / "plain"
    result = launch([*TRAIN, "--config", str(one_process_run / "kto_config.yaml"), "--output_dir", str(plain)],
                    fork=False)
    assert result.returncode == 0, result.stderr[-3000:]
    untimed = [[{k: v for k, v in line.items() if k not in TIMING} for line in metrics(run)] for run in (plain, one_process_run)]
    assert untimed[0] == untimed[1]
    assert generations(plain) == generations(one_process_run)
    assert (plain / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (one_process_run / "adapter" / "adapter_model.safetensors").read_bytes()
    # peft writes target_modules, a set, in the order of the process's string hashes (PYTHONHASHSEED),
    # random per interpreter but the zygote's in every forked run: compared as a set.
    configs = [json.loads((run / "adapter" / "adapter_config.json").read_text()) for run in (plain, one_process_run)]
    for config in configs:
        config["target_modules"] = sorted(config["target_modules"])
    assert configs[0] == configs[1]


@pytest.mark.e2e
def test_forked_ranks_differ_in_their_hash_seed(tmp_path):
    """Ranks come from zygotes of their own, so they iterate sets in different orders, as the processes
    of a real launcher do (equal seeds: a chance of 2^-64). A script, not `-c`: where the zygotes cannot
    start, this is a real torchrun, which takes only a script."""
    script = tmp_path / "hash_seed.py"
    script.write_text("import os\nprint(os.environ['RANK'], hash('kto-scale'))\n")
    result = launch([*ranks(2), str(script)])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split() for line in result.stdout.splitlines())
    assert lines.keys() == {"0", "1"} and lines["0"] != lines["1"]
