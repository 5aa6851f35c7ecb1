"""Precompute the reference log-probs of a run's data once, so that training skips the reference passes.

    python launch/precompute_ref.py --config configs/my.yaml --ref_cache cache/my-ref
    deepspeed --num_gpus 8 launch/precompute_ref.py --config configs/my.yaml --ref_cache cache/my-ref
    deepspeed --num_gpus 8 launch/train.py --config configs/my.yaml --ref_cache cache/my-ref
    torchrun --nproc_per_node 8 launch/precompute_ref.py --config configs/my-fsdp.yaml --ref_cache cache/my-ref

Stopped or killed, the same command resumes: the finished shards are kept.
"""

import sys

from kto_scale.usage import config_from_command_line, run_command


def main() -> None:
    """Check the config, then score the reference; a mistake ends with a one-line error."""
    config = config_from_command_line(sys.argv[1:], __doc__)
    # After the config: --help and a mistyped option answer in a second, before torch and deepspeed load.
    from kto_scale.distributed import exit_without_teardown
    from kto_scale.precompute import precompute

    run_command(lambda: precompute(config))
    exit_without_teardown()  # the job is done and written: no interpreter teardown (see its docstring)


if __name__ == "__main__":
    main()
