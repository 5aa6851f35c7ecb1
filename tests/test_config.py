"""Config: YAML + command-line overrides, types, unknown keys, cross-field rules, round trip."""

import dataclasses

import pytest
import yaml

from kto_scale.config import ConfigError, KTOConfig
from kto_scale.config_io import CONFIG_FILE, load_config, parse_overrides, save_config
from kto_scale.usage import options_help

BASE = ["--model_name_or_path", "m", "--dataset_name", "d.jsonl"]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "m", "dataset_name": "d", "beta": 0.3, "lora_r": 4}))
    config = load_config(["--config", str(path), "--beta", "0.2", "--report_to", "wandb", "--local_rank=1"])
    assert config.beta == 0.2 and config.lora_r == 4 and config.report_to == ["wandb"]


def test_values_parse_as_yaml():
    assert parse_overrides(["--bf16", "true", "--max_prompt_length", "null", "--lora_target_modules=[q_proj, v_proj]"]) == {
        "bf16": True, "max_prompt_length": None, "lora_target_modules": ["q_proj", "v_proj"]}


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(BASE + ["--learning_rate", "1"]).learning_rate == 1.0
    assert load_config(BASE + ["--learning_rate", "3e-3"]).learning_rate == 0.003  # YAML 1.1 gives a str
    with pytest.raises(ConfigError, match="lora_r"):
        load_config(BASE + ["--lora_r", "2.5"])


@pytest.mark.parametrize("args, message", [
    (["--beta_", "0.1"], "Did you mean 'beta'"),
    (["--bf16", "true", "--fp16", "true"], "bf16 and fp16"),
    (["--max_prompt_length", "2048"], "max_prompt_length"),
    (["--desirable_weight", "heavy"], "desirable_weight"),
    (["--lr_scheduler_type", "wavy"], "lr_scheduler_type"),
    (["--report_to", "mlflow"], "report_to"),
    (["--deepspeed", "nope.json"], "nope.json"),
    (["--eval_fraction", "0.1", "--eval_dataset_name", "e.jsonl"], "choose one"),
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size"),
    (["--beta"], "needs a value"),
    (["--generate_during_eval", "true"], "generate_during_eval.*eval_fraction"),
    (["--max_new_tokens", "0"], "max_new_tokens"),
    (["--generation_top_p", "1.5"], "generation_top_p"),
    (["--init_random_weights", "true", "--init_device", "gpu"],
     r"^init_device must be one of \('cpu', 'cuda'\) or null, got 'gpu'\.$"),
    (["--init_device", "cuda"], "^init_device cuda places the weights init_random_weights builds: set "
                                "init_random_weights: true"),
])
def test_bad_settings_are_named(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(BASE + args)


def test_missing_model_is_an_error():
    with pytest.raises(ConfigError, match="model_name_or_path"):
        load_config(["--dataset_name", "d"])


def test_auto_weights_accepted():
    assert load_config(BASE + ["--desirable_weight", "auto"]).desirable_weight == "auto"


def test_resolved_config_round_trips(tmp_path):
    config = load_config(BASE + ["--beta", "0.25", "--report_to", "[tensorboard]"])
    save_config(config, tmp_path)
    assert load_config(["--config", str(tmp_path / CONFIG_FILE)]) == config
    assert not list(tmp_path.glob(".kto_config*"))  # the temporary file was renamed, not left behind


def test_warmup_steps():
    config = load_config(BASE + ["--warmup_ratio", "0.1"])
    assert config.warmup_steps_for(95) == 10
    assert load_config(BASE + ["--warmup_steps", "3"]).warmup_steps_for(95) == 3


def test_unknown_option_says_where_it_came_from(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "m", "dataset_name": "d"}))
    with pytest.raises(ConfigError, match=r"^command line: unknown option 'betta'. Did you mean 'beta'"):
        load_config(["--config", str(path), "--betta", "0.2"])
    path.write_text(yaml.safe_dump({"model_name_or_path": "m", "dataset_name": "d", "betta": 0.2}))
    with pytest.raises(ConfigError, match=rf"^{path}: unknown option 'betta'"):
        load_config(["--config", str(path), "--beta", "0.2"])


def test_deepspeed_json_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{\n  "zero_optimization": {"stage": 2},\n  "gradient_clipping": "auto",,\n}\n')
    with pytest.raises(ConfigError, match=rf"deepspeed config {path}, line 3 column 31: invalid JSON"):
        load_config(BASE + ["--deepspeed", str(path)])


def test_relative_inputs_of_a_config_file_resolve_from_its_directory(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "data.jsonl").write_text("{}\n")
    path = tmp_path / "configs" / "c.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "org/hub-model", "dataset_name": "../data.jsonl",
                                    "output_dir": "out"}))
    monkeypatch.chdir(tmp_path / "configs")  # as given, ../data.jsonl exists: made absolute as it is
    assert load_config(["--config", "c.yaml"]).dataset_name == str(tmp_path / "data.jsonl")
    monkeypatch.chdir("/")
    config = load_config(["--config", str(path)])
    assert config.dataset_name == str(tmp_path / "data.jsonl")
    assert config.model_name_or_path == "org/hub-model" and config.output_dir == "out"
    # A command-line path is taken from the working directory, and saved absolute for later steps.
    monkeypatch.chdir(tmp_path)
    assert load_config(["--config", str(path), "--dataset_name", "data.jsonl"]).dataset_name == str(tmp_path / "data.jsonl")


def test_a_missing_or_broken_config_file_is_an_error_not_a_traceback(tmp_path):
    with pytest.raises(ConfigError, match=r"--config nope.yaml: cannot read it \(No such file or directory\)"):
        load_config(["--config", "nope.yaml"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("beta: [0.1\n")
    with pytest.raises(ConfigError, match=rf"--config {broken}: not valid YAML"):
        load_config(["--config", str(broken)])


def test_help_lists_every_option_with_type_default_and_meaning():
    text = options_help()
    for f in dataclasses.fields(KTOConfig):
        line = next(line for line in text.splitlines() if line.startswith(f"  --{f.name} "))
        meaning = text.splitlines()[text.splitlines().index(line) + 1].strip()
        assert "(default: " in line and meaning, f.name
    assert "  --desirable_weight FLOAT|STR (default: 1.0)\n      lambda_D, or \"auto\"" in text
