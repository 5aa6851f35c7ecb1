"""Reading rows from every supported source and normalizing every row format to examples."""

import gzip
import json
import logging
import os
import sys

import datasets
import pytest
from runs import run

from kto_scale import data
from kto_scale.assets import DEMO_DATA
from kto_scale.data import DataError, Example, examples_dataset, split_train_eval, turn

UNPAIRED = [
    {"prompt": "What is 2 + 2?", "completion": "2 + 2 = 4.", "label": True},
    {"prompt": "What is 2 + 2?", "completion": "2 + 2 = 5.", "label": False},
]
HH_CHOSEN = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Help me?\n\nAssistant: Sure, gladly."
HH_REJECTED = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Help me?\n\nAssistant: Sure! No."


def load_examples(source: str, **options) -> tuple[list[Example], int]:
    """data.load_examples, its Arrow rows back as Examples."""
    dataset, skipped = data.load_examples(source, **options)
    return [Example(turn(r["prompt"], r["chat"]), turn(r["completion"], r["chat"]), r["label"], r["pair_id"],
                    r["source"]) for r in dataset], skipped


def write_jsonl(path, rows: list, blank_lines: bool = False) -> str:
    """Rows as JSON lines (strings are written as-is, to make broken lines)."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text(("\n\n" if blank_lines else "\n").join(lines) + "\n")
    return str(path)


def msgs(*pairs: str) -> list[dict[str, str]]:
    """msgs("user", "Hi", "assistant", "Hello") -> chat messages."""
    return [{"role": r, "content": c} for r, c in zip(pairs[::2], pairs[1::2], strict=True)]


# --- row formats ----------------------------------------------------------------------------------


def test_unpaired_text(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", UNPAIRED)
    examples, skipped = load_examples(path)
    assert skipped == 0
    assert examples == [
        Example("What is 2 + 2?", "2 + 2 = 4.", True, -1, f"{path}:1"),
        Example("What is 2 + 2?", "2 + 2 = 5.", False, -1, f"{path}:2"),
    ]


def test_conversational(tmp_path):
    prompt = msgs("system", "Be brief.", "user", "Hi")
    row = {"prompt": prompt, "completion": msgs("assistant", "Hello."), "label": False}
    (example,), _ = load_examples(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert example.prompt == prompt
    assert example.completion == [{"role": "assistant", "content": "Hello."}]
    assert example.label is False


def test_paired_with_prompt(tmp_path):
    rows = [
        {"prompt": "Q1", "chosen": "good", "rejected": "bad"},
        {"prompt": "Q2", "chosen": "yes", "rejected": "no"},
    ]
    examples, _ = load_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [(e.prompt, e.completion, e.label, e.pair_id) for e in examples] == [
        ("Q1", "good", True, 0),
        ("Q1", "bad", False, 0),
        ("Q2", "yes", True, 1),
        ("Q2", "no", False, 1),
    ]


def test_paired_hh_text_splits_at_last_shared_assistant_marker(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    chosen, rejected = load_examples(path)[0]
    # The texts share "... Assistant: Sure", but the prompt stops at the marker; the leading space stays.
    assert (
        chosen.prompt
        == rejected.prompt
        == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Help me?\n\nAssistant:"
    )
    assert (chosen.completion, rejected.completion) == (" Sure, gladly.", " Sure! No.")
    assert (chosen.label, rejected.label, chosen.pair_id, rejected.pair_id) == (True, False, 0, 0)


def test_common_prefix_length_is_os_path_commonprefix():
    """The binary search over slices finds what os.path.commonprefix (the list-based path's) found."""
    texts = ["", "a", "ab", "abc", "abd", "b", HH_CHOSEN, HH_REJECTED, HH_CHOSEN + "x", "\u00e9t\u00e9", "\u00e9t\u00e0"]
    for a in texts:
        for b in texts:
            assert data._common_prefix_length(a, b) == len(os.path.commonprefix([a, b])), (a, b)


def test_paired_hh_text_without_marker_asks_for_prompt(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"chosen": "Hi. Good", "rejected": "Hi. Bad"}])
    with pytest.raises(DataError, match=r"line 1: .*Add a 'prompt' field"):
        load_examples(path)


def test_conversational_pairs_without_prompt(tmp_path):
    history = msgs("user", "Hi", "assistant", "Hello!", "user", "Help me?")
    rows = [
        {"chosen": history + msgs("assistant", "Sure."), "rejected": history + msgs("assistant", "No.")},
        # They differ in a user turn: the prompt backs up to before the assistant turn that precedes it.
        {
            "chosen": msgs("user", "Hi", "assistant", "Yo", "user", "A"),
            "rejected": msgs("user", "Hi", "assistant", "Yo", "user", "B"),
        },
    ]
    examples, _ = load_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    assert examples[0].prompt == examples[1].prompt == history
    assert (examples[0].completion, examples[1].completion) == (
        msgs("assistant", "Sure."),
        msgs("assistant", "No."),
    )
    assert examples[2].prompt == msgs("user", "Hi")
    assert examples[2].completion == msgs("assistant", "Yo", "user", "A")
    assert [e.pair_id for e in examples] == [0, 0, 1, 1]


# --- sources --------------------------------------------------------------------------------------


def _jsonl(path, rows):
    return write_jsonl(path.with_suffix(".jsonl"), rows)


def _jsonl_gz(path, rows):
    path = path.with_suffix(".jsonl.gz")
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _json_array(path, rows):
    path.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    return str(path.with_suffix(".json"))


def _json_lines(path, rows):
    return write_jsonl(path.with_suffix(".json"), rows)


def _parquet(path, rows):
    datasets.Dataset.from_list(rows).to_parquet(str(path.with_suffix(".parquet")))
    return str(path.with_suffix(".parquet"))


def _save_to_disk(path, rows):
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


def _dataset_dict(path, rows):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize(
    "write", [_jsonl, _jsonl_gz, _json_array, _json_lines, _parquet, _save_to_disk, _dataset_dict]
)
def test_every_source_type(tmp_path, write):
    path = write(tmp_path / "data", UNPAIRED)
    examples, _ = load_examples(path)
    assert [(e.prompt, e.completion, e.label) for e in examples] == [
        (r["prompt"], r["completion"], r["label"]) for r in UNPAIRED
    ]
    assert examples[1].source == f"{path}:2"


def test_dataset_dict_without_train_lists_splits(tmp_path):
    datasets.DatasetDict({"test": datasets.Dataset.from_list(UNPAIRED)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"without a 'train' split \(it has \['test'\]\)"):
        load_examples(str(tmp_path / "dd"))


def test_unreachable_hub_name(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read once at import: patch it too
    with pytest.raises(
        DataError, match="neither an existing local path nor a reachable hub dataset.*HF_HUB_OFFLINE"
    ):
        load_examples("no-such-user/no-such-dataset")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_examples(str(tmp_path / "missing.jsonl"))


# --- bad rows -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_row", "problem"),
    [
        ({"prompt": "Q", "label": True}, r"missing field\(s\) \['completion'\]"),
        ({"prompt": "Q", "completion": "A", "label": "yes"}, r"'label' is \"yes\", not a boolean. Use true"),
        ({"prompt": "Q", "completion": "A", "label": "true"}, r"'label' is \"true\", not a boolean"),
        ({"prompt": "Q", "completion": "A", "label": 1}, "'label' is 1, not a boolean"),
        ({"prompt": "Q", "completion": "A", "label": 2}, "'label' is 2, not a boolean"),
        ({"prompt": "Q", "completion": "A", "label": None}, "'label' is null, not a boolean"),
        ({"prompt": "Q", "completion": "  \n", "label": True}, "'completion' is empty"),
        ({"prompt": "Q", "completion": 5, "label": True}, "'completion' must be text or a list of messages"),
        (
            {"prompt": msgs("robot", "Hi"), "completion": msgs("assistant", "A"), "label": True},
            "unknown role 'robot'",
        ),
        (
            {"prompt": msgs("user", "Q"), "completion": "A", "label": True},
            "both be text or both be message lists",
        ),
        ({"chosen": "A"}, r"missing field\(s\) \['rejected'\]"),
        ({"text": "A"}, r"missing field\(s\) \['prompt', 'completion', 'label'\]"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_bad_row_names_file_line_problem_and_fix(tmp_path, bad_row, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [UNPAIRED[0], bad_row, UNPAIRED[1]])
    with pytest.raises(DataError, match=problem) as error:
        load_examples(path)
    assert str(error.value).startswith(f"{path}, line 2: ")
    assert "skip_bad_rows" in str(error.value)


def test_bad_json_reports_its_line_number_counting_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [UNPAIRED[0], UNPAIRED[1], '{"prompt": "Q", '], blank_lines=True)
    with pytest.raises(DataError, match=r"d.jsonl, line 5: invalid JSON"):
        load_examples(path)


def test_bad_row_of_json_array_names_row(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([UNPAIRED[0], {"prompt": "Q", "completion": "A", "label": 0}]))
    with pytest.raises(DataError, match=rf"{path}, row 2: 'label' is 0"):
        load_examples(str(path))


def test_large_json_array_is_read_with_a_warning_to_use_json_lines(tmp_path, monkeypatch, caplog):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(UNPAIRED))
    monkeypatch.setattr(data, "JSON_ARRAY_WARN_BYTES", path.stat().st_size - 1)
    with caplog.at_level(logging.WARNING):
        assert len(load_examples(str(path))[0]) == len(UNPAIRED)
    assert "is a JSON array of 0 MB: it is parsed whole" in caplog.text and "JSON lines (.jsonl" in caplog.text


def test_skip_bad_rows_counts_them(tmp_path):
    bad = [
        {"prompt": "Q", "completion": "", "label": True},
        "not json",
        {"prompt": "Q", "completion": "A", "label": "no"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [UNPAIRED[0], *bad, UNPAIRED[1]])
    examples, skipped = load_examples(path, skip_bad_rows=True)
    assert skipped == 3
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:5"]


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty dataset \(no rows\)"):
        load_examples(str(tmp_path / "empty.jsonl"))
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q"}, {"prompt": "Q"}])
    with pytest.raises(DataError, match=r"empty dataset \(all 2 rows are bad\)"):
        load_examples(path, skip_bad_rows=True)


def test_warns_when_one_kind_is_missing(tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", UNPAIRED[:1])
    with caplog.at_level(logging.WARNING, logger="kto_scale.data"):
        load_examples(path)
    assert "no undesirable examples" in caplog.text


@pytest.mark.e2e
def test_demo_data_is_what_its_script_writes(tmp_path):
    """The shipped set is reproducible: launch/make_demo_data.py writes it byte for byte."""
    run([sys.executable, "launch/make_demo_data.py", "--output", str(tmp_path / "demo.jsonl")])
    assert (tmp_path / "demo.jsonl").read_bytes() == DEMO_DATA.read_bytes()


def test_demo_data_is_balanced():
    examples, skipped = load_examples(str(DEMO_DATA))
    desirable = sum(e.label for e in examples)
    assert skipped == 0 and 500 <= len(examples) <= 700
    assert abs(desirable - (len(examples) - desirable)) < 0.1 * len(examples)


# --- train/eval split -----------------------------------------------------------------------------


def _mixed_examples() -> list[Example]:
    paired = [Example(f"P{i}", c, c == "good", i, f"d:{i}{c}") for i in range(20) for c in ("good", "bad")]
    return paired + [Example(f"U{i}", "c", i % 2 == 0, source=f"d:U{i}") for i in range(20)]


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """split_train_eval on a dataset of `examples`, each split back as the list of its examples."""
    train, evaluation = split_train_eval(examples_dataset(examples), fraction, seed)
    by_source = {e.source: e for e in examples}
    return [by_source[s] for s in train["source"]], [by_source[s] for s in evaluation["source"]]


def test_split_keeps_pairs_together_and_is_deterministic():
    examples = _mixed_examples()
    train, evaluation = split(examples, 0.25, seed=3)
    assert len(evaluation) in (15, 16) and len(train) + len(evaluation) == len(examples)
    train_pairs = {e.pair_id for e in train if e.pair_id >= 0}
    eval_pairs = {e.pair_id for e in evaluation if e.pair_id >= 0}
    assert not train_pairs & eval_pairs
    assert all(sum(e.pair_id == p for e in evaluation) == 2 for p in eval_pairs)
    assert split(examples, 0.25, seed=3) == (train, evaluation)
    assert split(examples, 0.25, seed=4) != (train, evaluation)
    assert [examples.index(e) for e in train] == sorted(examples.index(e) for e in train)  # order kept


def test_split_without_eval_fraction_keeps_everything():
    dataset = examples_dataset(_mixed_examples())
    assert split_train_eval(dataset, 0.0, seed=0) == (dataset, None)


def test_truncated_gzip_names_the_file(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress(("\n".join(json.dumps(r) for r in UNPAIRED * 50) + "\n").encode())[:-30])
    with pytest.raises(DataError, match=rf"{path}: the gzip stream is truncated or corrupt after line \d+"):
        load_examples(str(path))


def test_bytes_that_are_not_utf8_name_the_line_and_can_be_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    latin1 = '{"prompt": "caf\xe9?", "completion": "Oui.", "label": true}'.encode("latin-1")
    path.write_bytes(b"\n".join([json.dumps(UNPAIRED[0]).encode(), latin1, json.dumps(UNPAIRED[1]).encode()]) + b"\n")
    with pytest.raises(DataError, match=rf"{path}, line 2: bytes that are not UTF-8 text at column 16"):
        load_examples(str(path))
    examples, skipped = load_examples(str(path), skip_bad_rows=True)
    assert skipped == 1 and [e.source for e in examples] == [f"{path}:1", f"{path}:3"]
    array = tmp_path / "d.json"
    array.write_bytes(b"[\n" + json.dumps(UNPAIRED[0]).encode() + b",\n" + latin1 + b"\n]")
    with pytest.raises(DataError, match=rf"{array}, line 3: bytes that are not UTF-8 text"):
        load_examples(str(array))


def test_a_directory_of_parquet_shards_is_one_numbered_sequence(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    datasets.Dataset.from_list(UNPAIRED).to_parquet(str(shards / "part-0.parquet"))
    bad = [UNPAIRED[0], {"prompt": "Q", "completion": " ", "label": True}]
    datasets.Dataset.from_list(bad).to_parquet(str(shards / "part-1.parquet"))
    with pytest.raises(DataError, match=r"shards, part-1.parquet row 2: 'completion' is empty"):
        load_examples(str(shards))
    examples, skipped = load_examples(str(shards), skip_bad_rows=True)
    assert skipped == 1 and [e.source for e in examples] == [f"{shards}:{n}" for n in (1, 2, 3)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither one written by Dataset.save_to_disk nor one holding .parquet"):
        load_examples(str(tmp_path / "empty"))


def test_rows_are_read_chunk_by_chunk(tmp_path, monkeypatch):
    """Chunks of 3 rows (a pair's two examples can straddle a chunk) give the same examples, written to
    the Arrow file given, in file order; the skipped count spans chunks."""
    monkeypatch.setattr(data, "CHUNK_ROWS", 3)
    rows = [{"prompt": f"P{i}", "chosen": "good", "rejected": "bad"} if i % 3 else "not json" for i in range(10)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    dataset, skipped = data.load_examples(path, skip_bad_rows=True, path=tmp_path / "rows.arrow")
    assert skipped == 4 and dataset.cache_files[0]["filename"] == str(tmp_path / "rows.arrow")
    assert dataset["pair_id"] == [i for i in range(10) if i % 3 for _ in range(2)]
    assert dataset["label"] == [True, False] * 6


def test_skipped_rows_are_counted_in_the_log(tmp_path, tokenizer, caplog):
    from kto_scale.config import KTOConfig
    from kto_scale.prepare import prepare_data

    path = write_jsonl(tmp_path / "d.jsonl", [UNPAIRED[0], "not json", UNPAIRED[1], {"prompt": "Q"}])
    config = KTOConfig(model_name_or_path="m", dataset_name=path, skip_bad_rows=True)
    with caplog.at_level(logging.WARNING, logger="kto_scale.prepare"):
        with pytest.raises(DataError, match="KL pairing needs completions from other prompts"):
            prepare_data(config, tokenizer)  # the two good rows share their prompt
    assert f"Skipped 2 bad rows of {path} (skip_bad_rows is on)." in caplog.text
