"""Which base weights DeepSpeed ZeRO-3 holds gathered while each decoder layer runs (tests/test_scale.py).

    python tests/zero3_gathers.py OUT.json --config run.yaml     # the config names a ZeRO-3 JSON

Builds the engine as training does, then runs one no-grad and one training forward through SequenceLogps,
and the training pass's backward. A hook before every decoder layer lists the frozen weights outside that
layer (in backward: outside every decoder layer) whose ds_status is
AVAILABLE (gathered whole on this rank), except those DeepSpeed keeps resident (ds_persist: below
stage3_param_persistence_threshold); OUT.json gets {"<pass> layer <i>": [names]}. A weight read by
attribute inside forward (`module.weight`) is gathered by ZeRO-3 for the rest of the pass, and one a
checkpoint's recompute gathers in backward stays gathered until the innermost module's backward ends.
"""

import json
import sys

import torch
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

from kto_scale.config_io import load_config
from kto_scale.distributed import init_distributed, shutdown
from kto_scale.model import SequenceLogps, add_lora, load_base_model
from kto_scale.startup import engine_setup

out, argv = sys.argv[1], sys.argv[2:]
config = load_config(argv)
rank, world_size, _ = init_distributed(config.dist_timeout_s)
setup = engine_setup(config, world_size)
base = load_base_model(config, empty=not setup.loads_weights(rank))
engine = setup.training_engine(SequenceLogps(add_lora(base, config), config.logprob_chunk_size), total_steps=1)

frozen = {name: p for name, p in engine.module.named_parameters() if not p.requires_grad and not p.ds_persist}
seen: dict[str, list[str]] = {}
current_pass = ""
for i, layer in enumerate(base.model.layers):
    own = {id(p) for p in layer.parameters()}

    def record(module, args, i=i, own=own) -> None:
        seen[f"{current_pass} layer {i}"] = sorted(name for name, p in frozen.items()
                                                   if id(p) not in own and p.ds_status == ZeroParamStatus.AVAILABLE)

    def record_backward(module, grad_output, i=i) -> None:
        # The neighbouring layer's release and this layer's backward hook run in no fixed order: the other
        # weights only (the embedding, the final norm, the LM head).
        seen[f"backward layer {i}"] = sorted(name for name, p in frozen.items() if ".layers." not in name
                                             and p.ds_status == ZeroParamStatus.AVAILABLE)

    layer.register_forward_pre_hook(record)
    layer.register_full_backward_pre_hook(record_backward)

input_ids = torch.arange(3, 19).view(1, 16)
completion_mask = torch.zeros(1, 16, dtype=torch.bool)
completion_mask[:, 8:] = True
batch = dict(input_ids=input_ids, completion_mask=completion_mask, attention_mask=torch.ones_like(input_ids))
current_pass = "no-grad"
with torch.no_grad():
    engine(**batch)
current_pass = "training"
engine.backward(engine(**batch).sum(), True)
engine.step()
if rank == 0:
    with open(out, "w") as f:
        json.dump(seen, f)
shutdown()
