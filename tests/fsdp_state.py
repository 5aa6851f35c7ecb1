"""Load the model as training does on this rank count and engine (tests/test_sliced_load.py): build the
engine, then rank 0 writes every weight whole (the base's and the adapters') and how the ranks loaded.

    torchrun --nproc_per_node 2 tests/fsdp_state.py OUT.pt sliced|broadcast --config run.yaml

"broadcast" turns FSDP2's sliced read off: rank 0 loads and broadcasts, as for checkpoints it cannot slice."""

import logging
import sys

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from kto_scale.config_io import load_config
from kto_scale.distributed import init_distributed, shutdown
from kto_scale.model import SequenceLogps, add_lora, load_base_model
from kto_scale.startup import engine_setup

logging.basicConfig(level=logging.INFO)  # the load's log line names the way the ranks loaded
out, mode, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
config = load_config(argv)
rank, world_size, _ = init_distributed(config.dist_timeout_s)
setup = engine_setup(config, world_size)
if mode == "broadcast":
    setup.source = None
base = load_base_model(config, empty=not setup.loads_weights(rank))
engine = setup.training_engine(SequenceLogps(add_lora(base, config), config.logprob_chunk_size), total_steps=1)
state = get_model_state_dict(engine.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    torch.save({"state": state, "sliced": setup.source is not None}, out)
shutdown()
