"""Train a LoRA policy with KTO.

    python launch/train.py                                   # the demo: tiny Llama, shipped sample set
    python launch/train.py --config configs/my.yaml --beta 0.2
    deepspeed --num_gpus 8 launch/train.py --config configs/llama3-8b-lora.yaml
    torchrun --nproc_per_node 8 launch/train.py --config configs/llama3-8b-lora.yaml --fsdp full_shard --deepspeed null
"""

import sys

from kto_scale.config_io import DEMO_CONFIG
from kto_scale.usage import config_from_command_line, run_command


def main() -> None:
    """Check the config, then train; a mistake or a failed run ends with a one-line error."""
    config = config_from_command_line(sys.argv[1:], __doc__, default_config=DEMO_CONFIG)  # the demo: no option
    # After the config: --help and a mistyped option answer in a second, before torch and deepspeed load.
    from kto_scale.distributed import exit_without_teardown
    from kto_scale.trainer import train

    run_command(lambda: train(config))
    exit_without_teardown()  # the job is done and written: no interpreter teardown (see its docstring)


if __name__ == "__main__":
    main()
