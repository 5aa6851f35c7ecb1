"""The inputs every run shares, built once by the parent: model, tokenizer, data file, kto-scale config,
and the spec (spec.json) the children read.

- Model: a Llama of the given shape: its config.json alone, no weights. Every child builds the seeded
  random weights itself on its own device (kto-scale's `init_random_weights` and `init_device`,
  bench/model_init.py), so an 8B model costs no host init and no 16 GB of disk writes and reads per
  run; each child records a checksum of the weights it built, and the report checks they are all the same.
- Tokenizer: --tokenizer (it must add BOS on its own, as Llama's does), saved next to the model.
- Data: the first --pairs pairs of --data (text or chat messages) whose prompt leaves room for a
  completion token, split by kto_scale.data into one desirable and one undesirable {prompt, completion,
  label} row each and written once as the TRL-format jsonl that both trainers read.
- kto-scale's own view of that file (kto_scale.prepare.prepare_data, as the trainer calls it): token ids,
  KL partners, and the order of the rows in its batches, which the TRL child replays.
"""

import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # --lora-targets all: these and the MLP's three
ALL_PROJECTIONS = (*LORA_TARGETS, "gate_proj", "up_proj", "down_proj")
# Settings the children read from the spec, straight from the command line.
SHARED_SETTINGS = ("batch_size", "max_length", "lr", "beta", "seed", "warmup", "steps", "precompute_batch_size",
                   "lora_r", "lora_alpha", "kl_pairs", "threads", "padding_free", "dtype", "attn_implementation",
                   "hidden", "layers", "heads", "kv_heads", "intermediate", "lora_targets", "kto_option")
# kto-scale settings --kto-option may not change: those that make both trainers see the same rows, batches,
# weights and loss (the comparison), and the run's own bookkeeping.
SAME_IN_BOTH = ("model_name_or_path", "dataset_name", "skip_bad_rows", "output_dir", "max_length", "max_prompt_length",
                "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type",
                "warmup_steps", "max_grad_norm", "beta", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                "max_steps", "logging_steps", "seed", "data_seed", "init_random_weights", "init_device")
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # --dtype -> the name transformers and torch use


def load_tokenizer(path: Path):
    """The benchmark's tokenizer, with a pad token distinct from EOS where it has one (padding is masked)."""
    from transformers import AutoTokenizer, LlamaTokenizer

    if not path.is_dir():
        raise SystemExit(f"--tokenizer {path} is not a directory; give a tokenizer dir, e.g. "
                         "kto_scale/assets/tiny-llama.")
    if (path / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    else:  # a bare SentencePiece model (Llama 2's tokenizer.model) says nothing of its class; needs sentencepiece
        tokenizer = LlamaTokenizer.from_pretrained(str(path), add_bos_token=True, add_eos_token=False)
    if tokenizer.pad_token_id is None:
        if tokenizer.unk_token_id is None:
            raise SystemExit(f"--tokenizer {path}: the tokenizer has neither a pad nor an unk token to pad with; "
                             "give one that has.")
        tokenizer.pad_token = tokenizer.unk_token
    if tokenizer("a").input_ids[:1] != [tokenizer.bos_token_id]:
        raise SystemExit(f"--tokenizer {path}: the tokenizer must add BOS on its own (TRL relies on it for "
                         "text prompts); use a Llama-style tokenizer.")
    return tokenizer


def save_model_config(args, tokenizer, model_dir: Path) -> int:
    """A Llama of the command line's shape, as config.json beside the tokenizer (no weights: each child
    builds them, seeded); its parameter count. --vocab above the tokenizer's pads the embedding and the
    LM head (rows no token id reaches: a random model does not mind)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.vocab is not None and args.vocab < len(tokenizer):
        raise SystemExit(f"--vocab {args.vocab} is smaller than the tokenizer's {len(tokenizer)} tokens: give at "
                         f"least {len(tokenizer)}.")
    config = LlamaConfig(
        vocab_size=args.vocab or len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.max_length), tie_word_embeddings=False, attention_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    with torch.device("meta"):  # the size without allocating or initializing anything
        return sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def pick_examples(args, tokenizer, work: Path) -> tuple[list[dict], int, int]:
    """The first --pairs pairs (file order) whose prompt leaves room for a completion token, as unpaired
    rows; the number of pairs left out as too long, and of bad rows skipped."""
    import numpy as np

    from kto_scale.data import load_examples, turn
    from kto_scale.ragged import ragged
    from kto_scale.tokenizing import tokenize_dataset

    if not args.data.exists():
        raise SystemExit(f"--data {args.data} does not exist; give an HH file (text or chat messages), "
                         "e.g. data/hh-harmless/train.jsonl.gz.")
    examples, bad_rows = load_examples(str(args.data), skip_bad_rows=True)
    tokenized = tokenize_dataset(examples, tokenizer, 1, work / "tokenized.arrow")
    prompt_lengths = np.diff(ragged(tokenized.data.column("prompt_ids"))[0])
    pair_ids = np.asarray(examples["pair_id"])
    too_long_pairs = set(pair_ids[prompt_lengths >= args.max_length].tolist())
    kept, skipped = [], set()
    for row in examples:  # pairs are adjacent, in file order
        if len(kept) >= 2 * args.pairs:
            break
        if row["pair_id"] in too_long_pairs:
            skipped.add(row["pair_id"])
            continue
        kept.append({"prompt": turn(row["prompt"], row["chat"]), "completion": turn(row["completion"], row["chat"]),
                     "label": row["label"]})
    return kept, len(skipped), bad_rows


def write_kto_config(args, model_dir: Path, data_file: Path, path: Path) -> Path:
    """kto-scale's run config for the shared settings; each run adds its own options on the command line."""
    from model_init import device

    config = {
        "model_name_or_path": str(model_dir),
        "dataset_name": str(data_file),
        "skip_bad_rows": True,
        "output_dir": str(path.parent / "run_kto"),
        "overwrite_output_dir": True,
        "max_length": args.max_length,
        "max_prompt_length": None,  # TRL 1.16 has no prompt truncation; the pre-filter makes this moot
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": args.lr,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "max_grad_norm": 1.0,
        "beta": args.beta,
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "lora_dropout": 0.0,
        "lora_target_modules": list(args.lora_targets),
        "init_random_weights": True,  # seeded, built by each child on its device (bench/model_init.py)
        "init_device": device().type,  # the GPU when there is one
        "max_steps": args.warmup + args.steps,
        "logging_steps": 1,
        "save_steps": 10**9,
        "seed": args.seed,
        "data_seed": args.seed,
        "precompute_batch_size": args.precompute_batch_size,
        "disable_tqdm": True,
        "deepspeed": str(REPO / "ds_configs/zero2.json"),
        "padding_free": args.padding_free,
        "bf16": args.dtype == "bf16",
        "attn_implementation": args.attn_implementation,
    }
    clashes = sorted(set(args.kto_option) & set(SAME_IN_BOTH))
    if clashes:
        raise SystemExit(f"--kto-option {', '.join(clashes)}: the bench sets these the same in both trainers (the "
                         "same rows, batches and loss); use the bench's own options for them.")
    config.update(args.kto_option)  # how kto-scale computes (attention, kernels, engine, ...) is free to change
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def build_inputs(args, work: Path) -> dict:
    """Model, tokenizer, data file and the kto-scale view of the data; writes and returns the spec."""
    from kto_scale.config import ConfigError
    from kto_scale.config_io import load_config
    from kto_scale.prepare import prepare_data

    tokenizer = load_tokenizer(args.tokenizer)
    model_dir = work / "model"
    n_params = save_model_config(args, tokenizer, model_dir)
    kept, too_long, bad_rows = pick_examples(args, tokenizer, work)
    data_file = work / "kto_unpaired.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in kept))
    kto_config = write_kto_config(args, model_dir, data_file, work / "kto_config.yaml")

    try:
        config = load_config(["--config", str(kto_config)])
    except ConfigError as error:  # an unknown or invalid --kto-option: one line, not a traceback
        raise SystemExit(f"kto-scale refuses the bench's config (check --kto-option): {error}") from None
    train_set, _ = prepare_data(config, tokenizer)
    n = len(train_set)
    if n != len(kept):
        raise RuntimeError(f"kto-scale kept {n} of {len(kept)} rows; the pre-filter should leave it nothing "
                           "to drop")
    total_steps = args.warmup + max(args.steps, args.profile_steps if args.profile or args.torch_profile else 0)
    # full batches only: a filler row would count as an example (--find-max-batch checks its own sizes)
    if n // args.batch_size < total_steps and not args.find_max_batch:
        raise SystemExit(f"{n} examples give {n // args.batch_size} full batches of {args.batch_size}, fewer than "
                         f"--warmup + --steps (or --profile-steps) = {total_steps}: raise --pairs.")
    spec = {
        "work": str(work), "model_dir": str(model_dir), "data_file": str(data_file), "kto_config": str(kto_config),
        "n_examples": n, "n_pairs": len(kept) // 2, "pairs_skipped_too_long": too_long, "bad_rows_skipped": bad_rows,
        "n_params": n_params, "vocab": args.vocab or len(tokenizer), "tokenizer_vocab": len(tokenizer),
        "order": batch_order(n, args.batch_size, args.seed), "kl_index": list(train_set["kl_index"]),
        "prompt_ids": list(train_set["prompt_ids"]), "completion_ids": list(train_set["completion_ids"]),
        "kl_completion_ids": list(train_set["kl_completion_ids"]),
        **{key: getattr(args, key) for key in SHARED_SETTINGS},
    }
    write_spec(spec)
    return spec


def batch_order(n: int, batch_size: int, seed: int) -> list[int]:
    """The rows of each kto-scale step (epoch 0; a short last batch's filler slots left out): the TRL child
    gets the rows in this order, so its step k holds kto-scale's step k."""
    from kto_scale.collate import PAD_SLOT, BatchPlan

    plan = BatchPlan(n, batch_size, 1, 1)
    return [i for step in range(plan.steps_per_epoch) for i in plan.micro_batches(step, 0, seed, 0)[0]
            if i != PAD_SLOT]


def write_spec(spec: dict) -> Path:
    path = Path(spec["work"]) / "spec.json"
    path.write_text(json.dumps(spec))
    return path
