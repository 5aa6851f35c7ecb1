"""Train a LoRA policy with KTO.

    python launch/train.py                                   # the demo: tiny Llama, shipped sample set
    python launch/train.py --config configs/my.yaml --beta 0.2
    deepspeed --num_gpus 8 launch/train.py --config configs/llama3-8b-lora.yaml
    torchrun --nproc_per_node 8 launch/train.py --config configs/llama3-8b-lora.yaml --fsdp full_shard --deepspeed null
"""

import logging
import sys
import warnings

from kto_scale.config_io import DEMO_CONFIG, load_config
from kto_scale.distributed import exit_without_teardown
from kto_scale.trainer import train
from kto_scale.usage import exit_if_help, run_command

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # DeepSpeed calls torch.distributed functions that torch has deprecated: one warning per call.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    exit_if_help(sys.argv[1:], __doc__)
    run_command(lambda: train(load_config(sys.argv[1:], default_config=DEMO_CONFIG)))  # the demo: no option at all
    exit_without_teardown()  # the job is done and written: no interpreter teardown (see its docstring)
