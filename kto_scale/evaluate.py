"""Scoring: the no-grad log-probs of a batch, of a whole dataset, its eval metrics, and the evaluate
command that scores a dataset with a trained adapter (one JSON line per example, and the summary).

    python launch/evaluate.py --config outputs/run/kto_config.yaml --adapter outputs/run/adapter --output eval/

Each line of `examples.jsonl` holds the example's row, label, prompt and completion text, the policy and
reference log-probs and the implicit reward beta * (policy - reference), so the best and worst
examples can be read off, and the policy and reference log-probs of its KL pair (the mismatched
completion behind z_ref; bench/z_ref_noise.py reads them); `summary.json` holds the same numbers evaluation logs during training
(loss, z_ref, mean rewards, reward and pair accuracy). All ranks score a share of the data; the
numbers do not depend on how many ranks there are. With `generate_during_eval`, `generations.jsonl`
holds the adapter's and the reference's completions of the prompts training picks, from the scored split
(kto_scale.generate).
"""

import json
import logging
import shutil
from pathlib import Path

import torch
from peft import PeftModel
from torch import Tensor

from kto_scale.atomic import atomic_directory
from kto_scale.collate import collate, shard_indices, to_device
from kto_scale.config import ConfigError, KTOConfig
from kto_scale.distributed import all_gather, is_main_process, shutdown
from kto_scale.engine import Engine
from kto_scale.generate import GENERATIONS_FILE, PromptGenerations
from kto_scale.loss import balanced_weights, kl_baseline, kto_losses
from kto_scale.model import load_base_model, reference_mode, shares_prompt
from kto_scale.outdir import record_contents, replace_refusal
from kto_scale.ref_cache import RefCache
from kto_scale.sft_adapter import add_reference_adapter
from kto_scale.startup import setup

logger = logging.getLogger(__name__)

EVAL_FILES = ("examples.jsonl", "summary.json", GENERATIONS_FILE)  # all that --output may hold


def reference_logps(engine: Engine, batch: dict) -> tuple[Tensor, Tensor]:
    """([B] reference logps, [K] reference KL logps of the batch's kl_rows): one pass over x + y + y' when
    the batch was collated with shared_prompt (its "reference" inputs), else one over x + y and one over x + y'."""
    with reference_mode(engine.module.model):
        if "reference" in batch:
            reference, reference_kl = engine(**batch["reference"]).chunk(2)
            return reference, reference_kl[batch["kl_rows"]]
        return engine(**batch["policy"]), engine(**batch["kl"])


def no_grad_logps(engine: Engine, batch: dict, cache: RefCache | None) -> tuple[Tensor, Tensor, Tensor]:
    """([B] reference logps, [K] reference KL logps, [K] policy KL logps) of a batch, without gradients
    (the KL pairs of the batch's kl_rows).

    With a precomputed reference cache the reference passes are skipped: a lookup by dataset row.
    """
    if cache is not None:
        reference, reference_kl = (t.to(engine.device) for t in cache.lookup(batch["index"].cpu()))
        reference_kl = reference_kl[batch["kl_rows"]]
    else:
        reference, reference_kl = reference_logps(engine, batch)
    with torch.no_grad():
        policy_kl = engine(**batch["kl"])
    return reference, reference_kl, policy_kl


def score_dataset(engine: Engine, dataset, batch_size: int, pad_id: int, cache: RefCache | None,
                  packed: bool = False, shared_prompt: bool = False) -> dict[str, Tensor]:
    """Policy and reference log-probs of every example and KL pair, gathered from all ranks (packed,
    shared_prompt: the layouts of kto_scale.collate.collate).

    Returns [N] tensors in dataset order (filler rows removed), identical on every rank:
    index, desirable, pair_id, policy, reference, policy_kl, reference_kl.
    """
    names = ("index", "desirable", "pair_id", "weight", "policy", "reference", "policy_kl", "reference_kl")
    columns = {k: [] for k in names}
    engine.eval()  # no LoRA dropout while scoring
    for indices in shard_indices(len(dataset), batch_size, engine.world_size, engine.global_rank):
        batch = to_device(collate(dataset, indices, pad_id, packed, shared_prompt), engine.device)
        reference, reference_kl, policy_kl = no_grad_logps(engine, batch, cache)
        with torch.no_grad():
            policy = engine(**batch["policy"])
        values = dict(policy=policy, reference=reference, policy_kl=policy_kl, reference_kl=reference_kl)
        for name in names:
            columns[name].append(values[name] if name in values else batch[name])
    engine.train()
    gathered = {k: all_gather(torch.cat(v)) for k, v in columns.items()}
    real = gathered.pop("weight") > 0
    order = gathered["index"][real].argsort()
    return {k: v[real][order] for k, v in gathered.items()}


def evaluation_metrics(scores: dict[str, Tensor], beta: float, weights: tuple[float, float]) -> dict[str, float]:
    """Eval loss, z_ref, mean rewards per class, reward accuracy and (for paired data) pair accuracy."""
    kl = scores["policy_kl"] - scores["reference_kl"]
    z_ref = kl_baseline(kl.sum(), kl.numel())
    losses, rewards = kto_losses(scores["policy"], scores["reference"], scores["desirable"], z_ref, beta, *weights)
    desirable = scores["desirable"]
    # Desirable examples should sit above the baseline, undesirable ones below it.
    correct = torch.where(desirable, rewards > beta * z_ref, rewards < beta * z_ref)
    out = {"loss": losses.mean().item(), "kl": z_ref.item(), "reward_accuracy": correct.float().mean().item()}
    for label, mask in (("desirable", desirable), ("undesirable", ~desirable)):
        if mask.any():
            out[f"rewards/{label}"] = rewards[mask].mean().item()
    if "rewards/desirable" in out and "rewards/undesirable" in out:
        out["margins"] = out["rewards/desirable"] - out["rewards/undesirable"]
    # For data that came from pairs: a pair is won when its desirable reward beats its undesirable one.
    rows = list(zip(scores["pair_id"].tolist(), desirable.tolist(), rewards.tolist(), strict=True))
    undesirable_reward = {pair: r for pair, d, r in rows if pair >= 0 and not d}
    wins = [r > undesirable_reward[pair] for pair, d, r in rows if d and pair in undesirable_reward]
    if wins:
        out["pair_accuracy"] = sum(wins) / len(wins)
    return out


def evaluate(config: KTOConfig, adapter: str | Path, output: str | Path, split: str = "eval") -> dict[str, float]:
    """Score `split` ("eval" or "train") of the config's data with base + adapter; write to `output`.
    The tokenized data, next to `output` while it runs, is removed however the evaluation ends."""
    prepared = Path(output).with_name(f".{Path(output).name}.prepared")
    try:
        return _evaluate(config, adapter, Path(output), split, prepared)
    finally:
        if is_main_process():
            shutil.rmtree(prepared, ignore_errors=True)


def _evaluate(config: KTOConfig, adapter: str | Path, output: Path, split: str, prepared: Path) -> dict[str, float]:
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter {adapter} is not a peft adapter directory (no adapter_config.json).")
    check_output(output, [Path(adapter), *(Path(p) for p in (config.model_name_or_path, config.sft_adapter,
                                                               config.dataset_name, config.eval_dataset_name) if p)])
    start = setup(config, prepared, lambda: None)
    dataset = {"train": start.train_set, "eval": start.eval_set}[split]
    if dataset is None:
        raise ConfigError("The config has no eval data: set eval_dataset_name or eval_fraction, or pass --split train.")
    base = load_base_model(config)
    shared_prompt = shares_prompt(config, base)
    try:
        model = PeftModel.from_pretrained(base, str(adapter))
    except (RuntimeError, ValueError, KeyError) as error:  # shapes or module names of another base
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"--adapter {adapter} does not fit the model {config.model_name_or_path}: it was trained on "
                          f"another base ({first}). Pass the config of the run that trained it.") from None
    if config.sft_adapter:  # the reference training used: base + the SFT adapter
        add_reference_adapter(model, config)
    engine = start.engine.inference_engine(model)
    tokenizer, train = start.tokenizer, start.train_set
    scores = score_dataset(engine, dataset, config.per_device_eval_batch_size, tokenizer.pad_token_id, cache=None,
                           packed=config.padding_free, shared_prompt=shared_prompt)
    # The class weights training used: "auto" is solved from the train split's counts, whatever is scored.
    n_desirable = sum(train["label"])
    weights = balanced_weights(config.desirable_weight, config.undesirable_weight,
                               n_desirable, len(train) - n_desirable)
    summary = evaluation_metrics(scores, config.beta, weights)
    generations = []
    if config.generate_during_eval:  # all ranks take part; "step" is null: an adapter has no step of its own
        generations = PromptGenerations(engine, dataset["prompt_ids"], tokenizer, config).rows(step=None)
    if is_main_process():
        # score_dataset returns every row in dataset order, so columns line up with the scores.
        data = dataset[:]  # the columns as lists
        prompts = tokenizer.batch_decode(data["prompt_ids"], skip_special_tokens=True)
        completions = tokenizer.batch_decode(data["completion_ids"], skip_special_tokens=True)
        columns = zip(scores["index"].tolist(), data["label"], data["pair_id"], prompts, completions,
                      scores["policy"].tolist(), scores["reference"].tolist(), scores["policy_kl"].tolist(),
                      scores["reference_kl"].tolist(), strict=True)
        with atomic_directory(output) as tmp:
            with open(tmp / "examples.jsonl", "w") as f:
                for row, label, pair_id, prompt, completion, policy, reference, policy_kl, reference_kl in columns:
                    f.write(json.dumps({
                        "row": row, "label": bool(label), "pair_id": pair_id, "prompt": prompt,
                        "completion": completion, "policy_logp": policy, "reference_logp": reference,
                        "reward": config.beta * (policy - reference),
                        "policy_kl_logp": policy_kl, "reference_kl_logp": reference_kl,
                    }) + "\n")
            if generations:
                (tmp / GENERATIONS_FILE).write_text("".join(json.dumps(row) + "\n" for row in generations))
            (tmp / "summary.json").write_text(json.dumps({"split": split, "examples": len(dataset), **summary}, indent=1))
            record_contents(tmp)  # what a later evaluation into `output` may replace
        logger.info("Scored %d %s examples; wrote %s", len(dataset), split, output)
    shutdown()
    return summary


def check_output(output: Path, inputs: list[Path]) -> None:
    """--output is replaced as a whole at the end: refuse one that holds an input or anything an
    evaluation did not write (e.g. `--output outputs/run`, the training run itself)."""
    reason = replace_refusal(output, inputs, lambda name: name in EVAL_FILES, "evaluation")
    if reason:
        raise ConfigError(reason)
