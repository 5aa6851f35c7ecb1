"""Train a LoRA policy with KTO.

    python launch/train.py                                   # the demo: tiny Llama, shipped sample set
    python launch/train.py --config configs/my.yaml --beta 0.2
    deepspeed --num_gpus 8 launch/train.py --config configs/llama3-8b-lora.yaml
"""

import logging
import sys
import warnings

from kto_scale.config import REPO_ROOT, ConfigError, load_config
from kto_scale.data import DataError
from kto_scale.trainer import train

DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # DeepSpeed calls torch.distributed functions that torch has deprecated: one warning per call.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    args = sys.argv[1:]
    has_config = any(a == "--config" or a.startswith("--config=") for a in args)
    try:
        train(load_config(args, default_config=None if has_config else DEMO_CONFIG))
    except (ConfigError, DataError) as e:  # the user's settings or data: a message, not a traceback
        sys.exit(f"error: {e}")
