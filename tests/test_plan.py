"""The capacity planner (kto_scale.plan, launch/plan.py): its arithmetic on a shape small enough to
compute by hand, and its one-line answers to bad input."""


import types

import pytest
import torch
from peft import LoraConfig, get_peft_model
from runs import run_here
from transformers import AutoConfig, AutoModelForCausalLM

from kto_scale.assets import TINY_LLAMA_DIR
from kto_scale.config import REPO_ROOT, ConfigError, KTOConfig
from kto_scale.memory_report import log_estimate
from kto_scale.model_shape import read_shape
from kto_scale.plan import (
    GPU_OVERHEAD,
    Cluster,
    activation_bytes,
    estimate,
    largest_micro_batch,
    layer_activation_bytes,
)
from kto_scale.plan_report import check_layout, parse_size

# The packaged tiny Llama: H 64, I 176, 2 layers, 4 heads x 16 (A 64), 2 kv heads (K 32), V 938, untied.
LAYER = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 176 + 2 * 64  # q, k, v, o, MLP, 2 norms = 46208
EDGES = 938 * 64 * 2 + 64  # embedding, LM head, final norm = 120128
LORA = 2 * 4 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 176))  # r 4 on the 7 projections = 9344


def tiny_config(**overrides) -> KTOConfig:
    values = {"model_name_or_path": str(TINY_LLAMA_DIR), "dataset_name": "unused.jsonl", "max_length": 64,
              "max_prompt_length": 32, "per_device_train_batch_size": 2, "lora_r": 4, "lora_dropout": 0.0,
              "deepspeed": str(REPO_ROOT / "ds_configs/zero2.json")}
    values.update(overrides)
    return KTOConfig(**values)


def test_shape_counts_the_models_parameters():
    """Hand-computed counts, and the same as the model transformers builds from that config."""
    shape = read_shape(tiny_config())
    assert (shape.layer_params, shape.edge_params, shape.params) == (LAYER, EDGES, 2 * LAYER + EDGES)
    assert shape.lora_params(4, None) == LORA
    assert shape.lora_params(4, ["q_proj", "v_proj"]) == 2 * 4 * ((64 + 64) + (64 + 32))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_LLAMA_DIR))
    assert shape.params == sum(p.numel() for p in model.parameters())


def test_zero2_estimate_by_hand():
    """fp32 (w = 4), ZeRO-2 on 2 GPUs, micro-batch 2 x 64 tokens (t = 128), no checkpointing, reference
    on the fly. Per token and layer S = 8H + 8 + 2wH + 4wA + 4 heads + wT + 4wI + 7wr
    = 512 + 8 + 512 + 1024 + 16 + 256 + 2816 + 112 = 5256."""
    config = tiny_config()
    shape = read_shape(config)
    result = estimate(config, shape, Cluster(1, 2, 80 * 2**30), overhead=1000)
    s, t = 5256, 128
    passes = activation_bytes(shape, config, 2, checkpointing=False)
    assert passes["activations (gradient pass)"] == 2 * t * s + t * s + t * (4 + 4) * 64  # L t S, gradients, edges
    assert passes["LM head chunk"] == 2 * 63 * 938 * 16  # C = min(1024, B (T - 1)) rows of V logits, 16 bytes
    # No-grad passes over x + y + y' (2 rows of 64 + 63 tokens; wT is then 4 x 127; C = 2 x 126 rows):
    # above the gradient pass for this tiny shape (its vocabulary is small), so they set the peak.
    no_grad = 2 * 127 * (s - 4 * 64 + 4 * 127) + 2 * 126 * 938 * (4 + 8)
    assert no_grad > passes["activations (gradient pass)"] + passes["LM head chunk"]
    assert result.gpu == {
        "base weights": (2 * LAYER + EDGES) * 4,  # every GPU holds the whole base
        "DeepSpeed buckets": 64 * 64 * 4,
        "LoRA weights": 4 * LORA, "LoRA gradients": 4 * LORA,
        "Adam state": 8 * LORA // 2,  # ZeRO-2: split over the 2 ranks
        "activations (no-grad passes)": no_grad,
        "framework overhead": 1000,
    }
    assert result.host_load == 2 * (2 * LAYER + EDGES) * 4  # each rank loads the whole model on the CPU
    assert result.gpu_total == sum(result.gpu.values())


def test_fsdp_and_zero3_shard_the_base():
    """FSDP2 on 2 ranks keeps 1/2 of every weight, 2 gathered layers and one V x H (the embedding or the
    LM head, each gathered only while it runs); its
    fp32 LoRA gradients stay unsharded while 2 micro-batches accumulate. ZeRO-3: 1/2 of everything."""
    config = tiny_config(fsdp="full_shard", deepspeed=None, gradient_accumulation_steps=2)
    fsdp = estimate(config, read_shape(config), Cluster(1, 2, 2**30))
    assert fsdp.gpu["base weights"] == (2 * LAYER + EDGES) * 4 // 2 + 2 * LAYER * 4 + 938 * 64 * 4
    assert (fsdp.gpu["LoRA weights"], fsdp.gpu["LoRA gradients"], fsdp.gpu["Adam state"]) == (
        4 * LORA // 2, 4 * LORA, 8 * LORA // 2)
    assert fsdp.host_load == 0  # each rank reads its slices into its GPU shards
    offload = estimate(tiny_config(fsdp="full_shard offload", deepspeed=None), read_shape(config), Cluster(1, 2, 2**30))
    assert offload.host_load == 2 * ((2 * LAYER + EDGES) * 4 // 2)  # the shards are the host's
    random = estimate(tiny_config(fsdp="full_shard", deepspeed=None, init_random_weights=True), read_shape(config),
                      Cluster(1, 2, 2**30))
    assert random.host_load == 2 * 938 * 64 * 4  # each rank draws one module at a time: the V x H embedding
    config = tiny_config(deepspeed=str(REPO_ROOT / "ds_configs/zero3.json"))
    zero3 = estimate(config, read_shape(config), Cluster(2, 1, 2**30))
    assert zero3.gpu["base weights"] == (2 * LAYER + EDGES) * 4 // 2 + 2 * LAYER * 4 + 938 * 64 * 4
    assert zero3.gpu["LoRA weights"] == 4 * LORA // 2
    assert zero3.host_load == (2 * LAYER + EDGES) * 4 // 2  # one rank per node, loaded partitioned
    # DeepSpeed's live-parameter cache (1e9 in the shipped JSON) can hold this whole model: said, not counted.
    assert any("stage3_max_live_parameters (1,000,000,000: 0.00 GiB)" in note for note in zero3.notes)
    assert not any("stage3_max_live_parameters" in note for note in fsdp.notes)


def test_quantized_and_checkpointed():
    """4-bit: 1/2 byte + 1/64 + 4/16384 (nested constants) per linear weight; checkpointing keeps
    one wH input per layer and token plus one recomputed layer (bf16: w = 2)."""
    config = tiny_config(load_in_4bit=True, bf16=True, gradient_checkpointing=True)
    shape = read_shape(config)
    result = estimate(config, shape, Cluster(1, 1, 2**30))
    linear = shape.linear_params
    assert result.gpu["base weights"] == int(linear * (0.5 + 1 / 64 + 4 / 16384)) + (shape.params - linear) * 2
    s = 8 * 64 + 8 + 2 * 2 * 64 + 4 * 2 * 64 + 4 * 4 + 2 * 64 + 4 * 2 * 176 + 7 * 2 * 4
    t = 128
    passes = activation_bytes(shape, config, 2, checkpointing=True)
    assert passes["activations (gradient pass)"] == 2 * t * 2 * 64 + t * s + t * s + t * (4 + 2) * 64
    # Checkpointing shrinks the gradient pass below the no-grad passes (x + y + y', 2 x 127 tokens),
    # which then set the step's peak.
    assert result.gpu["activations (no-grad passes)"] == passes["no-grad passes (peak)"]


def test_largest_micro_batch_is_the_boundary():
    config = tiny_config()
    shape = read_shape(config)
    cluster = Cluster(1, 1, GPU_OVERHEAD + 64 * 2**20)
    largest = largest_micro_batch(config, shape, cluster)
    assert largest > 0
    assert estimate(config, shape, cluster, largest).gpu_total <= cluster.gpu_memory
    assert estimate(config, shape, cluster, largest + 1).gpu_total > cluster.gpu_memory


def test_parse_size():
    assert parse_size("80GB", "x") == 80 * 2**30 and parse_size("1TB", "x") == 2**40 and parse_size("24", "x") == 24 * 2**30
    with pytest.raises(ConfigError, match="--gpu_memory"):
        parse_size("lots", "--gpu_memory")


BAD_INPUT = [
    (["--model_name_or_path", "/nonexistent/model"], "model_name_or_path"),
    (["--gpus_per_node", "8"], "6 examples"),  # 6 examples, 8 GPUs
    (["--load_in_4bit", "true", "--fp16", "true", "--fsdp", "full_shard", "--deepspeed", "null"], "fsdp"),
    (["--deepspeed", "ds_configs/zero3_offload.json", "--gpus_per_node", "2", "--host_memory", "0.0001GB"],
     "--host_memory"),
    (["--gpu_memory", "a lot"], "--gpu_memory"),
]


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> dict:
    """launch/plan.py on 6 examples, from its command line (in this process: it starts no ranks): a plan
    that fits, one that does not, and each BAD_INPUT: {name: how it ended}."""
    data = tmp_path_factory.mktemp("plan") / "data.jsonl"
    data.write_text("".join(f'{{"prompt": "p", "completion": "c", "label": {str(i % 2 == 0).lower()}}}\n'
                            for i in range(6)))
    command = ["--model_name_or_path", str(TINY_LLAMA_DIR), "--dataset_name", str(data), "--max_length", "64",
               "--max_prompt_length", "32"]
    cases = {"fits": ["--nodes", "1", "--gpus_per_node", "2", "--gpu_memory", "80GB"],
             "tight": ["--gpus_per_node", "2", "--gpu_memory", "1GB"],  # below the 2 GiB CUDA allowance
             **{f"bad{i}": args for i, (args, _) in enumerate(BAD_INPUT)}}
    return {name: run_here("launch/plan.py", *command, *args, env={"HF_HUB_OFFLINE": "1"})
            for name, args in cases.items()}


def test_cli_prints_the_plan(plans):
    done = plans["fits"]
    assert done.returncode == 0, done.stderr
    assert "fits: yes" in done.stdout and "host RAM at load" in done.stdout and "LM head chunk" in done.stdout
    tight = plans["tight"]
    assert tight.returncode == 1 and "fits: NO" in tight.stdout and "to fit, change:" in tight.stdout


@pytest.mark.parametrize("case", range(len(BAD_INPUT)), ids=[named for _, named in BAD_INPUT])
def test_cli_bad_input_is_one_line(plans, case):
    done, named = plans[f"bad{case}"], BAD_INPUT[case][1]
    assert done.returncode == 1 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], done.stderr


def test_saved_activations_are_what_autograd_saves():
    """S, the planner's bytes per token and layer, against the bytes autograd actually saves in the
    decoder of the tiny LoRA Llama (fp32, sdpa, a padded batch): every tensor a saved_tensors_hooks
    sees, counted once per storage, parameters left out. The only other saved tensors are RoPE's cos
    and sin, shared by all layers ([1, 1, T, head_dim] each). Exact: both sides count bytes."""
    config = tiny_config(attn_implementation="sdpa")
    shape = read_shape(config)
    model = get_peft_model(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_LLAMA_DIR),
                                                            attn_implementation="sdpa"),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    batch, length = 2, 64
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :5] = 0  # padding: transformers passes sdpa a [B, 1, T, T] mask
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.get_base_model().get_decoder()(input_ids=torch.randint(900, (batch, length)), attention_mask=mask)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = sum(size for pointer, size in storages.items() if pointer not in parameters)
    rope = 2 * length * shape.head_dim * 4
    assert saved - rope == shape.layers * batch * length * layer_activation_bytes(shape, config, 4, length)


def test_zero3_shards_the_packed_4bit_weights_but_loads_them_whole():
    """ZeRO-3 partitions the packed 4-bit weights and the 16-bit rest over N, not the quantization
    constants (no parameters), and gathers 2 layers as stored and the 16-bit LM head; at load every GPU holds the whole
    quantized base plus the overhead (transformers skips zero.Init for it)."""
    config = tiny_config(load_in_4bit=True, bf16=True, deepspeed=str(REPO_ROOT / "ds_configs/zero3.json"))
    shape = read_shape(config)
    result = estimate(config, shape, Cluster(1, 4, 2**30))
    linear, constants = shape.linear_params, int(shape.linear_params * (1 / 64 + 4 / 16384))
    whole = linear // 2 + constants + (shape.params - linear) * 2
    gathered = 2 * (linear // 2 + (shape.params - linear - EDGES) * 2) // 2  # 2 of the 2 layers, as stored
    assert result.gpu["base weights"] == (whole - constants) // 4 + constants + gathered + 938 * 64 * 2
    assert result.gpu_load == whole + GPU_OVERHEAD and result.host_load == 0
    assert result.gpu_peak == max(result.gpu_total, result.gpu_load)


def test_a_run_warns_on_the_load_peak_of_a_quantized_base(monkeypatch, caplog, tmp_path):
    """On a GPU between the training total and the load peak (a 1.1B Llama shape's 4-bit base loaded
    whole before ZeRO-3 partitions it over 4 GPUs), the run's start warns, naming the load; on one above
    both, it does not. Only the model's config.json is read."""
    shape = AutoConfig.from_pretrained(TINY_LLAMA_DIR)
    shape.update(dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000))
    shape.save_pretrained(tmp_path)
    config = tiny_config(model_name_or_path=str(tmp_path), load_in_4bit=True, bf16=True,
                         deepspeed=str(REPO_ROOT / "ds_configs/zero3.json"))
    result = estimate(config, read_shape(config), Cluster(1, 4, 2**30))
    assert result.gpu_load > result.gpu_total
    for gpu_memory, warned in (((result.gpu_total + result.gpu_load) // 2, True), (result.gpu_load + 1, False)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device, memory=gpu_memory: types.SimpleNamespace(total_memory=memory))
        caplog.clear()
        log_estimate(config, world_size=4)
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert bool(warnings) == warned, warnings
        assert not warned or "the estimate while the quantized base loads is" in warnings[0]


def test_8bit_on_zero3_is_refused_naming_the_alternative():
    config = tiny_config(load_in_8bit=True, deepspeed=str(REPO_ROOT / "ds_configs/zero3.json"))
    cluster = Cluster(1, 2, 2**30)
    with pytest.raises(ConfigError, match="8-bit weights .* use load_in_4bit on ZeRO-3, or ds_configs/zero2.json"):
        check_layout(config, estimate(config, read_shape(config), cluster), cluster, None)
