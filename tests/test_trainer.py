"""End-to-end training runs on a tiny Llama: one process (plain python) and two ZeRO-3 ranks
(the deepspeed launcher, gloo on CPU). Each run is a subprocess, like a user's."""

import math
import sys

import pytest
import torch
from peft import PeftModel
from runs import ROOT, config_file, deepspeed_run, metrics, run
from safetensors.torch import load_file

from kto_scale.collate import BatchPlan, collate
from kto_scale.config import load_run_config
from kto_scale.loss import kl_baseline
from kto_scale.model import SequenceLogps, load_base_model, load_tokenizer, reference_mode
from kto_scale.prepare import prepare_data
from kto_scale.trainer import evaluation_metrics


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


def test_saved_adapter_reproduces_final_eval(one_process_run):
    """Base + saved adapter, scored outside DeepSpeed, gives the eval numbers the run logged at its
    last step: the adapter round-trips and the base weights were never changed."""
    config = load_run_config(one_process_run)
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
    logged = metrics(one_process_run, "eval")[-1]
    assert logged["step"] == 4
    for key in ("loss", "kl", "rewards/desirable", "rewards/undesirable", "reward_accuracy"):
        assert logged[key] == pytest.approx(expected[key], abs=1e-5), key


def test_two_rank_zero3_matches_one_process(tmp_path, tiny_model, one_process_run):
    """2 ranks x 1 accumulation x 2 per micro-batch under ZeRO-3 vs 1 rank x 2 x 2 under ZeRO-2:
    the same global batches, so the same per-step losses, KL baselines and eval numbers."""
    config = config_file(tmp_path, "two", tiny_model, gradient_accumulation_steps=1,
                         deepspeed=str(ROOT / "ds_configs/zero3.json"))
    deepspeed_run(2, config)
    for split, keys in (("train", ("loss", "kl", "rewards/desirable", "grad_norm")), ("eval", ("loss", "kl"))):
        one, two = metrics(one_process_run, split), metrics(tmp_path / "two", split)
        assert [m["step"] for m in one] == [m["step"] for m in two]
        for a, b in zip(one, two, strict=True):
            for key in keys:
                assert b[key] == pytest.approx(a[key], abs=1e-4), (split, a["step"], key)


def test_merge_of_trained_adapter_matches_peft(tmp_path, tiny_model, one_process_run):
    """The merge command on a training run's output gives a plain model with peft's logits."""
    from transformers import AutoModelForCausalLM

    run([sys.executable, "launch/merge_lora.py", "--base", str(tiny_model), "--adapter",
         str(one_process_run / "adapter"), "--output", str(tmp_path / "merged")])
    ids = torch.randint(3, 100, (2, 9))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), one_process_run / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft(ids).logits, atol=1e-5, rtol=1e-5)


def test_padding_free_run_matches_padded_run(tmp_path, tiny_model, one_process_run):
    """padding_free packs each micro-batch into one row: the same losses, z_ref and eval numbers."""
    run([sys.executable, "launch/train.py", "--config", str(config_file(tmp_path, "packed", tiny_model)),
         "--padding_free", "true"])
    for split, keys in (("train", ("loss", "kl", "rewards/desirable", "grad_norm")), ("eval", ("loss", "kl"))):
        for a, b in zip(metrics(one_process_run, split), metrics(tmp_path / "packed", split), strict=True):
            for key in keys:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (split, a["step"], key)


def test_micro_batch_kl_baseline_logs_the_mean_of_the_micro_batch_z_refs(tmp_path, tiny_model):
    """kl_baseline: micro_batch, 1 rank x 2 accumulation x 2: step 3's logged kl is the mean of the z_refs
    of its two micro-batches, recomputed here from the step's batches and the policy checkpointed
    after step 2 (the old code logged the last micro-batch's z_ref alone)."""
    config = config_file(tmp_path, "micro", tiny_model, kl_baseline="micro_batch", max_steps=3, save_steps=2,
                         eval_fraction=0.0, learning_rate=5e-2)
    run([sys.executable, "launch/train.py", "--config", str(config)])
    config = load_run_config(tmp_path / "micro")
    tokenizer = load_tokenizer(config)
    train_set, _ = prepare_data(config, tokenizer)
    plan = BatchPlan(len(train_set), config.per_device_train_batch_size, config.gradient_accumulation_steps, 1)
    policy = PeftModel.from_pretrained(load_base_model(config), tmp_path / "micro" / "checkpoint-2")
    module = SequenceLogps(policy)
    z_refs = []
    for indices in plan.micro_batches(step_in_epoch=2, epoch=0, seed=config.seed, rank=0):
        batch = collate(train_set, indices, tokenizer.pad_token_id)
        with reference_mode(policy):
            reference_kl = module(**batch["kl"])
        with torch.no_grad():
            kl = module(**batch["kl"]) - reference_kl
        z_refs.append(kl_baseline(kl.sum(), kl.numel()).item())
    assert abs(z_refs[0] - z_refs[1]) > 1e-3, z_refs  # else the test could not tell the mean from the last
    logged = metrics(tmp_path / "micro", "train")[2]
    assert logged["step"] == 3 and logged["kl"] == pytest.approx(sum(z_refs) / 2, abs=1e-6)
