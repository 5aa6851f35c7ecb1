"""The evaluate command: score a dataset with a trained adapter (one JSON line per example, and the
summary; the scoring itself is kto_scale.scoring).

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
from pathlib import Path

from peft import PeftModel

from kto_scale.atomic import atomic_directory
from kto_scale.collate import desirable_count
from kto_scale.config import ConfigError, KTOConfig
from kto_scale.distributed import is_main_process, shutdown
from kto_scale.generate import GENERATIONS_FILE, GenerationSettings, PromptGenerations
from kto_scale.loss import balanced_weights
from kto_scale.model import load_base_model, reference_layout
from kto_scale.outdir import record_contents, replace_refusal
from kto_scale.scoring import evaluation_metrics, score_dataset
from kto_scale.sft_adapter import add_reference_adapter
from kto_scale.startup import setup

logger = logging.getLogger(__name__)

EVAL_FILES = ("examples.jsonl", "summary.json", GENERATIONS_FILE)  # all that --output may hold


def evaluate(config: KTOConfig, adapter: str | Path, output: str | Path, split: str = "eval") -> dict[str, float]:
    """Score `split` ("eval" or "train") of the config's data with base + adapter; write to `output`."""
    output = Path(output)
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter {adapter} is not a peft adapter directory (no adapter_config.json).")
    check_output(output, [Path(adapter), *(Path(p) for p in (config.model_name_or_path, config.sft_adapter,
                                                               config.dataset_name, config.eval_dataset_name) if p)])
    start = setup(config, lambda: None)
    dataset = {"train": start.train_set, "eval": start.eval_set}[split]
    if dataset is None:
        raise ConfigError("The config has no eval data: set eval_dataset_name or eval_fraction, or pass --split train.")
    base = load_base_model(config, empty=not start.engine.loads_weights(start.rank))
    reference = reference_layout(config, base, cached=False)
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
                           packed=config.padding_free, reference=reference)
    # The class weights training used: "auto" is solved from the train split's counts, whatever is scored.
    n_desirable = desirable_count(train)
    weights = balanced_weights(config.desirable_weight, config.undesirable_weight,
                               n_desirable, len(train) - n_desirable)
    summary = evaluation_metrics(scores, config.beta, weights)
    generations = []
    if config.generate_during_eval:  # all ranks take part; "step" is null: an adapter has no step of its own
        generations = PromptGenerations(engine, dataset, tokenizer,
                                        GenerationSettings.from_config(config)).rows(step=None)
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
