"""The prepared examples of the shipped data sets, pinned: the token ids, labels, pair ids and lengths
that `prepare_data` gives the demo set (text, and the same rows as chat messages) and the shipped HH
slice with the packaged tiny tokenizer are those of the list-based data path (main at 08ca7ed), so
any rewrite of the data path is proven to give the same examples.

Each column is pinned by the first 16 hex digits of the sha256 of its values as JSON (lists of
lists of ints: the ids and, through them, every length). The example columns' values were computed
by the list-based path. The KL columns are those of the vectorized pairing (numpy's generator over
prompt groups, kto_scale.prepare.kl_partners), pinned the same way so that any change to the pairing
is a deliberate edit here; the list-based path's pairing (random.Random over a Python ring) gave
other partners with the same guarantees, which the property check below asserts on the real data.
"""

import hashlib
import json

import pytest

from kto_scale.assets import DEMO_DATA
from kto_scale.config import KTOConfig
from kto_scale.prepare import prepare_data

EXAMPLE_COLUMNS = ("prompt_ids", "completion_ids", "label", "pair_id")
KL_COLUMNS = ("kl_index", "kl_completion_ids")
COLUMNS = (*EXAMPLE_COLUMNS, *KL_COLUMNS)
PINNED = {  # (rows, the hashes of COLUMNS in order)
    ("demo", "train"): (540, ("40c0f82b9cce163d", "08cba2c05f59c0b4", "427c788878d318e3",
        "e6bf54125caf149d", "c63b6847bf1ef9af", "ba3bc27d9a662b06")),
    ("demo", "eval"): (60, ("f643c67d1e6ebab3", "c02457f8dd9358db", "4a3a41dae8a3f977",
        "4fcb887b6fb7c5bf", "398e0fe656f03be5", "dc9312a9d2da8153")),
    ("demo-chat", "train"): (540, ("c043eb805592e623", "08cba2c05f59c0b4", "427c788878d318e3",
        "e6bf54125caf149d", "be914eef1f433c14", "3db6e87f8ce7982b")),
    ("demo-chat", "eval"): (60, ("f8c8c5a102b1f848", "c02457f8dd9358db", "4a3a41dae8a3f977",
        "4fcb887b6fb7c5bf", "a677d308291d4a62", "1aa81343cd6c7d63")),
    ("hh", "train"): (1200, ("0687571f4ba5a5ca", "9868c400ed7c1b14", "dc0aa0580d9dc6d1",
        "ad9969dfe48c54e2", "ca7444ce4666f44d", "fb336bcac704c87d")),
    ("hh", "eval"): (400, ("d0144e8d685c8834", "28eb91d62393fdae", "bc56d65c16a66fa0",
        "9b783c3d0230cb90", "2cfe193d54362e85", "faca72b765ff7719")),
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
    config = _config(name, tmp_path)
    splits = prepare_data(config, tokenizer)
    for split, dataset in zip(("train", "eval"), splits, strict=True):
        size, pinned = PINNED[(name, split)][0], dict(zip(COLUMNS, PINNED[(name, split)][1], strict=True))
        hashes = column_hashes(dataset)
        assert len(dataset) == size
        assert {c: hashes[c] for c in EXAMPLE_COLUMNS} == {c: pinned[c] for c in EXAMPLE_COLUMNS}, (name, split)
        assert {c: hashes[c] for c in KL_COLUMNS} == {c: pinned[c] for c in KL_COLUMNS}, (name, split)
        rows = dataset[:]
        for i, j in enumerate(rows["kl_index"]):  # another prompt, never the pair sibling, cut to fit
            assert rows["prompt_ids"][j] != rows["prompt_ids"][i]
            assert rows["pair_id"][i] < 0 or rows["pair_id"][j] != rows["pair_id"][i]
            room = config.max_length - len(rows["prompt_ids"][i])
            assert rows["kl_completion_ids"][i] == rows["completion_ids"][j][:room]


def test_chunk_sizes_do_not_change_the_examples(tokenizer, tmp_path, monkeypatch):
    """Reading, truncation and the KL gather work chunk by chunk: chunks of 5 and 7 rows (so a chunk
    boundary splits pairs, and KL partners lie in other chunks) give the pinned HH examples, through
    files on disk as a run writes them, with two tokenizing processes."""
    from kto_scale import data, prepare, tokenizing
    monkeypatch.setattr(data, "CHUNK_ROWS", 5)
    monkeypatch.setattr(prepare, "CHUNK_ROWS", 7)
    monkeypatch.setattr(tokenizing, "ROWS_PER_PROCESS", 100)
    config = _config("hh", tmp_path)
    config.dataset_num_proc = 2
    splits = prepare_data(config, tokenizer, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.arrow", "train.arrow"]
    for split, dataset in zip(("train", "eval"), splits, strict=True):
        assert column_hashes(dataset) == dict(zip(COLUMNS, PINNED[("hh", split)][1], strict=True))
