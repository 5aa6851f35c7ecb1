"""Export a trained LoRA adapter: merge it into its base model, or write it as a clean peft adapter.

Merging streams the base: each tensor is read on its own (`safetensors.safe_open`), targeted weights get
`scale * B @ A` added in float32 (peft's scale: lora_alpha / r, lora_alpha / sqrt(r) with rsLoRA, per-module
`rank_pattern`/`alpha_pattern`), and the result is cast to the output dtype and written in shards of at most
`max_shard_size`, cut as `save_pretrained` cuts them (huggingface_hub's split, planned from the weight files'
headers before any tensor is read). Peak memory is about two output shards (safetensors serialises a shard
before writing it), a few float32 copies of the largest merged weight and the adapter, whatever the model's
size: lower `max_shard_size` to lower it.

Only plain LoRA on linear layers merges. adapter_config.json is checked against an allow-list of the LoRA
settings the merge implements; every other peft option must hold peft's default, so DoRA, LoRA biases,
`modules_to_save`, embedding LoRA, other peft variants and options of a newer peft are refused, naming the
setting. Such adapters can still be served unmerged (peft, vLLM).

Quantized training (QLoRA): an adapter a kto-scale run trained on a 4-bit base (its kto_config.yaml says so)
merges into that base's dequantized weights, as it was trained against them, and the result is written in
16 bits (kto_scale.quantized_base); one trained on an 8-bit base merges into the original 16-bit weights.

Outputs are written into `.<output name>.tmp-<pid>` beside it and renamed into place when complete, so an
interrupted export never leaves a directory that looks like a finished one (a killed run leaves that hidden
.tmp dir; delete it).
DeepSpeed checkpoints are pickles read by DeepSpeed's zero_to_fp32: export only checkpoints you trust.
"""

import contextlib
import json
import logging
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from huggingface_hub import StateDictSplit, split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer
from transformers.modeling_utils import str_to_torch_dtype

from kto_scale.adapter_files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterError,
    LoraPair,
    load_adapter,
    load_pickle,
    lora_modules,
    not_plain_lora,
    plan_merge,
    read_json,
)
from kto_scale.atomic import atomic_directory
from kto_scale.outdir import (
    DirectoryBusy,
    lock_directory,
    record_contents,
    replace_refusal,
    unlock_and_remove,
)
from kto_scale.quantized_base import weights_as_trained

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The names a tokenizer's save_pretrained writes (fast, slow and older layouts): check_output recognises them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


class ExportError(AdapterError):
    """Bad input to an export: the message names the file or setting and what to do."""


def _weight_files(base: Path, single: str) -> list[Path]:
    """The files listed by `<single>.index.json`, else `single` alone, else none."""
    index = base / f"{single}.index.json"
    if not index.is_file():
        return [base / single] if (base / single).is_file() else []
    weight_map = read_json(index).get("weight_map")
    if not weight_map:
        raise ExportError(f"{index} has no weight_map; it is not a Hugging Face weight index.")
    files = [base / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ExportError(f"{index} lists weight files that do not exist: {missing}")
    return files


def base_weight_files(base: Path, allow_pickle: bool) -> list[Path]:
    """The base model's weight files: safetensors (single or sharded), or pickled .bin with `allow_pickle`."""
    files = _weight_files(base, "model.safetensors")
    if files:
        return files
    files = _weight_files(base, "pytorch_model.bin")
    if not files:
        raise ExportError(f"{base} has no model.safetensors(.index.json) or pytorch_model.bin(.index.json).")
    if not allow_pickle:
        raise ExportError(f"{base} has only pickled pytorch_model*.bin weights, which can run code when loaded. "
                          "Pass --allow_pickle if you trust them, or convert them to safetensors.")
    return files


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the weight files, one at a time, in file order."""
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            # Memory-mapped tensors may share storage (tied weights); safetensors needs each to own its own.
            for name, tensor in load_pickle(path).items():
                yield name, tensor.clone()


def _meta_tensor(path: Path, f, name: str) -> torch.Tensor:
    """A safetensors entry as a meta tensor: its shape and dtype from the header, no data."""
    header = f.get_slice(name)
    if header.get_dtype() not in str_to_torch_dtype:
        raise ExportError(f"{path}: {name} is stored as {header.get_dtype()}, which kto-scale cannot merge.")
    return torch.empty(header.get_shape(), dtype=str_to_torch_dtype[header.get_dtype()], device="meta")


def meta_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of the weight files as a meta tensor (shape and dtype, read from the headers; no data)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as f:
                found = {name: _meta_tensor(path, f, name) for name in f.keys()}
        else:
            found = {name: t.to("meta") for name, t in load_pickle(path).items()}
        duplicates = sorted(tensors.keys() & found.keys())
        if duplicates:
            raise ExportError(f"{path} repeats tensors of another weight file of the base: {duplicates[:5]}")
        tensors.update(found)
    return tensors


def tensor_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor, read from the file headers (no tensor data is loaded)."""
    return {name: tuple(t.shape) for name, t in meta_tensors(files).items()}


def check_mergeable(config: dict, source: Path) -> None:
    """Refuse adapters whose layers are not plain `W + scale * B @ A`."""
    reason = not_plain_lora(config)
    if reason:
        raise ExportError(f"{source / ADAPTER_CONFIG}: {reason}, which kto-scale cannot merge. The adapter can "
                          "still be served unmerged (peft, vLLM).")


def check_architecture(base_config: dict, adapter_config: dict, base: Path, source: Path) -> None:
    """Error when the adapter records another architecture than the base; warn when only the path differs."""
    recorded = (adapter_config.get("auto_mapping") or {}).get("base_model_class")
    if recorded and recorded not in base_config.get("architectures", []):
        raise ExportError(f"{source / ADAPTER_CONFIG} was trained on a {recorded}, but {base} is a "
                          f"{base_config.get('architectures')}. Pass the base model it was trained on.")
    if (source / "config.json").is_file():
        model_type = read_json(source / "config.json").get("model_type")
        if model_type and model_type != base_config.get("model_type"):
            raise ExportError(f"{source / 'config.json'} has model_type {model_type!r}, but {base} is "
                              f"{base_config.get('model_type')!r}. Pass the base model it was trained on.")
    trained_on = adapter_config.get("base_model_name_or_path")
    if trained_on and trained_on != str(base):
        logger.warning("The adapter was trained on %s and is merged into %s. Paths differ between machines, "
                       "so this is only a warning; the weight shapes were checked.", trained_on, base)


def merged_tensors(files: list[Path], plan: dict[str, LoraPair], fan_in_fan_out: bool, dtype: torch.dtype,
                   as_trained: Callable[[str, torch.Tensor], torch.Tensor] = lambda name, tensor: tensor,
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """The base tensors (each as the adapter was trained against it: `as_trained`, see
    kto_scale.quantized_base) with their LoRA deltas added, cast to `dtype` (non-float tensors are kept
    as they are)."""
    for name, tensor in iter_tensors(files):
        tensor = as_trained(name, tensor)
        if name in plan:
            pair = plan[name]
            delta = pair.scale * (pair.b.float() @ pair.a.float())
            tensor = tensor.float() + (delta.T if fan_in_fan_out else delta)
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
            if dtype == torch.float16 and not torch.isfinite(tensor).all():
                raise ExportError(f"{name} overflows float16 after merging; use --dtype bf16 or fp32.")
        yield name, tensor


def _write_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write one safetensors shard (HF's loaders expect the "format" metadata)."""
    try:
        save_file(tensors, path, metadata={"format": "pt"})
    except SafetensorError as error:  # a failed write (disk full, read-only) as an OSError naming the file
        raise OSError(None, str(error), str(path)) from error


def plan_shards(base: dict[str, torch.Tensor], dtype: torch.dtype, max_shard_size: str) -> StateDictSplit:
    """The merged model's shards, cut by huggingface_hub as save_pretrained cuts them, from the base's meta
    tensors (floating ones written in `dtype`): shard names and index are known before anything is read."""
    merged = {name: t.to(dtype) if t.is_floating_point() else t for name, t in base.items()}
    try:
        return split_torch_state_dict_into_shards(merged, max_shard_size=max_shard_size)
    except ValueError as err:  # huggingface_hub's size parser: "5GB", "500MB", as save_pretrained takes
        raise ExportError(f"--max_shard_size {max_shard_size!r}: {err}") from None


def write_shards(tensors: Iterator[tuple[str, torch.Tensor]], split: StateDictSplit, out: Path) -> None:
    """Write each planned shard as soon as its last tensor streams in, then the index (when sharded)."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors:
        filename = split.tensor_to_filename[name]
        shard = pending.setdefault(filename, {})
        shard[name] = tensor
        if len(shard) == len(split.filename_to_tensors[filename]):
            _write_shard(pending.pop(filename), out / filename)
    if pending:  # the plan came from the headers: only files changed mid-merge can leave a shard incomplete
        raise ExportError(f"The base's weight files changed during the merge; {sorted(pending)} are incomplete.")
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_tokenizer(sources: list[Path], out: Path) -> None:
    """The tokenizer of the first source directory that holds one, loaded and written by transformers."""
    for source in sources:
        if (source / "tokenizer_config.json").is_file() or (source / "tokenizer.json").is_file():
            try:
                tokenizer = AutoTokenizer.from_pretrained(source)
            except (OSError, ValueError) as err:
                raise ExportError(f"{source} holds a tokenizer that does not load ({err}); fix or remove its "
                                  "tokenizer files.") from err
            tokenizer.save_pretrained(out)
            return


# What a merge or an adapter export writes: an --output holding anything else was not made by one.
_EXPORT_FILES = re.compile(r"(config|generation_config|adapter_config)\.json|model(-\d+-of-\d+)?\.safetensors"
                           r"|model\.safetensors\.index\.json|adapter_model\.safetensors")


def check_output(output: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Refuse an --output that overlaps an input, or whose files a replacement would lose."""
    reason = replace_refusal(output, inputs, lambda name: bool(_EXPORT_FILES.fullmatch(name)) or name in TOKENIZER_FILES,
                             "export", overwrite)
    if reason:
        raise ExportError(reason)


@contextlib.contextmanager
def atomic_output_dir(output: Path, overwrite: bool, inputs: list[Path]) -> Iterator[Path]:
    """A temporary sibling of `output` to write into, renamed to `output` only when the block succeeds.

    With `overwrite` an existing output is replaced only after the new one is complete. A lock next to
    `output` refuses a second export into it while this one runs.
    """
    lock_file = output.parent / f".{output.name}.lock"
    try:
        lock_directory(lock_file, f"--output {output}")
    except DirectoryBusy as busy:
        raise ExportError(str(busy)) from None
    try:
        check_output(output, overwrite, inputs)
        with atomic_directory(output) as tmp:
            yield tmp
            record_contents(tmp)  # what a later --overwrite may replace
    finally:
        unlock_and_remove(lock_file)


def _output_dtype(requested: str | None, base_config: dict, base: Path) -> torch.dtype:
    """The requested dtype, else the base's own (config.json `dtype`, or `torch_dtype` before transformers 5)."""
    if requested is None:
        stored = base_config.get("dtype") or base_config.get("torch_dtype")
        by_name = {str(d).removeprefix("torch."): d for d in DTYPES.values()}
        if stored not in by_name:
            raise ExportError(f"{base / 'config.json'} records no bf16/fp16/fp32 dtype ({stored!r}); pass --dtype.")
        return by_name[stored]
    if requested not in DTYPES:
        raise ExportError(f"--dtype {requested!r}: choose one of {sorted(DTYPES)}.")
    return DTYPES[requested]


def merge_lora(base: str | Path, adapter: str | Path, output: str | Path, dtype: str | None = None,
               max_shard_size: str = "5GB", overwrite: bool = False, allow_pickle: bool = False) -> Path:
    """Merge a LoRA adapter (peft dir or DeepSpeed checkpoint) into its base; write an HF model dir to `output`."""
    base, adapter, output = Path(base), Path(adapter), Path(output)
    base_config = read_json(base / "config.json")
    if base_config.get("quantization_config"):
        raise ExportError(f"{base} is a quantized checkpoint; merge into the original 16-bit base model instead.")
    out_dtype = _output_dtype(dtype, base_config, base)
    files = base_weight_files(base, allow_pickle)
    base_tensors = meta_tensors(files)
    shards = plan_shards(base_tensors, out_dtype, max_shard_size)
    adapter_config, tensors = load_adapter(adapter, allow_pickle)
    check_mergeable(adapter_config, adapter)
    check_architecture(base_config, adapter_config, base, adapter)
    plan = plan_merge(adapter_config, tensors, {k: tuple(t.shape) for k, t in base_tensors.items()}, adapter)
    logger.info("Merging %d LoRA modules into %s (%d weight files) as %s", len(plan), base, len(files), out_dtype)

    with atomic_output_dir(output, overwrite, inputs=[base, adapter]) as tmp:
        write_shards(merged_tensors(files, plan, bool(adapter_config.get("fan_in_fan_out")), out_dtype,
                                    weights_as_trained(base, adapter)), shards, tmp)
        base_config["dtype"] = str(out_dtype).removeprefix("torch.")
        base_config.pop("torch_dtype", None)  # the pre-transformers-5 name would contradict `dtype`
        (tmp / "config.json").write_text(json.dumps(base_config, indent=2) + "\n")
        if (base / "generation_config.json").is_file():
            shutil.copy2(base / "generation_config.json", tmp)
        save_tokenizer([adapter, base], tmp)
    logger.info("Wrote the merged model to %s", output)
    return output


def export_adapter(base: str | Path, source: str | Path, output: str | Path, overwrite: bool = False,
                   allow_pickle: bool = False) -> Path:
    """Write a clean peft adapter dir from a peft adapter dir or a DeepSpeed checkpoint dir.

    `base` (a local dir or a hub id) becomes `base_model_name_or_path`; a local base is checked against the adapter.
    """
    source, output = Path(source), Path(output)
    config, tensors = load_adapter(source, allow_pickle)
    modules = lora_modules(tensors, source)
    if (Path(base) / "config.json").is_file():
        base_config = read_json(Path(base) / "config.json")
        check_architecture(base_config, config, Path(base), source)
        plan_merge(config, tensors, tensor_shapes(base_weight_files(Path(base), allow_pickle)), source)
    else:
        logger.warning("%s is not a local model dir (a hub id?); the adapter is not checked against it.", base)
    config["base_model_name_or_path"] = str(base)
    config["inference_mode"] = True  # as peft's save_pretrained writes it

    with atomic_output_dir(output, overwrite, inputs=[source, Path(base)]) as tmp:
        # lora_modules() accepted only peft's standard names, so the normalised tensors are the adapter.
        _write_shard({k: v.contiguous() for k, v in tensors.items()}, tmp / ADAPTER_WEIGHTS)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_tokenizer([source], tmp)
    logger.info("Wrote the adapter (%d LoRA modules) to %s", len(modules), output)
    return output
