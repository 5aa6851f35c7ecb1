"""Cut the shipped HH-harmless slice (data/hh-harmless/) from Anthropic's hh-rlhf harmless-base test split.

    python launch/make_hh_slice.py --source hh-rlhf-harmless-test.jsonl.gz --output data/hh-harmless \
        [--train_pairs 600] [--eval_pairs 200] [--seed 0]

HH rows are text ("\\n\\nHuman: ...\\n\\nAssistant: ..."). Each pair is turned into chat messages, so a
chat model's own template renders it: {"prompt": [user/assistant turns], "chosen": [assistant],
"rejected": [assistant]}. Pairs with an empty reply are left out (and counted). The pairs are shuffled
with the seed, then cut into a train and a disjoint held-out eval file. MIT-licensed (hh-rlhf.LICENSE).
"""

import argparse
import gzip
import json
import random
import re
from pathlib import Path

from kto_scale.atomic import write_atomic

TURN = re.compile(r"\n\n(Human|Assistant):")
ROLES = {"Human": "user", "Assistant": "assistant"}


def to_messages(text: str) -> list[dict[str, str]]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [{"role": "user", "content": "a"}, {"role": "assistant", ...}]."""
    parts = TURN.split(text)[1:]  # [speaker, content, speaker, content, ...]
    return [{"role": ROLES[who], "content": said.strip()} for who, said in zip(parts[::2], parts[1::2], strict=True)]


def chat_pairs(source: Path) -> tuple[list[dict], int]:
    """The source's pairs as chat rows, and how many were left out for an empty reply."""
    from kto_scale.data import HH_MARKER, _split_text  # here: --help answers before datasets and pyarrow load

    rows, empty = [], 0
    with gzip.open(source, "rt") as f:
        for line in f:
            row = json.loads(line)
            prompt, chosen, rejected = _split_text(row["chosen"], row["rejected"])
            if not chosen.strip() or not rejected.strip():
                empty += 1
                continue
            rows.append({"prompt": to_messages(prompt.removesuffix(HH_MARKER)),
                         "chosen": [{"role": "assistant", "content": chosen.strip()}],
                         "rejected": [{"role": "assistant", "content": rejected.strip()}]})
    return rows, empty


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, required=True, help="hh-rlhf harmless-base test.jsonl.gz")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--train_pairs", type=int, default=600)
    parser.add_argument("--eval_pairs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows, empty = chat_pairs(args.source)
    random.Random(args.seed).shuffle(rows)
    if len(rows) < args.train_pairs + args.eval_pairs:
        raise SystemExit(f"error: {args.source} has {len(rows)} usable pairs, fewer than asked for.")
    args.output.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[: args.train_pairs]),
                       ("eval", rows[args.train_pairs : args.train_pairs + args.eval_pairs])):
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in part)
        write_atomic(args.output / f"{name}.jsonl.gz", gzip.compress(text.encode(), mtime=0))
    print(f"{args.train_pairs} train and {args.eval_pairs} eval pairs written to {args.output} "
          f"({empty} pairs with an empty reply left out)")


if __name__ == "__main__":
    main()
