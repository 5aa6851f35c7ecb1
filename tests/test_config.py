"""Config: YAML + command-line overrides, types, unknown keys, cross-field rules, round trip."""

import pytest
import yaml

from kto_scale.config import ConfigError, load_config, load_run_config, parse_overrides, save_config

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
    assert load_run_config(tmp_path) == config
    assert not list(tmp_path.glob(".kto_config*"))  # the temporary file was renamed, not left behind


def test_warmup_steps():
    config = load_config(BASE + ["--warmup_ratio", "0.1"])
    assert config.warmup_steps_for(95) == 10
    assert load_config(BASE + ["--warmup_steps", "3"]).warmup_steps_for(95) == 3
