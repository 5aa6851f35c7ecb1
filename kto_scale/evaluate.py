"""Score a dataset with a trained adapter: one JSON line per example, and the summary.

    python launch/evaluate.py --config outputs/run/kto_config.yaml --adapter outputs/run/adapter --output eval/

Each line of `examples.jsonl` holds the example's row, label, prompt and completion text, the policy and
reference log-probs and the implicit reward beta * (policy - reference), so the best and worst
examples can be read off; `summary.json` holds the same numbers evaluation logs during training
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
from kto_scale.config import ConfigError, KTOConfig
from kto_scale.distributed import init_distributed, is_main_process, shutdown
from kto_scale.engine import build_inference_engine, resolve_deepspeed_config
from kto_scale.generate import GENERATIONS_FILE, PromptGenerations
from kto_scale.loss import balanced_weights
from kto_scale.model import load_base_model, load_tokenizer
from kto_scale.outdir import overlapping_input
from kto_scale.prepare import shared_prepared_data
from kto_scale.sft_adapter import add_reference_adapter, check_sft_adapter
from kto_scale.trainer import evaluation_metrics, score_dataset

logger = logging.getLogger(__name__)

EVAL_FILES = ("examples.jsonl", "summary.json", GENERATIONS_FILE)  # all that --output may hold


def evaluate(config: KTOConfig, adapter: str | Path, output: str | Path, split: str = "eval") -> dict[str, float]:
    """Score `split` ("eval" or "train") of the config's data with base + adapter; write to `output`."""
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter {adapter} is not a peft adapter directory (no adapter_config.json).")
    output = Path(output)
    check_output(output, [Path(adapter), *(Path(p) for p in (config.model_name_or_path, config.sft_adapter,
                                                               config.dataset_name, config.eval_dataset_name) if p)])
    _, world_size, _ = init_distributed(config.dist_timeout_s)
    tokenizer = load_tokenizer(config)
    check_sft_adapter(config, tokenizer)  # before the data and the model: fail fast
    train, evaluation = shared_prepared_data(config, tokenizer, output.with_name(f".{output.name}.prepared"))
    dataset = {"train": train, "eval": evaluation}[split]
    if dataset is None:
        raise ConfigError("The config has no eval data: set eval_dataset_name or eval_fraction, or pass --split train.")
    ds_config = resolve_deepspeed_config(config, world_size)  # before the model: ZeRO-3 loads partitioned
    model = PeftModel.from_pretrained(load_base_model(config), str(adapter))
    if config.sft_adapter:  # the reference training used: base + the SFT adapter
        add_reference_adapter(model, config)
    engine = build_inference_engine(config, ds_config, model)
    scores = score_dataset(engine, dataset, config.per_device_eval_batch_size, tokenizer.pad_token_id, cache=None,
                           packed=config.padding_free)
    # The class weights training used: "auto" is solved from the train split's counts, whatever is scored.
    n_desirable = sum(train["label"])
    weights = balanced_weights(config.desirable_weight, config.undesirable_weight,
                               n_desirable, len(train) - n_desirable)
    summary = evaluation_metrics(scores, config.beta, weights)
    generations = []
    if config.generate_during_eval:  # all ranks take part; "step" is null: an adapter has no step of its own
        prompts = PromptGenerations(model, dataset["prompt_ids"], tokenizer, config,
                                    synced_gpus=ds_config.is_zero3() and world_size > 1, device=engine.device)
        generations = prompts.rows(step=None)
    if is_main_process():
        # score_dataset returns every row in dataset order, so columns line up with the scores.
        data = dataset[:]  # the columns as lists
        prompts = tokenizer.batch_decode(data["prompt_ids"], skip_special_tokens=True)
        completions = tokenizer.batch_decode(data["completion_ids"], skip_special_tokens=True)
        columns = zip(scores["index"].tolist(), data["label"], data["pair_id"], prompts, completions,
                      scores["policy"].tolist(), scores["reference"].tolist(), strict=True)
        with atomic_directory(output) as tmp:
            with open(tmp / "examples.jsonl", "w") as f:
                for row, label, pair_id, prompt, completion, policy, reference in columns:
                    f.write(json.dumps({
                        "row": row, "label": bool(label), "pair_id": pair_id, "prompt": prompt,
                        "completion": completion, "policy_logp": policy, "reference_logp": reference,
                        "reward": config.beta * (policy - reference),
                    }) + "\n")
            if generations:
                (tmp / GENERATIONS_FILE).write_text("".join(json.dumps(row) + "\n" for row in generations))
            (tmp / "summary.json").write_text(json.dumps({"split": split, "examples": len(dataset), **summary}, indent=1))
        logger.info("Scored %d %s examples; wrote %s", len(dataset), split, output)
    shutdown()
    return summary


def check_output(output: Path, inputs: list[Path]) -> None:
    """--output is replaced as a whole at the end: refuse one that holds an input or anything an
    evaluation did not write (e.g. `--output outputs/run`, the training run itself)."""
    clash = overlapping_input(output, [p for p in inputs if p.exists()])
    if clash:
        raise ConfigError(f"--output {output} contains or lies inside the input {clash}; replacing it would "
                          "delete that input. Write the evaluation somewhere else.")
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file; pass a directory path.")
    foreign = sorted(p.name for p in output.iterdir() if p.name not in EVAL_FILES) if output.is_dir() else []
    if foreign:
        raise ConfigError(f"--output {output} holds files an evaluation does not write ({', '.join(foreign[:5])}), "
                          "and it is replaced as a whole: pass a new directory.")
