"""The prepared examples of the shipped data sets, pinned: the token ids, labels, pair ids and lengths
that `prepare_data` gives the demo set (text, and the same rows as chat messages) and the shipped HH
slice with the packaged tiny tokenizer are those of the list-based data path (main at 08ca7ed), so
any rewrite of the data path is proven to give the same examples.

Each column is pinned by the first 16 hex digits of the sha256 of its values as JSON (lists of
lists of ints: the ids and, through them, every length). KL pairing is pinned the same way, so a
change to it is a deliberate edit of these values.
"""

import hashlib
import json

import pytest

from kto_scale.assets import DEMO_DATA
from kto_scale.config import KTOConfig
from kto_scale.prepare import prepare_data

EXAMPLE_COLUMNS = ("prompt_ids", "completion_ids", "label", "pair_id")
KL_COLUMNS = ("kl_index", "kl_completion_ids")

PINNED = {
    ("demo", "train"): (540, {"prompt_ids": "40c0f82b9cce163d", "completion_ids": "08cba2c05f59c0b4",
                              "label": "427c788878d318e3", "pair_id": "e6bf54125caf149d",
                              "kl_index": "aee53a1aaf5f70f1", "kl_completion_ids": "827160b7e9135924"}),
    ("demo", "eval"): (60, {"prompt_ids": "f643c67d1e6ebab3", "completion_ids": "c02457f8dd9358db",
                            "label": "4a3a41dae8a3f977", "pair_id": "4fcb887b6fb7c5bf",
                            "kl_index": "99d086319ebe69f5", "kl_completion_ids": "306041a6559c6eb4"}),
    ("demo-chat", "train"): (540, {"prompt_ids": "c043eb805592e623", "completion_ids": "08cba2c05f59c0b4",
                                   "label": "427c788878d318e3", "pair_id": "e6bf54125caf149d",
                                   "kl_index": "aee53a1aaf5f70f1", "kl_completion_ids": "827160b7e9135924"}),
    ("demo-chat", "eval"): (60, {"prompt_ids": "f8c8c5a102b1f848", "completion_ids": "c02457f8dd9358db",
                                 "label": "4a3a41dae8a3f977", "pair_id": "4fcb887b6fb7c5bf",
                                 "kl_index": "99d086319ebe69f5", "kl_completion_ids": "306041a6559c6eb4"}),
    ("hh", "train"): (1200, {"prompt_ids": "0687571f4ba5a5ca", "completion_ids": "9868c400ed7c1b14",
                             "label": "dc0aa0580d9dc6d1", "pair_id": "ad9969dfe48c54e2",
                             "kl_index": "157f5bbcf99682a4", "kl_completion_ids": "eaf44a7dd7a9f3f8"}),
    ("hh", "eval"): (400, {"prompt_ids": "d0144e8d685c8834", "completion_ids": "28eb91d62393fdae",
                           "label": "bc56d65c16a66fa0", "pair_id": "9b783c3d0230cb90",
                           "kl_index": "4dc29f9719f3ba27", "kl_completion_ids": "94671436e49c6f48"}),
}


def _chat_rows(path) -> str:
    """The demo rows as chat messages (a user prompt, an assistant completion): the chat-template path."""
    rows = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()]
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": r["prompt"]}],
                                        "completion": [{"role": "assistant", "content": r["completion"]}],
                                        "label": r["label"]}) + "\n" for r in rows))
    return str(path)


def _config(name: str, tmp_path) -> KTOConfig:
    if name == "demo-chat":
        return KTOConfig(model_name_or_path="m", dataset_name=_chat_rows(tmp_path / "chat.jsonl"), eval_fraction=0.1,
                         max_length=128, max_prompt_length=64)
    if name == "demo":
        return KTOConfig(model_name_or_path="m", dataset_name=str(DEMO_DATA), eval_fraction=0.1, max_length=128,
                         max_prompt_length=64)
    return KTOConfig(model_name_or_path="m", dataset_name="data/hh-harmless/train.jsonl.gz",
                     eval_dataset_name="data/hh-harmless/eval.jsonl.gz", max_length=160, max_prompt_length=96)


def column_hashes(dataset) -> dict[str, str]:
    columns = dataset[:]
    return {name: hashlib.sha256(json.dumps(list(columns[name])).encode()).hexdigest()[:16] for name in columns}


@pytest.mark.parametrize("name", ["demo", "demo-chat", "hh"])
def test_shipped_data_prepares_to_the_pinned_examples(name, tokenizer, tmp_path):
    splits = prepare_data(_config(name, tmp_path), tokenizer)
    for split, dataset in zip(("train", "eval"), splits, strict=True):
        size, pinned = PINNED[(name, split)]
        hashes = column_hashes(dataset)
        assert len(dataset) == size
        assert {c: hashes[c] for c in EXAMPLE_COLUMNS} == {c: pinned[c] for c in EXAMPLE_COLUMNS}, (name, split)
        assert {c: hashes[c] for c in KL_COLUMNS} == {c: pinned[c] for c in KL_COLUMNS}, (name, split)
