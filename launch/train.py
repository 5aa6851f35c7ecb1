"""Train a LoRA policy with KTO.

    python launch/train.py                                   # the demo: tiny Llama, shipped sample set
    python launch/train.py --config configs/my.yaml --beta 0.2
    deepspeed --num_gpus 8 launch/train.py --config configs/llama3-8b-lora.yaml
"""

import logging
import sys

from kto_scale.assets import DEMO_CONFIG
from kto_scale.config import load_config
from kto_scale.trainer import train

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = sys.argv[1:]
    has_config = any(a == "--config" or a.startswith("--config=") for a in args)
    train(load_config(args, default_config=None if has_config else DEMO_CONFIG))
