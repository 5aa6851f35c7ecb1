"""Capacity planning: the memory a KTO run needs per GPU and per node, from config.json alone.

Pure arithmetic on the model's shape (kto_scale.model_shape: read from its config.json, never its
weights), the run's config and the cluster. Every term is a formula below; `launch/plan.py` prints them
(kto_scale.plan_report) and the trainer logs the total at start. Notation: N ranks (nodes x gpus_per_node), n ranks per node, L decoder layers, H hidden
size, A = heads x head_dim, K = kv_heads x head_dim, I intermediate size, V vocabulary, r LoRA rank,
w bytes per weight and activation element (2 in bf16/fp16, 4 in fp32), B micro-batch, T max_length,
t = B x T tokens (padded batches are at most that long).

Weights. A Llama decoder layer holds 2HA + 2HK + 3HI linear weights (q, o; k, v; gate, up, down) and 2H
of norms (+ biases where the config has them); the edges are the embedding VH, the LM head VH (unless
tied) and the final norm H. 4-bit (bitsandbytes NF4/FP4) stores a linear weight in 1/2 byte plus its
quantization constants: an fp32 absmax per block of 64 (4/64 bytes), or with nested quantization an
8-bit absmax per 64 and an fp32 per 256 of those (1/64 + 4/16384); 8-bit stores 1 byte plus an fp32
scale per output row. Everything else stays in w bytes.
  ZeRO-0/1/2: every GPU holds the whole base. ZeRO-3: 1/N of it, plus the layers it has gathered: the
  one running and the one prefetched (2 layers, as stored), and the LM head's VH while it scores; with
  offload_param, only those. A 4-bit
  base's quantization constants are no parameters, so ZeRO-3 leaves them whole on every GPU; and
  transformers loads a quantized base whole onto every GPU (no zero.Init) before DeepSpeed partitions
  it: that load peak (the 4-bit base + overhead) must fit too.
  FSDP2: 1/N of every weight, plus 2 gathered layers, plus one VH gathered: the embedding and the LM
  head are units of their own, each gathered only while it runs (tied, they are one weight, which the
  root keeps gathered through the step); with offload, the shards live on the host.
LoRA. P trainable parameters, r (in + out) per adapted projection. DeepSpeed casts them to the compute
dtype: weights wP and gradients wP on every GPU, plus 16P bytes of optimizer state (fp32 master 4, Adam
moments 8, fp32 gradient 4) in mixed precision, or 8P (Adam only) in fp32; ZeRO-1/2 split the optimizer
state over N, ZeRO-3 also the weights and gradients; offload_optimizer moves the optimizer state to the
host. FSDP2 (peft keeps LoRA in fp32): weights 4P/N, Adam 8P/N, gradients 4P/N, or 4P while gradients
accumulate unsharded between micro-batches (gradient_accumulation_steps > 1); offload moves all to the
host. An sft_adapter adds a frozen copy (the reference) in w bytes, sharded like the base.
Activations of the gradient pass, per token and layer (what autograd saves with LoRA on every
projection, sdpa attention): the two RMSNorms save their fp32 inputs (2 x 4H) and 1/rms (2 x 4); the
normed outputs feed the LoRA A matrices (2 x wH); sdpa saves q, k, v (k and v repeated to A heads
under a padding mask), its output, which o_proj's LoRA reads as it is (4wA), its fp32 logsumexp
(4 heads) and its [B, 1, T, T] mask (wT); the MLP saves gate, silu(gate), up and their product (4wI);
the seven LoRA A outputs (7wr). S = 8H + 8 + 2wH + 4wA + 4 heads + wT + 4wI + 7wr (counted exactly by
torch.autograd.graph.saved_tensors_hooks on a LoRA Llama: tests/test_plan.py). flash_attention_2
takes no mask (no wT); eager attention saves its probabilities instead of a logsumexp (w heads T);
lora_dropout > 0 adds a dropped copy and a mask per adapted input (in (w + 1)). Without gradient checkpointing a pass keeps L t S; with it,
each layer's input (L t wH) and one layer recomputed (t S). Backward holds gradients of one layer's
saved tensors (t S) on top; the edges add the final norm's fp32 input and the LM head's input,
t (4 + w) H. The LM head (kto_scale.logprobs) computes C = min(logprob_chunk_size, B (T - 1)) rows of
logits at a time (the scored positions of rows that are all completion but one prompt token). In the
gradient pass: the logits in w, their fp32 copy, logsumexp's exponentials, the fp32 gradient and the
gradient in w, C V (2w + 12) bytes in bf16/fp16; in fp32 the copy and the cast gradient are the
logits and the gradient themselves, and the gather's gradient is a fourth fp32 tensor: C V 16 (so 16
bytes either way; bench/lm_head_memory.py measures 16.0 in bf16 at C 1024, V 128256, and 16.4 in fp32
at C 1024, V 32000). In a no-grad pass C V (w + 8).
The no-grad passes (the reference on each example and its KL pair, the policy on the KL pair) keep no
graph: one layer's tensors at a time (at most t' S) and the LM head chunk, where t' = B (T + Tc) for
the shared-prompt reference over x + y + y' (Tc: the longest completion) or B T from a reference cache
(ref_cache: only the policy's KL pass runs on the fly). The step's peak is the larger of the two.
Overhead. A GPU also holds the CUDA context, NCCL and cuBLAS buffers and allocator fragmentation:
GPU_OVERHEAD (2 GiB, a stated allowance, not derived), and DeepSpeed's gradient reduction bucket
(HF's "auto": H^2 elements in w bytes).
Host RAM at load, per node (the node of rank 0, the fullest): DeepSpeed ZeRO-0/1/2 build the whole
model on the CPU on every rank before moving it (n x model; so does ZeRO-3 with init_random_weights);
ZeRO-3 loads partitioned (model/N per rank); FSDP2's ranks read their own slices of a safetensors
checkpoint straight into their GPU shards (nothing held on the host; with offload, the shards are the
host's: model/N per rank), and with init_random_weights each rank draws one module's weights whole at a
time (the largest: V x H or H x I) and keeps its rows; one rank alone builds the model whole; a quantized base is placed on the GPU as it is read. A checkpoint in the training dtype is
memory-mapped, so "the whole model" is then shared, reclaimable page cache rather than copies
(docs/scaling.md measures both). Offloaded
shards and optimizer state add their share for training.
"""

import json
from dataclasses import dataclass, field

from kto_scale.config import KTOConfig
from kto_scale.config_checks import find_deepspeed_config
from kto_scale.model_shape import PROJECTIONS, ModelShape

GiB = 2**30
GPU_OVERHEAD = 2 * GiB
MAX_MICRO_BATCH = 4096  # the search for the largest micro-batch stops here


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_memory: int  # bytes
    host_memory: int | None = None  # bytes per node; None: not checked

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Layout:
    """Where the engine keeps what: read from the config's fsdp setting or its DeepSpeed JSON."""

    engine: str  # "zero" or "fsdp"
    stage: int  # ZeRO stage (3 for FSDP2: everything sharded)
    offload_params: bool
    offload_optimizer: bool
    max_live_params: int = 0  # ZeRO-3's stage3_max_live_parameters (DeepSpeed's default 1e9)

    @classmethod
    def of(cls, config: KTOConfig) -> "Layout":
        if config.fsdp:
            offload = "offload" in config.fsdp.split()
            return cls("fsdp", 3, offload, offload)
        zero = json.loads(find_deepspeed_config(config.deepspeed).read_text()).get("zero_optimization", {})
        device = lambda section: (zero.get(section) or {}).get("device", "none") in ("cpu", "nvme")  # noqa: E731
        return cls("zero", int(zero.get("stage", 0)), device("offload_param"), device("offload_optimizer"),
                   int(float(zero.get("stage3_max_live_parameters", 1e9))))

    def describe(self) -> str:
        if self.engine == "fsdp":
            return "FSDP2 full_shard" + (" + CPU offload" if self.offload_params else "")
        offload = [name for name, on in (("params", self.offload_params), ("optimizer", self.offload_optimizer)) if on]
        return f"DeepSpeed ZeRO-{self.stage}" + (f" + CPU offload ({', '.join(offload)})" if offload else "")


@dataclass
class Estimate:
    """Bytes per GPU by component, host bytes per node, and the inputs they came from."""

    gpu: dict[str, int]
    host_load: int
    host_train: int
    layout: Layout
    micro_batch: int
    ranks_per_node: int
    notes: list[str] = field(default_factory=list)
    gpu_load: int = 0  # the GPU's peak while the model loads, where it exceeds nothing else: 0

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())

    @property
    def gpu_peak(self) -> int:
        """What the GPU must hold at some point: training, or loading a quantized base whole."""
        return max(self.gpu_total, self.gpu_load)


def _constant_bytes(shape: ModelShape, config: KTOConfig) -> int:
    """bitsandbytes' 4-bit quantization constants: no parameters, so ZeRO-3 leaves them whole on every GPU."""
    if not config.load_in_4bit:
        return 0
    return int(shape.linear_params * (1 / 64 + 4 / (64 * 256) if config.use_bnb_nested_quant else 4 / 64))


def _weight_bytes(shape: ModelShape, config: KTOConfig, w: int) -> int:
    """The whole base in memory: quantized linear weights and everything else in w bytes."""
    other = shape.params - shape.linear_params
    if config.load_in_4bit:
        return shape.linear_params // 2 + _constant_bytes(shape, config) + other * w
    if config.load_in_8bit:
        rows = shape.layers * sum(o for _, o in shape.projections().values())
        return shape.linear_params + 4 * rows + other * w
    return shape.params * w


def layer_activation_bytes(shape: ModelShape, config: KTOConfig, w: int, length: int) -> int:
    """S: bytes autograd saves per token in one decoder layer (module docstring), rows `length` long."""
    h, a, i = shape.hidden, shape.attention_width, shape.intermediate
    targets = config.lora_target_modules or PROJECTIONS
    adapted = [shape.projections()[name] for name in PROJECTIONS if name in targets]
    saved = 8 * h + 8 + 2 * w * h + 4 * w * a + 4 * w * i + len(adapted) * w * config.lora_r
    if config.attn_implementation == "eager":
        saved += w * shape.heads * length + w * length
    elif config.attn_implementation != "flash_attention_2":  # sdpa (transformers' default)
        saved += 4 * shape.heads + w * length
    if config.lora_dropout > 0:
        saved += sum(in_features * (w + 1) for in_features, _ in adapted)
    return saved


def activation_bytes(shape: ModelShape, config: KTOConfig, micro_batch: int, checkpointing: bool) -> dict[str, int]:
    """The gradient pass, the LM head chunk and the no-grad passes' peak, in bytes per GPU."""
    w = 2 if (config.bf16 or config.fp16) else 4
    length = config.max_length
    tokens = micro_batch * length
    per_token = layer_activation_bytes(shape, config, w, length)
    kept = shape.layers * tokens * (w * shape.hidden if checkpointing else per_token)
    recompute = tokens * per_token if checkpointing else 0
    grad_pass = kept + recompute + tokens * per_token + tokens * (4 + w) * shape.hidden
    # Rows at max_length, all completion but one prompt token: the most scored positions a batch can have.
    completion = min(config.max_completion_length or length, length - 1)
    chunk = min(config.logprob_chunk_size, micro_batch * completion)
    ref_length = length if config.ref_cache else length + completion  # x + y + y' on the fly
    no_grad_tokens = micro_batch * ref_length
    no_grad_chunk = min(config.logprob_chunk_size, micro_batch * (ref_length - 1))
    no_grad = (no_grad_tokens * layer_activation_bytes(shape, config, w, ref_length)
               + no_grad_chunk * shape.vocab * (w + 8))
    return {"activations (gradient pass)": grad_pass, "LM head chunk": chunk * shape.vocab * 16,
            "no-grad passes (peak)": no_grad}


def estimate(config: KTOConfig, shape: ModelShape, cluster: Cluster, micro_batch: int | None = None,
             overhead: int = GPU_OVERHEAD) -> Estimate:
    """Per-GPU and per-node memory of training `config` on `cluster` (formulas: module docstring)."""
    layout, n_ranks, per_node = Layout.of(config), cluster.world_size, cluster.gpus_per_node
    micro_batch = micro_batch or config.per_device_train_batch_size
    mixed = config.bf16 or config.fp16
    w = 2 if mixed else 4
    model, constants = _weight_bytes(shape, config, w), _constant_bytes(shape, config)
    edges = shape.edge_params * w
    live = 2 * (model - constants - edges) // shape.layers  # ZeRO-3/FSDP2: the running and the prefetched layer
    p = shape.lora_params(config.lora_r, config.lora_target_modules)
    frozen_lora = p * w if config.sft_adapter else 0

    gpu: dict[str, int] = {}
    if layout.engine == "fsdp":
        shards = model // n_ranks
        gpu["base weights"] = (0 if layout.offload_params else shards) + live + shape.vocab * shape.hidden * w
        lora_grads = 4 * p if config.gradient_accumulation_steps > 1 else 4 * p // n_ranks
        lora = {"LoRA weights": 4 * p // n_ranks, "LoRA gradients": lora_grads, "Adam state": 8 * p // n_ranks}
        host_offload = (shards + 16 * p // n_ranks) * per_node if layout.offload_params else 0
        lora = {k: 0 for k in lora} if layout.offload_params else lora
    else:
        sharded = layout.stage >= 3
        partition = 0 if layout.offload_params else (model - constants) // n_ranks
        gpu["base weights"] = partition + constants + live + shape.vocab * shape.hidden * w if sharded else model
        optimizer = (16 if mixed else 8) * p // (n_ranks if layout.stage >= 1 else 1)
        lora = {"LoRA weights": w * p // (n_ranks if sharded else 1),
                "LoRA gradients": w * p // (n_ranks if sharded else 1),
                "Adam state": 0 if layout.offload_optimizer else optimizer}
        host_offload = per_node * ((model // n_ranks if layout.offload_params else 0)
                                   + (optimizer if layout.offload_optimizer else 0))
        if layout.stage >= 1:
            gpu["DeepSpeed buckets"] = shape.hidden**2 * w
    if frozen_lora:
        gpu["frozen SFT adapter"] = frozen_lora // (n_ranks if layout.stage >= 3 else 1)
    gpu.update(lora)
    checkpointing = config.gradient_checkpointing
    parts = activation_bytes(shape, config, micro_batch, checkpointing)
    grad_peak = parts["activations (gradient pass)"] + parts["LM head chunk"]
    if parts["no-grad passes (peak)"] > grad_peak:
        gpu["activations (no-grad passes)"] = parts["no-grad passes (peak)"]
    else:
        gpu["activations"] = parts["activations (gradient pass)"]
        gpu["LM head chunk"] = parts["LM head chunk"]
    gpu["framework overhead"] = overhead

    if layout.engine == "fsdp" and config.init_random_weights:
        # Each rank draws one module's weights whole at a time, on the host unless init_device is cuda
        # (kto_scale.random_init.init_shards), and keeps its rows; a single rank builds the whole model.
        scratch = 0 if config.init_device == "cuda" else max(shape.vocab, shape.intermediate) * shape.hidden * w
        host_load = per_node * (scratch + (model // n_ranks if layout.offload_params else 0)) if n_ranks > 1 else model
    elif layout.engine == "fsdp":  # each rank reads its slices into its shards (kto_scale.sliced_load)
        host_load = per_node * (model // n_ranks) if layout.offload_params else 0
    elif config.load_in_4bit or config.load_in_8bit:  # quantized onto the GPU as it is read
        host_load = 0
    elif layout.stage >= 3 and not config.init_random_weights:  # zero.Init: partitioned as it is read
        host_load = per_node * (model // n_ranks)
    else:  # every rank builds the whole model on the CPU first
        host_load = per_node * model
    other = activation_bytes(shape, config, micro_batch, not checkpointing)
    other_total = max(other["activations (gradient pass)"] + other["LM head chunk"], other["no-grad passes (peak)"])
    notes = [f"with gradient_checkpointing {'off' if checkpointing else 'on'}, activations would be "
             f"{other_total / GiB:.2f} GiB"]
    if layout.engine == "zero" and layout.stage >= 3 and min(layout.max_live_params, shape.params) * w > live:
        notes.append(f"DeepSpeed may keep up to stage3_max_live_parameters ({layout.max_live_params:,}: "
                     f"{min(layout.max_live_params, shape.params) * w / GiB:.2f} GiB) gathered within a step, beyond "
                     "the 2 layers counted here (measured: docs/scaling.md); on a tight GPU lower it and "
                     "stage3_max_reuse_distance")
    # A quantized base is loaded whole onto every GPU (transformers skips zero.Init for it); ZeRO-3
    # partitions it only when the engine is built, before any activation exists.
    gpu_load = model + overhead if layout.engine == "zero" and (config.load_in_4bit or config.load_in_8bit) else 0
    if gpu_load and layout.stage >= 3:
        notes.append(f"at load every GPU holds the whole quantized base, {gpu_load / GiB:.2f} GiB with the "
                     "overhead, until DeepSpeed partitions it")
    return Estimate(gpu, host_load, host_offload, layout, micro_batch, per_node, notes, gpu_load)


def largest_micro_batch(config: KTOConfig, shape: ModelShape, cluster: Cluster, overhead: int = GPU_OVERHEAD) -> int:
    """The largest per_device_train_batch_size whose estimate fits the GPU (0: not even 1)."""
    fits = lambda b: estimate(config, shape, cluster, b, overhead).gpu_peak <= cluster.gpu_memory  # noqa: E731
    low, high = 0, 1
    while high <= MAX_MICRO_BATCH and fits(high):
        low, high = high, high * 2
    high = min(high, MAX_MICRO_BATCH + 1)
    while high - low > 1:  # fits(low), not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
