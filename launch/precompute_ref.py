"""Precompute the reference log-probs of a run's data once, so that training skips the reference passes.

    python launch/precompute_ref.py --config configs/my.yaml --ref_cache cache/my-ref
    deepspeed --num_gpus 8 launch/precompute_ref.py --config configs/my.yaml --ref_cache cache/my-ref
    deepspeed --num_gpus 8 launch/train.py --config configs/my.yaml --ref_cache cache/my-ref
    torchrun --nproc_per_node 8 launch/precompute_ref.py --config configs/my-fsdp.yaml --ref_cache cache/my-ref

Stopped or killed, the same command resumes: the finished shards are kept.
"""

import logging
import sys

from kto_scale.config_io import load_config
from kto_scale.distributed import exit_without_teardown
from kto_scale.precompute import precompute
from kto_scale.usage import exit_if_help, run_command

if __name__ == "__main__":
    exit_if_help(sys.argv[1:], __doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_command(lambda: precompute(load_config(sys.argv[1:])))
    exit_without_teardown()  # the job is done and written: no interpreter teardown (see its docstring)
