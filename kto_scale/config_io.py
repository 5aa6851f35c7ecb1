"""Loading a run configuration from YAML with command-line overrides, and saving the resolved one.

Unknown keys are errors with a suggestion; values are coerced to the field's type and the whole config
is validated on load (kto_scale.config_checks). The resolved config is written to
`<output_dir>/kto_config.yaml`, and later steps (precompute, merge, evaluate) read it from there.
"""

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path

import yaml

from kto_scale.atomic import write_atomic
from kto_scale.config import REPO_ROOT, ConfigError, KTOConfig
from kto_scale.config_checks import find_deepspeed_config, validate_config

CONFIG_FILE = "kto_config.yaml"
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"  # what `python launch/train.py` with no arguments runs
# Inputs a config file may name by a path relative to itself (outputs stay relative to the working dir).
INPUT_PATHS = ("model_name_or_path", "dataset_name", "eval_dataset_name", "deepspeed", "sft_adapter")

_FIELDS = [f.name for f in dataclasses.fields(KTOConfig)]


def _coerce(name: str, value: object, annotation: object) -> object:
    """Return `value` as the field's type, or raise ConfigError naming the field."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{name} may not be null.")
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if option is str and isinstance(value, str):
            return value
        if typing.get_origin(option) is list:
            items = value if isinstance(value, list) else [value]  # `--report_to wandb` means ["wandb"]
            if all(isinstance(v, str) for v in items):
                return items
    raise ConfigError(f"{name}={value!r} has the wrong type; expected {annotation}.")


def _check_known(keys, source: str) -> None:
    """Unknown option names are errors that say where they came from and suggest a close one."""
    for key in keys:
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, _FIELDS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: unknown option {key!r}.{hint} (--help lists every option.)")


def config_from_dict(values: dict, source: str = "config") -> KTOConfig:
    """Build and validate a KTOConfig; unknown keys are errors with a suggestion."""
    _check_known(values, source)
    hints = typing.get_type_hints(KTOConfig)
    config = KTOConfig(**{key: _coerce(key, value, hints[key]) for key, value in values.items()})
    validate_config(config)
    return config


def parse_overrides(args: list[str]) -> dict:
    """`--key value` / `--key=value` pairs; values are parsed as YAML (0.2, true, [a, b], null)."""
    overrides, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"Unexpected argument {arg!r}: options look like --beta 0.2.")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"--{key} needs a value.")
            i += 1
            value = args[i]
        overrides[key.replace("-", "_")] = yaml.safe_load(value) if value != "" else ""
        i += 1
    return overrides


def load_config(argv: list[str], default_config: str | Path | None = None) -> KTOConfig:
    """`--config file.yaml` then command-line overrides of any field. `default_config` is used only
    when the command line holds no option at all (`python launch/train.py` runs the demo; any other
    command line starts from the documented defaults)."""
    overrides = parse_overrides(argv)
    overrides.pop("local_rank", None)  # the deepspeed launcher appends --local_rank; LOCAL_RANK is in env
    path = overrides.pop("config", None) or (None if overrides else default_config)
    _check_known(overrides, "command line")
    values = {}
    if path is not None:
        try:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"--config {path}: cannot read it ({e.strerror}). Check the path "
                              f"(relative to {os.getcwd()}).") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: not valid YAML ({e}).") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of option: value.")
        _check_known(values, str(path))
        values = _resolve_input_paths(values, Path(path).parent)
    values.update(_resolve_input_paths(overrides, Path.cwd()))
    if "deepspeed" not in values and not values.get("fsdp"):  # the default JSON, saved absolute like any input
        values["deepspeed"] = str(find_deepspeed_config(KTOConfig.deepspeed).resolve())
    elif "deepspeed" not in values:  # fsdp: no DeepSpeed JSON
        values["deepspeed"] = None
    return config_from_dict(values, source=str(path or "command line"))


def _resolve_input_paths(values: dict, config_dir: Path) -> dict:
    """A relative input path becomes absolute: as it exists from the working directory, else next to the
    config file (or in the kto-scale checkout, for the shipped configs), so a config runs from any
    directory and the resolved config a run saves works for later steps run from anywhere. Hub ids
    (no such local path) are left alone."""
    resolved = dict(values)
    for key in INPUT_PATHS:
        value = values.get(key)
        if not isinstance(value, str) or Path(value).is_absolute():
            continue
        for base in (Path.cwd(), config_dir, REPO_ROOT):
            if (base / value).exists():
                resolved[key] = str((base / value).resolve())
                break
    return resolved


def save_config(config: KTOConfig, output_dir: str | Path) -> Path:
    """Write the resolved config to output_dir/kto_config.yaml atomically."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / CONFIG_FILE
    write_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
    return path
