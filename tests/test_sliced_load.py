"""FSDP2's sliced load (kto_scale.sliced_load): each rank reads only its own slices of the checkpoint (or
draws only its own random weights), and the model the ranks hold is the one a single process loads (or
draws), bit for bit.

Exact equality is right here: every path puts the same stored bytes through the same cast (Tensor.copy_
into the training dtype, which is what from_pretrained's `.to(dtype)` does), and sharding only moves
whole rows. The 2-rank states are gathered whole (get_model_state_dict) and compared with the 1-rank
state, base weights, adapters and buffers alike."""

import shutil
import sys
from pathlib import Path

import pytest
import torch
from runs import config_file, launch, ranks
from safetensors.torch import load_file, save_file
from test_sft_adapter import make_sft_adapter
from transformers import AutoConfig, AutoModelForCausalLM

from kto_scale.assets import TINY_LLAMA_DIR
from kto_scale.config import ConfigError, KTOConfig
from kto_scale.sliced_load import sliced_checkpoint

SCRIPT = "tests/fsdp_state.py"
FSDP = dict(fsdp="full_shard", deepspeed=None)


def _state(tmp_path: Path, name: str, config: Path, num_ranks: int, mode: str = "sliced",
           env: dict[str, str] | None = None) -> dict:
    out = tmp_path / f"{name}.pt"
    launcher = ranks(num_ranks) if num_ranks > 1 else [sys.executable]
    result = launch([*launcher, SCRIPT, str(out), mode, "--config", str(config)], env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    saved = torch.load(out, weights_only=True)
    saved["log"] = result.stdout + result.stderr
    return saved


def _assert_equal(state: dict, reference: dict) -> None:
    assert state.keys() == reference.keys()
    different = [name for name in reference if not torch.equal(state[name], reference[name])]
    assert not different, different[:5]


@pytest.mark.e2e
def test_sliced_load_equals_rank0_broadcast_and_one_process(tmp_path, tiny_model):
    """The fp32 checkpoint cast to bf16 as it is read, with fresh adapters (each rank's own seeded init)."""
    config = config_file(tmp_path, "run", tiny_model, bf16=True, **FSDP)
    one = _state(tmp_path, "one", config, 1)
    sliced = _state(tmp_path, "sliced", config, 2)
    broadcast = _state(tmp_path, "broadcast", config, 2, mode="broadcast")
    assert sliced["sliced"] and not broadcast["sliced"]
    assert "each rank reads its own slices" in sliced["log"]
    assert next(iter(one["state"].values())).dtype == torch.bfloat16
    _assert_equal(sliced["state"], one["state"])
    _assert_equal(broadcast["state"], one["state"])


def _tied_sharded_model(path: Path) -> Path:
    """The tiny Llama with a tied LM head, saved in several files listed by model.safetensors.index.json."""
    model_config = AutoConfig.from_pretrained(TINY_LLAMA_DIR, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(model_config).save_pretrained(path, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (TINY_LLAMA_DIR / name).is_file():
            shutil.copy(TINY_LLAMA_DIR / name, path / name)
    assert len(list(path.glob("*.safetensors"))) > 2 and (path / "model.safetensors.index.json").is_file()
    return path


@pytest.mark.e2e
def test_sliced_load_of_a_tied_sharded_checkpoint_with_offload_and_an_sft_adapter(tmp_path):
    """Tied embeddings are one parameter, read once; the SFT adapter's weights (policy and reference) are
    each rank's own read of the adapter; FSDP2's offload keeps the shards on the CPU."""
    model = _tied_sharded_model(tmp_path / "model")
    sft = make_sft_adapter(model, tmp_path / "sft")
    config = config_file(tmp_path, "run", model, sft_adapter=str(sft), fsdp="full_shard offload", deepspeed=None)
    one = _state(tmp_path, "one", config, 1)
    sliced = _state(tmp_path, "sliced", config, 2)
    assert sliced["sliced"]
    assert any("reference" in name for name in one["state"])
    _assert_equal(sliced["state"], one["state"])


@pytest.mark.e2e
def test_a_checkpoint_it_cannot_slice_is_broadcast_from_rank0(tmp_path, tiny_model):
    """A weight stored twice (a second .safetensors file beside the model's) cannot be read as one
    checkpoint by the slicing reader, which reads every .safetensors file of the directory; from_pretrained
    reads model.safetensors alone. The ranks fall back to rank 0's broadcast and say why."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    save_file({"model.norm.weight": load_file(model / "model.safetensors")["model.norm.weight"]},
              model / "extra.safetensors")
    config = config_file(tmp_path, "run", model, **FSDP)
    one = _state(tmp_path, "one", config, 1)
    fallback = _state(tmp_path, "fallback", config, 2)
    assert not fallback["sliced"]
    assert "rank 0 loads the model and broadcasts it (model.norm.weight is in two of its .safetensors files)" \
        in fallback["log"]
    _assert_equal(fallback["state"], one["state"])


@pytest.mark.e2e
@pytest.mark.parametrize("tied", [False, True])
def test_random_weights_drawn_per_shard_equal_one_process(tmp_path, tied):
    """init_random_weights on 2 ranks: each builds the model empty and draws the seeded weights module by
    module into a whole scratch copy, keeping its rows (kto_scale.random_init.init_shards); the one process
    draws the whole model. The same kernels on the same whole tensors in the same order: equal to the bit.
    Untied in bf16; tied (one weight, drawn twice as transformers' init draws it) with offload."""
    model = tmp_path / "model"
    AutoConfig.from_pretrained(TINY_LLAMA_DIR, tie_word_embeddings=tied).save_pretrained(model)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (TINY_LLAMA_DIR / name).is_file():
            shutil.copy(TINY_LLAMA_DIR / name, model / name)
    options = dict(fsdp="full_shard offload", deepspeed=None) if tied else dict(bf16=True, **FSDP)
    config = config_file(tmp_path, "run", model, init_random_weights=True, **options)
    one = _state(tmp_path, "one", config, 1)
    drawn = _state(tmp_path, "drawn", config, 2)
    assert drawn["sliced"] and "each rank draws the seeded random weights and keeps its own shards" in drawn["log"]
    head, embedding = (next(w for name, w in one["state"].items() if name.endswith(suffix))
                       for suffix in ("lm_head.weight", "embed_tokens.weight"))
    assert torch.equal(head, embedding) == tied
    _assert_equal(drawn["state"], one["state"])


def _hub_cache(cache: Path, repo: str, model: Path) -> Path:
    """`model`'s files laid out as huggingface_hub caches a download of `repo` (blobs, snapshot links, the
    ref), so that the hub id resolves offline, as on a cluster node that has downloaded it."""
    revision = "0" * 40
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    (root / "snapshots" / revision).mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revision)
    for n, file in enumerate(sorted(model.iterdir())):
        shutil.copy(file, root / "blobs" / f"blob{n}")
        (root / "snapshots" / revision / file.name).symlink_to(Path("../../blobs") / f"blob{n}")
    return root / "snapshots" / revision


@pytest.mark.e2e
def test_a_hub_id_is_read_in_slices_from_the_hub_cache(tmp_path, tiny_model):
    """The usual case on a cluster: model_name_or_path is a hub id, resolved in each node's hub cache
    (symlinks into blobs), offline. Every rank reads its slices there; the weights are one process's."""
    snapshot = _hub_cache(tmp_path / "hub", "kto-test/tiny", tiny_model)
    config = config_file(tmp_path, "run", Path("kto-test/tiny"), **FSDP)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    one = _state(tmp_path, "one", config, 1, env=env)
    sliced = _state(tmp_path, "sliced", config, 2, env=env)
    assert sliced["sliced"]
    assert f"each rank reads its own slices of {snapshot}" in sliced["log"]
    _assert_equal(sliced["state"], one["state"])


def test_which_checkpoints_are_read_in_slices(tmp_path, tiny_model):
    """The decision, from the files' headers and the model's shapes (nothing loaded)."""
    directory, why = sliced_checkpoint(KTOConfig(model_name_or_path=str(tiny_model)))
    assert directory == tiny_model and why == ""
    renamed = tmp_path / "renamed"
    shutil.copytree(tiny_model, renamed)
    tensors = load_file(renamed / "model.safetensors")
    tensors["model.final_norm.weight"] = tensors.pop("model.norm.weight")  # a name transformers would convert
    save_file(tensors, renamed / "model.safetensors")
    directory, why = sliced_checkpoint(KTOConfig(model_name_or_path=str(renamed)))
    assert directory is None and "model.norm.weight (absent)" in why
    (renamed / "model.safetensors").write_bytes(b"cut short")  # a partial download: one line, no traceback
    with pytest.raises(ConfigError, match="model.safetensors is not a readable safetensors file"):
        sliced_checkpoint(KTOConfig(model_name_or_path=str(renamed)))
    (renamed / "model.safetensors").unlink()
    _, why = sliced_checkpoint(KTOConfig(model_name_or_path=str(renamed)))
    assert why == "the checkpoint has no model.safetensors(.index.json)"
