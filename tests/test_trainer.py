"""End-to-end training runs on a tiny Llama: one process (plain python) and two ZeRO-3 ranks
(the deepspeed launcher, gloo on CPU). Each run is a subprocess, like a user's."""

import math
import sys

import pytest
import torch
from peft import PeftModel
from runs import TRAIN, config_file, generations, metrics, run, run_together
from safetensors.torch import load_file
from tolerances import merged_logits_atol, run_tolerances

from kto_scale.collate import collate
from kto_scale.config_io import CONFIG_FILE, load_config
from kto_scale.generate import generation_prompts
from kto_scale.model import SequenceLogps, load_base_model, load_tokenizer, reference_mode
from kto_scale.prepare import prepare_data
from kto_scale.scoring import evaluation_metrics
from kto_scale.trainer import class_balance_warning


@pytest.mark.e2e
def test_one_process_run_trains_and_saves(one_process_run):
    train = metrics(one_process_run, "train")
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["kl"]) for m in train)
    assert train[0]["loss"] == pytest.approx(0.5, abs=1e-3)  # step 1: policy == reference, so every loss is 1 - sigmoid(0)
    for path in ("adapter", "checkpoint-2"):
        saved = one_process_run / path
        assert {"adapter_config.json", "adapter_model.safetensors", "kto_config.yaml"} <= {p.name for p in saved.iterdir()}
    lora_b = [t for k, t in load_file(one_process_run / "adapter/adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)  # peft starts B at zero: training moved it


@pytest.mark.e2e
def test_saved_adapter_reproduces_final_eval(one_process_run):
    """Base + saved adapter, scored outside DeepSpeed, gives the eval numbers the run logged at its
    last step: the adapter round-trips and the base weights were never changed."""
    config = load_config(["--config", str(one_process_run / CONFIG_FILE)])
    tokenizer = load_tokenizer(config)
    _, eval_set = prepare_data(config, tokenizer)
    policy = PeftModel.from_pretrained(load_base_model(config), one_process_run / "adapter")
    module = SequenceLogps(policy)
    batch = collate(eval_set, list(range(len(eval_set))), tokenizer.pad_token_id)
    with torch.no_grad():
        scores = {"policy": module(**batch["policy"]), "policy_kl": module(**batch["kl"])}
    with reference_mode(policy):
        scores.update(reference=module(**batch["policy"]), reference_kl=module(**batch["kl"]))
    scores.update(desirable=batch["desirable"], pair_id=batch["pair_id"])
    expected = evaluation_metrics(scores, config.beta, (config.desirable_weight, config.undesirable_weight))
    logged, atol = metrics(one_process_run)[-1], run_tolerances(one_process_run, 0.0)[-1]  # the same weights
    assert logged["split"] == "eval" and logged["step"] == 4
    for key in ("loss", "kl", "rewards/desirable", "rewards/undesirable", "reward_accuracy"):
        assert logged[key] == pytest.approx(expected[key], abs=atol[key]), key


def _plain_generate(model, prompt: list[int], tokenizer) -> str:
    """transformers' greedy generate of one prompt (no padding), cut at EOS (8 new tokens as runs.py)."""
    with torch.no_grad():
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    ids = ids[0, len(prompt):].tolist()
    return tokenizer.decode(ids[: ids.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in ids else ids,
                            skip_special_tokens=True)


@pytest.mark.e2e
def test_generations_of_held_out_prompts(one_process_run):
    """generations.jsonl: 2 distinct eval prompts at step 0 and each evaluation; at step 0 the policy
    (LoRA B = 0) writes the reference's text; the final policy's and the reference's texts are what
    plain transformers + peft generate from the saved adapter and the base."""
    config = load_config(["--config", str(one_process_run / CONFIG_FILE)])
    tokenizer = load_tokenizer(config)
    _, eval_set = prepare_data(config, tokenizer)
    lines = generations(one_process_run)
    assert [line["step"] for line in lines] == [0, 0, 2, 2, 4, 4]
    prompts = [line["prompt"] for line in lines[:2]]
    assert [line["prompt"] for line in lines] == prompts * 3 and len(set(prompts)) == 2
    eval_prompts = set(tokenizer.batch_decode(eval_set[:]["prompt_ids"], skip_special_tokens=True))
    assert set(prompts) <= eval_prompts
    assert all(line["policy"] == line["reference"] for line in lines[:2])
    assert len({line["reference"] for line in lines[::2]}) == 1  # the reference is generated once
    assert lines[-2]["policy"] != lines[-2]["reference"]  # training changed what the policy writes

    chosen = generation_prompts(eval_set, 2, config.data_seed)
    assert tokenizer.batch_decode(chosen, skip_special_tokens=True) == prompts
    policy = PeftModel.from_pretrained(load_base_model(config), one_process_run / "adapter").eval()
    assert [line["policy"] for line in lines[-2:]] == [_plain_generate(policy, p, tokenizer) for p in chosen]
    base = load_base_model(config).eval()
    assert [line["reference"] for line in lines[-2:]] == [_plain_generate(base, p, tokenizer) for p in chosen]


@pytest.mark.e2e
def test_merge_of_trained_adapter_matches_peft(tmp_path, tiny_model, one_process_run):
    """The merge command on a training run's output gives a plain model with peft's logits, within
    merged_logits_atol of the 2-layer tiny model (widest fan-in: intermediate_size 176)."""
    from transformers import AutoModelForCausalLM

    run([sys.executable, "launch/merge_lora.py", "--base", str(tiny_model), "--adapter",
         str(one_process_run / "adapter"), "--output", str(tmp_path / "merged")])
    ids = torch.randint(3, 100, (2, 9))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), one_process_run / "adapter")
    with torch.no_grad():
        want = peft(ids).logits
        torch.testing.assert_close(merged(ids).logits, want, atol=merged_logits_atol(want, 176, 2), rtol=0)


@pytest.mark.e2e
def test_sampled_generation_leaves_the_training_alone(tmp_path, tiny_model):
    """With LoRA dropout drawing on the training RNG, a run that samples generations at step 0 and after
    step 1 logs exactly the losses of a run without generation: generating neither draws from the
    training's random stream nor leaves the model in eval mode (dropout off)."""
    args = dict(lora_dropout=0.3, max_steps=2, eval_steps=1, save_steps=100)
    run_together({"sampled": [*TRAIN, "--config", str(config_file(tmp_path, "sampled", tiny_model,
                                                                  generation_do_sample=True, **args))],
                  "off": [*TRAIN, "--config", str(config_file(tmp_path, "off", tiny_model, generate_during_eval=False,
                                                              **args))]})
    for split in ("train", "eval"):
        assert ([m["loss"] for m in metrics(tmp_path / "sampled", split)]
                == [m["loss"] for m in metrics(tmp_path / "off", split)]), split
    assert not (tmp_path / "off" / "generations.jsonl").exists()
    lines = generations(tmp_path / "sampled")
    assert [line["step"] for line in lines] == [0, 0, 1, 1, 2, 2]
    # Sampled with the same seed from the same distribution: at step 0 the policy draws the reference's text.
    assert all(line["policy"] == line["reference"] for line in lines[:2])


def test_class_balance_warning_says_when_a_class_is_missing():
    """Only desirable examples: the warning says a class is missing, not that 'auto' weights would help."""
    message = class_balance_warning(264, 0, (1.0, 1.0))
    assert "no undesirable examples (all 264 are desirable)" in message and "auto" not in message
    assert "Add desirable examples (label true)" in class_balance_warning(0, 10, (1.0, 1.0))
    assert "3.000 is outside" in class_balance_warning(30, 10, (1.0, 1.0))
    assert class_balance_warning(30, 10, (1.0, 3.0)) is None
