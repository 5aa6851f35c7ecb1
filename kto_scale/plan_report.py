"""What the capacity planner tells a person (launch/plan.py): the cluster's sizes read from its command
line, the layouts that cannot run at all, the settings that would make a run fit, and the printout.
The numbers themselves are kto_scale.plan's."""

from pathlib import Path

from kto_scale.config import ConfigError, KTOConfig
from kto_scale.config_checks import check_zero3_quantization
from kto_scale.data import load_examples
from kto_scale.model_shape import ModelShape
from kto_scale.plan import Cluster, Estimate, GiB


def parse_size(text: str, setting: str) -> int:
    """'80GB', '80GiB', '1TB', '512' (GiB) -> bytes; GB and GiB both mean 2^30 (as GPUs are sold)."""
    units = {"TIB": 2**40, "TB": 2**40, "GIB": GiB, "GB": GiB, "MIB": 2**20, "MB": 2**20, "G": GiB, "T": 2**40}
    value = text.strip().upper()
    for unit, size in units.items():
        if value.endswith(unit):
            value, scale = value[: -len(unit)], size
            break
    else:
        scale = GiB
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{setting} {text!r}: give a size such as 80GB or 1TB.") from None
    if number <= 0:
        raise ConfigError(f"{setting} {text!r} must be positive.")
    return int(number * scale)


def what_to_change(config: KTOConfig, result: Estimate, largest: int) -> list[str]:
    """The settings that would lower the per-GPU estimate, the cheapest first."""
    layout, advice = result.layout, []
    if result.gpu_load and largest == 0:  # not even micro-batch 1: the quantized base does not load
        advice.append(f"load_in_4bit/load_in_8bit: false with ds_configs/zero3_offload.json or fsdp: full_shard offload "
                      f"(transformers loads a quantized base whole onto every GPU, {result.gpu_load / GiB:.1f} GiB, "
                      "before ZeRO-3 partitions it; a 16-bit base is partitioned as it is read)")
    if 0 < largest < result.micro_batch:
        advice.append(f"per_device_train_batch_size {largest} (raise gradient_accumulation_steps to keep the "
                      "global batch)")
    if not config.gradient_checkpointing:
        advice.append("gradient_checkpointing: true")
    quantized = config.load_in_4bit or config.load_in_8bit
    if layout.stage < 3 and quantized:  # ZeRO-3 shards a 4-bit base, not an 8-bit one (kto_scale.engine)
        advice.append("deepspeed: ds_configs/zero3.json with load_in_4bit: true (shard the 4-bit base over the GPUs)")
    elif layout.stage < 3:
        advice.append("deepspeed: ds_configs/zero3.json or fsdp: full_shard (shard the base over the GPUs)")
    elif not layout.offload_params:
        advice.append("ds_configs/zero3_offload.json or fsdp: full_shard offload (keep shards on the host)")
    if not quantized:
        advice.append("load_in_4bit: true (QLoRA, sharded on DeepSpeed ZeRO-3)")
    if not config.ref_cache and "no-grad" in " ".join(result.gpu):
        advice.append("ref_cache (launch/precompute_ref.py): no reference passes during training")
    return advice or ["more GPUs or GPUs with more memory"]


def check_layout(config: KTOConfig, result: Estimate, cluster: Cluster, examples: int | None) -> None:
    """Layouts that cannot run at all: a ConfigError naming the setting."""
    if result.layout.engine == "zero" and result.layout.stage >= 3:
        check_zero3_quantization(config)
    if examples is not None and examples < cluster.world_size:
        raise ConfigError(f"{cluster.world_size} GPUs but the training data has {examples} examples: some ranks would "
                          "never get one. Use fewer GPUs (--nodes/--gpus_per_node) or more data.")
    if cluster.host_memory is not None and result.host_train > cluster.host_memory:
        raise ConfigError(f"offload needs {result.host_train / GiB:.1f} GiB of host RAM per node and --host_memory is "
                          f"{cluster.host_memory / GiB:.0f} GiB: turn offload off (ds_configs/zero3.json, fsdp: "
                          "full_shard), or use more nodes.")


def report(config: KTOConfig, shape: ModelShape, cluster: Cluster, result: Estimate, largest: int) -> str:
    """The planner's printout: per GPU, per node, the verdict and what to change."""
    gib = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
    lines = [f"{config.model_name_or_path}: {shape.params / 1e9:.2f}B parameters ({shape.layers} layers, hidden "
             f"{shape.hidden}, vocab {shape.vocab}); LoRA r={config.lora_r}: "
             f"{shape.lora_params(config.lora_r, config.lora_target_modules) / 1e6:.1f}M trainable",
             f"{cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs of {cluster.gpu_memory / GiB:.0f} GiB, "
             f"{result.layout.describe()}, micro-batch {result.micro_batch} x max_length {config.max_length}, "
             f"gradient_checkpointing {config.gradient_checkpointing}, "
             f"reference {'from ref_cache' if config.ref_cache else 'on the fly'}", "", "per GPU:"]
    lines += [f"  {name:<30}{gib(size)}" for name, size in result.gpu.items()]
    lines += [f"  {'total':<30}{gib(result.gpu_total)}   of {cluster.gpu_memory / GiB:.0f} GiB",
              *(f"  ({note})" for note in result.notes), "", "per node:",
              f"  {'GPU memory':<30}{gib(result.gpu_total * cluster.gpus_per_node)}",
              f"  {'host RAM at load':<30}{gib(result.host_load)}",
              f"  {'host RAM for offload':<30}{gib(result.host_train)}", ""]
    fits = result.gpu_peak <= cluster.gpu_memory
    host_fits = cluster.host_memory is None or result.host_load <= cluster.host_memory
    lines.append(f"fits: {'yes' if fits else 'NO'} (largest micro-batch that fits: {largest})")
    if not host_fits:
        lines.append(f"host RAM: NO, loading needs {result.host_load / GiB:.0f} GiB per node and --host_memory is "
                     f"{cluster.host_memory / GiB:.0f} GiB: ZeRO-3 loads partitioned (deepspeed: ds_configs/zero3.json)")
    if not fits:
        lines += ["to fit, change:", *(f"  - {advice}" for advice in what_to_change(config, result, largest))]
    return "\n".join(lines)


def training_examples(config: KTOConfig) -> int | None:
    """How many training examples a local dataset holds (after eval_fraction); None for a hub dataset,
    which the planner does not download."""
    if not config.dataset_name or not Path(config.dataset_name).exists():
        return None
    examples, _ = load_examples(config.dataset_name, skip_bad_rows=config.skip_bad_rows)
    return len(examples) - int(len(examples) * config.eval_fraction)
