"""Seeded random base weights (init_random_weights), built whole or one shard at a time, the same bits.

A plain `from_config` draws torch's default init for each layer as it constructs it, then transformers'
own `_init_weights` for each module once the model is built: a stream of draws that only a whole model
can replay. kto-scale draws only the second: the model is built without initializing (transformers'
no_init_weights), then every module gets its `_init_weights`, in the order transformers'
initialize_weights visits them (children before their parent), from a generator seeded with `seed`.

- `random_model`: the whole model on one device (every DeepSpeed rank, and FSDP2 on one rank).
- `init_shards`: an FSDP2 rank's shards. Each module's weights are drawn whole into a scratch copy on the
  init device, in the same order; the rank keeps its rows of each. Every rank draws the whole model's
  numbers (time), but holds only one module's weights beyond its shards (memory).

Both consume the generator identically, so they give the same weights (tests/test_sliced_load.py). This
assumes each module's `_init_weights` sets only that module's own parameters, as transformers' models do.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.initialization import guard_torch_init_functions, no_init_weights
from transformers.modeling_utils import set_zero3_state


@dataclass(frozen=True)
class RandomWeights:
    """Which random weights to draw, and where: the model's config, the dtype, the seed and the device."""

    model_config: PretrainedConfig
    dtype: torch.dtype
    seed: int
    device: torch.device
    trust_remote_code: bool = False
    attn_implementation: str | None = None

    def build(self, device: torch.device | str) -> PreTrainedModel:
        """The model on `device`, built without drawing (no_init_weights; on meta nothing is drawn anyway);
        set_zero3_state: under ZeRO-3 transformers would build it inside deepspeed.zero.Init, partitioned
        across ranks; built whole here, DeepSpeed partitions it when the engine is created."""
        with no_init_weights(), set_zero3_state(), torch.device(device):
            model = AutoModelForCausalLM.from_config(self.model_config, dtype=self.dtype,
                                                     trust_remote_code=self.trust_remote_code,
                                                     attn_implementation=self.attn_implementation)
        model.tie_weights()  # as init_weights would before drawing: a tied weight is drawn twice, kept once
        return model


def init_steps(model: PreTrainedModel) -> Iterator[tuple[nn.Module, Callable[[nn.Module], None]]]:
    """Every module of `model` with the init that transformers' initialize_weights applies to it, in its
    order: children before their parent, the modules of a nested PreTrainedModel with that model's own."""
    custom = model.is_custom_code()

    def walk(module: nn.Module, initialize: Callable) -> Iterator[tuple[nn.Module, Callable[[nn.Module], None]]]:
        for child in module.children():
            yield from walk(child, child._initialize_weights if isinstance(child, PreTrainedModel) else initialize)
        yield module, lambda m: initialize(m, custom)

    yield from walk(model, model._initialize_weights)


def random_model(weights: RandomWeights) -> PreTrainedModel:
    """The whole model with the seeded random weights, on weights.device."""
    model = weights.build(weights.device)
    torch.manual_seed(weights.seed)
    with torch.no_grad(), guard_torch_init_functions():
        for module, initialize in init_steps(model):
            initialize(module)
    return model


def init_shards(shards: dict[str, DTensor], weights: RandomWeights) -> None:
    """Fill this rank's `shards` (a DTensor per base weight, by its name in the plain model, each tied weight
    once) with its rows of random_model's weights. No collective: each rank draws on its own."""
    model = weights.build("meta")  # the module tree to walk, nothing allocated
    canonical = {id(p): name for name, p in model.named_parameters()}  # a tied weight by its first name
    torch.manual_seed(weights.seed)
    with torch.no_grad(), guard_torch_init_functions():
        for module, initialize in init_steps(model):
            own = {name: p for name, p in module._parameters.items() if p is not None}
            for name, p in own.items():
                module._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=weights.device),
                                                        requires_grad=False)
            initialize(module)
            for name, p in own.items():
                shard = shards[canonical[id(p)]]
                # src_data_rank None: every rank holds the whole tensor; each keeps its part, no communication.
                mine = distribute_tensor(module._parameters[name], shard.device_mesh, shard.placements,
                                         src_data_rank=None)
                shard.to_local().copy_(mine.to_local())
                module._parameters[name] = p  # the scratch copy is freed
