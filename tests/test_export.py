"""kto_scale.export on tiny random Llamas: merged logits equal peft's, refusals are clear, writes are atomic."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tolerances import merged_logits_atol
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from kto_scale import export
from kto_scale.adapter_files import AdapterError
from kto_scale.assets import TINY_LLAMA_DIR
from kto_scale.export import ExportError, export_adapter, merge_lora
from kto_scale.outdir import OWNED, record_owned

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_TOKEN = "<|adapter_only|>"
TOKENS = torch.tensor([[1, 5, 9, 33, 70, 2, 127, 64], [3, 3, 8, 100, 12, 44, 90, 7]])


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random 2-layer Llama (hidden 64, vocab 128) in fp32."""
    torch.manual_seed(seed)
    sizes = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 128}
    config = LlamaConfig(**{**sizes, **overrides})
    return LlamaForCausalLM(config).eval()


def save_adapter(model: LlamaForCausalLM, path: Path, seed: int = 1, **lora) -> PeftModel:
    """Attach LoRA (r 4, alpha 8, all projections by default) with random, non-zero B, and save it."""
    settings = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **lora}
    peft_model = get_peft_model(model, LoraConfig(**settings))
    torch.manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would make every merge trivially right
            torch.nn.init.normal_(param, std=0.5)
    peft_model.save_pretrained(path)
    return peft_model


def assert_merged_logits_close(merged: torch.Tensor, unmerged: torch.Tensor, fan_in: int = 128) -> None:
    """A merged model's logits are peft's within merged_logits_atol (tests/tolerances.py) of these 2-layer
    models (widest fan-in: tiny_llama's intermediate_size 128): (W + s B A) x and W x + s B (A x) are
    different kernels."""
    torch.testing.assert_close(merged, unmerged, atol=merged_logits_atol(unmerged, fan_in, 2), rtol=0)


def peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    """The logits of base + adapter through peft, unmerged."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        return PeftModel.from_pretrained(model, adapter).eval()(TOKENS).logits


def plain_logits(path: Path) -> torch.Tensor:
    """The logits of a model dir loaded without peft."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert not any("lora" in name for name, _ in model.named_parameters())
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory) -> tuple[Path, Path]:
    """A base saved in many shards with the tiny tokenizer, and a LoRA adapter with its own tokenizer (one
    token more)."""
    root = tmp_path_factory.mktemp("fixture")
    model = tiny_llama()
    model.save_pretrained(root / "base", max_shard_size="20KB")
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA_DIR)
    tokenizer.save_pretrained(root / "base")
    save_adapter(model, root / "adapter")
    tokenizer.add_tokens([ADAPTER_TOKEN])
    tokenizer.save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def tokenizer_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name in export.TOKENIZER_FILES)


def test_merge_matches_peft_and_loads_without_peft(base_and_adapter, tmp_path):
    base, adapter = base_and_adapter
    out = merge_lora(base, adapter, tmp_path / "merged", dtype="fp32", max_shard_size="60KB")
    assert_merged_logits_close(plain_logits(out), peft_logits(base, adapter))

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    total = 0
    for shard in shards:
        with safe_open(out / shard, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert {k for k, v in index["weight_map"].items() if v == shard} == set(f.keys())
            total += sum(f.get_tensor(k).nbytes for k in f.keys())
    assert index["metadata"]["total_size"] == total
    base_index = json.loads((base / "model.safetensors.index.json").read_text())
    assert index["weight_map"].keys() == base_index["weight_map"].keys()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("model")) == sorted([
        OWNED, "config.json", "generation_config.json", *tokenizer_files(adapter)])
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(adapter).get_vocab()
    assert ADAPTER_TOKEN in AutoTokenizer.from_pretrained(out).get_vocab()  # the adapter's, not the base's
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_bf16_output_and_single_shard(base_and_adapter, tmp_path):
    base, adapter = base_and_adapter
    out = merge_lora(base, adapter, tmp_path / "merged", dtype="bf16")
    assert not (out / "model.safetensors.index.json").exists()
    merged = load_file(out / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(merged[name], tensor.to(torch.bfloat16), atol=0, rtol=0)
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


@pytest.mark.parametrize("lora", [
    {"use_rslora": True},
    {"rank_pattern": {"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6}, "alpha_pattern": {"v_proj": 3}},
], ids=["rslora", "rank_and_alpha_pattern"])
def test_scaling_variants_match_peft(tmp_path, lora):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    save_adapter(model, tmp_path / "adapter", **lora)
    out = merge_lora(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert_merged_logits_close(plain_logits(out), peft_logits(tmp_path / "base", tmp_path / "adapter"))


def test_fan_in_fan_out_matches_peft(tmp_path):
    torch.manual_seed(0)  # GPT-2's Conv1D stores weights as [in, out], so peft's delta is transposed
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=16)).eval()
    model.save_pretrained(tmp_path / "base")
    save_adapter(model, tmp_path / "adapter", target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    out = merge_lora(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert_merged_logits_close(plain_logits(out), peft_logits(tmp_path / "base", tmp_path / "adapter"),
                               fan_in=4 * 64)  # GPT-2's MLP


def test_base_path_only_warns_but_architecture_must_match(base_and_adapter, tmp_path, caplog):
    base, adapter = base_and_adapter
    shutil.copytree(adapter, tmp_path / "adapter")
    config = json.loads((adapter / export.ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = "/other/machine/llama"
    (tmp_path / "adapter" / export.ADAPTER_CONFIG).write_text(json.dumps(config))
    merge_lora(base, tmp_path / "adapter", tmp_path / "merged")
    assert "trained on /other/machine/llama" in caplog.text

    config["auto_mapping"] = {"base_model_class": "MistralForCausalLM"}
    (tmp_path / "adapter" / export.ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="trained on a MistralForCausalLM"):
        merge_lora(base, tmp_path / "adapter", tmp_path / "merged2")


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`")
@pytest.mark.parametrize(("lora", "message"), [
    ({"use_dora": True}, "DoRA"),
    ({"bias": "lora_only"}, "bias='lora_only'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "embedding-layer LoRA"),
])
def test_unmergeable_adapters_refused(base_and_adapter, tmp_path, lora, message):
    base, _ = base_and_adapter
    save_adapter(tiny_llama(), tmp_path / "adapter", **lora)
    with pytest.raises(AdapterError, match=message) as err:
        merge_lora(base, tmp_path / "adapter", tmp_path / "merged")
    assert "unmerged" in str(err.value)
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize(("key", "on", "off", "message"), [
    ("use_warp_lora", True, None, "use_warp_lora=True"),  # an option of a newer peft than this one
    ("layer_replication", [[0, 1]], None, "layer_replication=[[0, 1]]"),  # a LoraConfig option off the allow-list
    ("init_lora_weights", "pissa_niter_4", "gaussian", "rewrites the base weights (init_lora_weights='pissa_niter_4')"),
], ids=["unknown_option", "off_the_allow_list", "base_rewriting_init"])
def test_settings_outside_the_allow_list_are_refused_by_name(base_and_adapter, tmp_path, key, on, off, message):
    """Only the settings the merge implements pass; any other must hold peft's default (off), and merges then."""
    base, adapter = base_and_adapter
    shutil.copytree(adapter, tmp_path / "adapter")
    config = json.loads((adapter / export.ADAPTER_CONFIG).read_text())
    (tmp_path / "adapter" / export.ADAPTER_CONFIG).write_text(json.dumps({**config, key: on}))
    with pytest.raises(AdapterError, match=re.escape(message)):
        merge_lora(base, tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    (tmp_path / "adapter" / export.ADAPTER_CONFIG).write_text(json.dumps({**config, key: off}))
    merge_lora(base, tmp_path / "adapter", tmp_path / "merged")


def test_adapter_of_another_model_reported(base_and_adapter, tmp_path):
    base, adapter = base_and_adapter
    save_adapter(tiny_llama(intermediate_size=96), tmp_path / "wide")
    with pytest.raises(AdapterError, match=r"mlp.up_proj: the base weight is \(128, 64\), but .* is \(96, 64\)"):
        merge_lora(base, tmp_path / "wide", tmp_path / "merged")

    shutil.copytree(adapter, tmp_path / "renamed")
    tensors = load_file(adapter / export.ADAPTER_WEIGHTS)
    save_file({k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()},
              tmp_path / "renamed" / export.ADAPTER_WEIGHTS)
    with pytest.raises(AdapterError, match=r"layers.7.self_attn.q_proj: the base has no weight"):
        merge_lora(base, tmp_path / "renamed", tmp_path / "merged")

    (tmp_path / "renamed" / "config.json").write_text('{"model_type": "mistral"}')
    with pytest.raises(AdapterError, match="model_type 'mistral'"):
        merge_lora(base, tmp_path / "renamed", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_non_empty_output_needs_overwrite(base_and_adapter, tmp_path):
    base, adapter = base_and_adapter
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(AdapterError, match="not empty; pass --overwrite"):
        merge_lora(base, adapter, out)
    assert (out / "old.txt").read_text() == "keep me"
    (out / "old.txt").unlink()
    (out / "config.json").write_text("{}")  # named like a merge's file, but no merge recorded writing it
    with pytest.raises(ExportError, match="which no kto-scale run recorded"):
        merge_lora(base, adapter, out, overwrite=True)
    (out / "config.json").unlink()
    merge_lora(base, adapter, out)
    merge_lora(base, adapter, out, overwrite=True)  # an earlier merge: replaced
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temporary and no lock file left
    with pytest.raises(AdapterError, match="contains or lies inside the input"):
        merge_lora(base, adapter, base, overwrite=True)


def test_output_around_or_inside_an_input_is_refused(base_and_adapter, tmp_path):
    """`--output outputs/demo` with inputs in outputs/demo/ would delete them: refused, whatever the spelling."""
    run = tmp_path / "run"
    base, adapter = shutil.copytree(base_and_adapter[0], run / "base_model"), shutil.copytree(base_and_adapter[1], run / "adapter")
    (tmp_path / "link").symlink_to(run)
    for output in (run, tmp_path / "link", run / "adapter" / ".." , run / "adapter" / "merged"):
        with pytest.raises(AdapterError, match="contains or lies inside the input"):
            merge_lora(base, adapter, output, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "base_model"]
    assert (base / "config.json").is_file() and (adapter / "adapter_config.json").is_file()


def test_overwrite_replaces_only_an_earlier_export(base_and_adapter, tmp_path):
    """--overwrite replaces a directory of merge output, never one holding other files."""
    base, adapter = base_and_adapter
    out = merge_lora(base, adapter, tmp_path / "merged")
    merge_lora(base, adapter, out, overwrite=True)  # an earlier merge: replaced
    (out / "notes.txt").write_text("mine")
    with pytest.raises(AdapterError, match=r"holds files an export does not write \(notes.txt\)"):
        merge_lora(base, adapter, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.e2e
def test_a_second_export_into_the_same_output_is_refused(base_and_adapter, tmp_path):
    """While one merge holds the output, another process is refused with its host and pid."""
    base, adapter = base_and_adapter
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from kto_scale.outdir import lock_directory
        lock_directory({str(tmp_path / ".merged.lock")!r}, "x")
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(AdapterError, match=f"in use by host {socket.gethostname()} pid {holder.pid}"):
            merge_lora(base, adapter, tmp_path / "merged")
    finally:
        holder.kill()
        holder.wait()
    merge_lora(base, adapter, tmp_path / "merged")  # the OS released the dead holder's lock


def test_pickle_base_needs_allow_pickle(tmp_path):
    model = tiny_llama(tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "safe")
    state = model.state_dict()  # lm_head.weight and embed_tokens.weight share storage here
    save_adapter(model, tmp_path / "adapter")
    shutil.copytree(tmp_path / "safe", tmp_path / "bin", ignore=shutil.ignore_patterns("*.safetensors"))
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")

    with pytest.raises(AdapterError, match="--allow_pickle"):
        merge_lora(tmp_path / "bin", tmp_path / "adapter", tmp_path / "merged")
    out = merge_lora(tmp_path / "bin", tmp_path / "adapter", tmp_path / "merged", allow_pickle=True)
    merged = load_file(out / "model.safetensors")
    assert merged.keys() == state.keys()  # the base's key set, tied duplicate included
    assert_merged_logits_close(plain_logits(out), peft_logits(tmp_path / "safe", tmp_path / "adapter"))


def test_failure_mid_write_leaves_no_output(base_and_adapter, tmp_path, monkeypatch):
    base, adapter = base_and_adapter
    written, write_shard = [], export._write_shard

    def fail_after_first_shard(tensors, path):
        if written:
            raise OSError("disk full")
        written.append(path)
        write_shard(tensors, path)

    monkeypatch.setattr(export, "_write_shard", fail_after_first_shard)
    with pytest.raises(OSError, match="disk full"):
        merge_lora(base, adapter, tmp_path / "merged", max_shard_size="60KB")
    assert written and list(tmp_path.iterdir()) == []

    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "config.json").write_text("{}")
    record_owned(tmp_path / "merged", ["config.json"])  # as an earlier merge leaves it
    written.clear()
    with pytest.raises(OSError, match="disk full"):
        merge_lora(base, adapter, tmp_path / "merged", max_shard_size="60KB", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == [OWNED, "config.json"]


@pytest.mark.e2e
def test_killed_merge_leaves_no_output(base_and_adapter, tmp_path):
    base, adapter = base_and_adapter
    script = f"""
        import os, signal
        from kto_scale import export
        written, write_shard = [], export._write_shard
        def kill_after_first_shard(tensors, path):
            if written:
                os.kill(os.getpid(), signal.SIGKILL)
            written.append(path)
            write_shard(tensors, path)
        export._write_shard = kill_after_first_shard
        export.merge_lora({str(base)!r}, {str(adapter)!r}, {str(tmp_path / "merged")!r}, max_shard_size="60KB")
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert result.returncode == -9
    assert not (tmp_path / "merged").exists()
    # only the temporary dir, which nothing loads as a model, and the lock file, which the OS unlocked
    lock, leftover = sorted(tmp_path.iterdir())
    assert leftover.name.startswith(".merged.tmp-") and not (leftover / "config.json").exists()
    assert lock.name == ".merged.lock"
    merge_lora(base, adapter, tmp_path / "merged")  # a killed merge never blocks the next one


MEMORY_PROBE = """
    import json, sys
    from pathlib import Path
    from kto_scale.export import merge_lora

    def status_bytes(field):
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))
        return int(line.split()[1]) * 1024

    Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) here, after the imports' peak
    before = status_bytes("VmRSS:")
    merge_lora(sys.argv[1], sys.argv[2], sys.argv[3], max_shard_size="5MB")
    print(json.dumps({"growth": status_bytes("VmHWM:") - before}))
"""


@pytest.mark.e2e
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures peak RSS through Linux /proc")
def test_merge_streams_the_base(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=16, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=2048)
    model = LlamaForCausalLM(config)  # about 220 MB of fp32 weights
    model.save_pretrained(tmp_path / "base", max_shard_size="5MB")
    save_adapter(model, tmp_path / "adapter")
    model_bytes = sum(t.nbytes for t in model.state_dict().values())
    del model

    args = [tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"]
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(MEMORY_PROBE), *map(str, args)],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, check=True, timeout=300)
    growth = json.loads(result.stdout.splitlines()[-1])["growth"]
    print(f"model {model_bytes / 2**20:.0f} MiB, merge peak RSS growth {growth / 2**20:.1f} MiB")
    # Inherent: a shard, its serialised copy (safetensors' save_file), one input tensor: ~15 MB here.
    # glibc keeps ~30 MB of freed small tensors on its heap (tensors over 32 MB, as in real models, go
    # back to the OS), so the bound leaves room for that, still far below the whole model.
    assert growth < 0.4 * model_bytes


def test_adapter_only_from_peft_dir(base_and_adapter, tmp_path):
    base, adapter = base_and_adapter
    shutil.copytree(adapter, tmp_path / "named")  # keys with the adapter name, as some tools save them
    tensors = load_file(adapter / export.ADAPTER_WEIGHTS)
    save_file({k.replace(".weight", ".default.weight"): v for k, v in tensors.items()},
              tmp_path / "named" / export.ADAPTER_WEIGHTS)

    out = export_adapter(base, tmp_path / "named", tmp_path / "clean")
    assert sorted(p.name for p in out.iterdir()) == sorted([OWNED, export.ADAPTER_CONFIG, export.ADAPTER_WEIGHTS,
                                                             *tokenizer_files(adapter)])
    assert json.loads((out / export.ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == str(base)
    exported = load_file(out / export.ADAPTER_WEIGHTS)
    assert exported.keys() == tensors.keys()
    for name in tensors:
        torch.testing.assert_close(exported[name], tensors[name], atol=0, rtol=0)
    torch.testing.assert_close(peft_logits(base, out), peft_logits(base, adapter), atol=0, rtol=0)


DEEPSPEED_RUN = """
    import sys, deepspeed, torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from kto_scale.distributed import init_distributed

    class Wrapper(torch.nn.Module):  # kto-scale's engine wraps a module whose `model` is the PeftModel
        def __init__(self, model):
            super().__init__()
            self.model = model

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    base = LlamaForCausalLM(config)
    base.save_pretrained(sys.argv[3])
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    model.save_pretrained(sys.argv[2])  # the reference tensors, and the adapter_config.json kto-scale keeps
    init_distributed(timeout_s=60)  # kto-scale's own setup (it skips DeepSpeed's CPU inference op build)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=Wrapper(model), model_parameters=params, optimizer=torch.optim.AdamW(params),
        config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
    engine.save_checkpoint(sys.argv[1])
"""


@pytest.mark.e2e
def test_adapter_only_from_deepspeed_zero3(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0"}
    checkpoint, reference, base = tmp_path / "checkpoint", tmp_path / "reference", tmp_path / "base"
    subprocess.run([sys.executable, "-c", textwrap.dedent(DEEPSPEED_RUN), str(checkpoint), str(reference),
                    str(base)], env=env, check=True, capture_output=True, timeout=300)

    with pytest.raises(AdapterError, match="Copy the run's adapter_config.json"):
        export_adapter("meta-llama/Llama-3.1-8B", checkpoint, tmp_path / "clean")
    shutil.copy(reference / export.ADAPTER_CONFIG, checkpoint)
    out = export_adapter("meta-llama/Llama-3.1-8B", checkpoint, tmp_path / "clean")
    config = json.loads((out / export.ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == "meta-llama/Llama-3.1-8B"
    exported, expected = load_file(out / export.ADAPTER_WEIGHTS), load_file(reference / export.ADAPTER_WEIGHTS)
    assert exported.keys() == expected.keys() and len(expected) == 28
    for name in expected:
        torch.testing.assert_close(exported[name], expected[name], atol=0, rtol=0)

    from_checkpoint = merge_lora(base, checkpoint, tmp_path / "merged") / "model.safetensors"
    from_adapter = merge_lora(base, reference, tmp_path / "merged_ref") / "model.safetensors"
    assert from_checkpoint.read_bytes() == from_adapter.read_bytes()


def test_command_line_reports_bad_input(base_and_adapter, tmp_path):
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import merge_lora as cli
    finally:
        sys.path.remove(str(REPO / "launch"))
    base, adapter = base_and_adapter
    with pytest.raises(SystemExit, match=r"^error: .*adapter/config.json is missing"):
        cli.main(["--base", str(adapter), "--adapter", str(adapter), "--output", str(tmp_path / "m")])
    cli.main(["--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "m"), "--dtype", "fp16"])
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "float16"


def test_max_shard_size_is_read_as_save_pretrained_reads_it(base_and_adapter, tmp_path):
    """huggingface_hub's parser and split: "0.06MB" cuts the shards 60KB does; other units are an error
    naming the option, before anything is written."""
    base, adapter = base_and_adapter
    decimal = merge_lora(base, adapter, tmp_path / "decimal", max_shard_size="0.06MB")
    kilo = merge_lora(base, adapter, tmp_path / "kilo", max_shard_size="60KB")
    assert (decimal / "model.safetensors.index.json").read_text() == (kilo / "model.safetensors.index.json").read_text()
    with pytest.raises(AdapterError, match="--max_shard_size '5 parsecs'"):
        merge_lora(base, adapter, tmp_path / "bad", max_shard_size="5 parsecs")
    assert not (tmp_path / "bad").exists()
