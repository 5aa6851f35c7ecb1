"""The FSDP2 engine: PyTorch-native sharding with `torch.distributed.fsdp.fully_shard`, run with torchrun.

    torchrun --nproc_per_node 8 launch/train.py --config my.yaml --fsdp full_shard

Every decoder layer (the model's `_no_split_modules` classes), the embedding and the LM head (when
untied), and then the root module are `fully_shard`ed: each rank keeps 1/N of every weight and
all-gathers a unit's weights only while it runs. With `bf16`, compute is in bfloat16 and gradients are reduced in float32 (MixedPrecisionPolicy);
the LoRA weights, which peft keeps in float32, are the optimizer's master weights. `fsdp: full_shard
offload` keeps the shards, gradients and optimizer state on the CPU (CPUOffloadPolicy), the
counterpart of ds_configs/zero3_offload.json. Activation checkpointing is transformers' own
(`gradient_checkpointing`), as on DeepSpeed.

It behaves as kto_scale.engine.Engine says, with DeepSpeed's semantics, so the two engines give the
same run: gradients are averaged over ranks (FSDP's reduce-scatter) and summed over a step's
micro-batches (the caller scales the loss and marks the step's last micro-batch, the boundary); at the
boundary the update clips to max_grad_norm, and skips (and counts) a step whose gradient norm is not finite, leaving the schedule where it was.
Between boundaries gradients stay unsharded and unreduced (`set_requires_gradient_sync`): one
reduce-scatter per optimizer step (DeepSpeed's ZeRO-2 reduces every micro-batch into its gradient
partitions; ZeRO-1 reduces once per step).

Checkpoints are torch.distributed.checkpoint (DCP) directories holding only the trainable weights and
their optimizer state; DCP reshards on load, so a run resumes on any number of ranks.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor

from kto_scale.config import ConfigError, KTOConfig
from kto_scale.distributed import any_rank, is_main_process
from kto_scale.model import SequenceLogps, is_placeholder, random_weights
from kto_scale.optimizer import OptimizerSettings, optimizer_and_schedule
from kto_scale.random_init import RandomWeights, init_shards
from kto_scale.sliced_load import allocate_shards, checkpoint_name, read_shards, sliced_checkpoint

logger = logging.getLogger(__name__)

FSDP_TAG = "fsdp"  # this engine's (torch.distributed.checkpoint) state inside a checkpoint directory
ENGINE_STATE = "engine_state.pt"  # schedule and step counters, beside the DCP files


@dataclass(frozen=True)
class FSDPSettings:
    """The KTOConfig fields the FSDP2 engine reads (the optimizer's are OptimizerSettings)."""

    bf16: bool
    cpu_offload: bool  # "offload" in fsdp
    max_grad_norm: float

    @classmethod
    def from_config(cls, config: KTOConfig) -> "FSDPSettings":
        return cls(config.bf16, "offload" in config.fsdp.split(), config.max_grad_norm)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class FSDPSetup:
    """Decides, before the model loads, how the ranks get their shards (kto_scale.sliced_load): each reads
    its own slices of the checkpoint or draws its own random weights (every rank builds the model empty),
    or rank 0 loads it whole and broadcasts (the other ranks build it empty). One rank loads it as usual."""

    shards_weights = True

    def __init__(self, config: KTOConfig, world_size: int) -> None:
        self.config, self.world_size = config, world_size
        # Where every rank gets its own shards: the checkpoint directory it reads its slices from, or the
        # random weights it draws; None: rank 0 loads the model and broadcasts it.
        self.source: Path | RandomWeights | None = None
        if world_size > 1 and config.init_random_weights:
            self.source = random_weights(config)
            logger.info("FSDP2 init: each rank draws the seeded random weights and keeps its own shards.")
        elif world_size > 1:
            directory, why = sliced_checkpoint(config)
            if any_rank(directory is None):  # one way for all ranks
                logger.info("FSDP2 load: rank 0 loads the model and broadcasts it (%s).",
                            why or "another rank cannot read the checkpoint's files")
            else:
                self.source = directory
                logger.info("FSDP2 load: each rank reads its own slices of %s.", directory)

    def loads_weights(self, rank: int) -> bool:
        """Whether this rank loads the model's weights (the others build it empty)."""
        return rank == 0 and self.source is None

    def prepare_resume(self, path: Path, saved_world_size: int) -> None:
        """Nothing to convert: DCP reshards a checkpoint of any rank count when it loads it."""

    def training_engine(self, module: SequenceLogps, total_steps: int) -> "FSDPEngine":
        return FSDPEngine(module, FSDPSettings.from_config(self.config), self.world_size, self.source,
                          OptimizerSettings.from_config(self.config, total_steps))

    def inference_engine(self, model) -> "FSDPEngine":
        engine = FSDPEngine(SequenceLogps(model, self.config.logprob_chunk_size), FSDPSettings.from_config(self.config),
                            self.world_size, self.source, None)
        engine.eval()
        return engine


def shard(module: SequenceLogps, settings: FSDPSettings, world_size: int,
          source: Path | RandomWeights | None) -> torch.device:
    """fully_shard every decoder layer, the embedding and the LM head, then the root (the final norm),
    whose `generate` gets the hooks forward gets, and give every rank its shards of the base weights; returns the device.

    source: every rank built the model empty and reads its own slices of the checkpoint in this directory
    (kto_scale.sliced_load), or draws these random weights (kto_scale.random_init). None: rank 0 holds the weights (the other ranks built the model empty); it
    keeps its loaded state dict while it shards, then broadcasts it one tensor at a time and every rank
    keeps its shard of each (torch.distributed.checkpoint's broadcast_from_rank0). A node's peak is then
    one whole model (rank 0's) plus the shards, not one model per rank."""
    device = _device()
    mesh = init_device_mesh(device.type, (world_size,))
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if settings.bf16 \
        else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if settings.cpu_offload \
        else OffloadPolicy()
    base = module.model.get_base_model()
    layer_classes = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ConfigError(f"fsdp: {type(base).__name__} names no decoder layer class (_no_split_modules) to "
                          "shard; use DeepSpeed (deepspeed: ds_configs/zero3.json) for this model.")
    # An empty model's placeholders become meta parameters, which fully_shard shards without allocating.
    names = {id(p): name for name, p in module.named_parameters()}
    empty = {checkpoint_name(name): names[id(p)] for name, p in base.named_parameters() if is_placeholder(p)}
    for param in module.parameters():
        if is_placeholder(param):
            torch.utils.swap_tensors(param, torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                                                               requires_grad=param.requires_grad))
    broadcast = source is None and world_size > 1
    loaded = module.state_dict() if broadcast and torch.distributed.get_rank() == 0 else {}
    # The root's weights stay gathered from its forward to the end of its backward. An untied embedding
    # and LM head (V x H each: 1 GiB in Llama-3-8B) get their own units instead, each gathered only while
    # it runs (the head once per chunk of logprob_chunk_size scored positions); tied, they are one weight.
    embedding, head = base.get_input_embeddings(), base.get_output_embeddings()
    edges = [embedding, head] if head is not None and head.weight is not embedding.weight else []
    for unit in layers + edges:
        fully_shard(unit, mesh=mesh, mp_policy=mixed, offload_policy=offload)
    fully_shard(module, mesh=mesh, mp_policy=mixed, offload_policy=offload)
    if source is not None:  # FSDP2 keeps offloaded shards on the CPU
        params = allocate_shards(module, torch.device("cpu") if settings.cpu_offload else device)
        shards = {name: params[module_name] for name, module_name in empty.items()}
        if isinstance(source, RandomWeights):
            init_shards(shards, source)
        else:
            read_shards(shards, source)
    elif broadcast:
        set_model_state_dict(module, loaded, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    register_fsdp_forward_method(module, "generate")  # the root's weights gathered for generation too
    return device


class FSDPEngine:
    """`Engine` on a fully_shard-ed SequenceLogps; optimizer None: forward passes only (no optimizer)."""

    state_tag = FSDP_TAG
    shards_weights = True

    def __init__(self, module: SequenceLogps, settings: FSDPSettings, world_size: int, source: Path | RandomWeights | None,
                 optimizer: OptimizerSettings | None) -> None:
        self.module, self.max_grad_norm = module, settings.max_grad_norm
        self.world_size, self.global_rank = world_size, torch.distributed.get_rank()
        self.device = shard(module, settings, world_size, source)
        self.trainable = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = self.scheduler = None
        if optimizer is not None:  # after fully_shard: the optimizer holds this rank's shards
            self.optimizer, schedule = optimizer_and_schedule(optimizer, self.trainable)
            self.scheduler = schedule(self.optimizer)
        self.micro_steps = self.skipped_steps = 0
        self._boundary = False
        self._grad_norm, self._applied = torch.zeros(()), True

    def __call__(self, **inputs) -> Tensor:
        return self.module(**inputs)

    def backward(self, loss: Tensor, boundary: bool) -> None:
        # Reduce-scatter only with the last micro-batch of the step; before it gradients accumulate.
        self.module.set_requires_gradient_sync(boundary)
        self._boundary = boundary
        loss.backward()

    def step(self) -> None:
        self.micro_steps += 1
        if not self._boundary:
            return
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
        self._grad_norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        self._applied = bool(torch.isfinite(self._grad_norm))  # the same verdict on every rank
        if self._applied:
            self.optimizer.step()
            self.scheduler.step()
        else:
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)

    def was_step_applied(self) -> bool:
        return self._applied

    def get_global_grad_norm(self) -> float:
        return float(self._grad_norm)

    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def trainable_state_dict(self) -> dict[str, Tensor] | None:
        """The LoRA weights, whole, on rank 0 (None elsewhere); every rank calls (all-gathers the shards)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        state = get_model_state_dict(self.module, options=options)
        # Named as in the PeftModel (SequenceLogps holds it as `model`).
        return {name.removeprefix("model."): t for name, t in state.items()} if is_main_process() else None

    def _state(self) -> dict:
        model, optimizer = get_state_dict(self.module, self.optimizer,
                                          options=StateDictOptions(ignore_frozen_params=True))
        return {"model": model, "optimizer": optimizer}

    def save_checkpoint(self, path: Path) -> None:
        """Every rank writes its shards of the LoRA weights and optimizer state into `path/fsdp/`."""
        dcp.save(self._state(), checkpoint_id=path / FSDP_TAG)
        if is_main_process():
            torch.save({"scheduler": self.scheduler.state_dict(), "micro_steps": self.micro_steps,
                        "skipped_steps": self.skipped_steps}, path / FSDP_TAG / ENGINE_STATE)

    def load_checkpoint(self, path: Path, saved_world_size: int) -> None:
        """Read `path/fsdp/`, resharded for this rank count when another wrote it."""
        state = self._state()
        dcp.load(state, checkpoint_id=path / FSDP_TAG)
        # Not strict: the frozen base is not in the checkpoint (dcp.load above fails on a missing LoRA key).
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))
        extra = torch.load(path / FSDP_TAG / ENGINE_STATE, weights_only=False)
        self.scheduler.load_state_dict(extra["scheduler"])
        self.micro_steps, self.skipped_steps = extra["micro_steps"], extra["skipped_steps"]
