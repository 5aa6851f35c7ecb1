"""use_liger_kernel and torch_compile (kto_scale.kernels): refused in one line where they cannot run, and
the compiled decoder layers computing what the eager ones do."""

import json
import sys
from pathlib import Path

import pytest
import torch
from tolerances import FP32_EPS, logp_rtol
from torch._inductor.exc import InvalidCxxCompiler

from kto_scale.assets import TINY_LLAMA_DIR
from kto_scale.config import ConfigError, KTOConfig
from kto_scale.kernels import apply_kernels
from kto_scale.model import SequenceLogps, load_base_model, load_model, reference_mode


def _config(model: Path = TINY_LLAMA_DIR, **options) -> KTOConfig:
    return KTOConfig(model_name_or_path=str(model), init_random_weights=True, lora_r=4, lora_dropout=0.0, **options)


def test_liger_refusals(monkeypatch):
    """Without CUDA (Liger's kernels are Triton), without the package, and on a model that is not a
    Llama: one line each, at load. (liger-kernel is not installed here; on a GPU machine it is shipped
    with the bench, and the kernels' numbers are measured there.)"""
    model = load_base_model(_config())
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="^use_liger_kernel needs a CUDA GPU"):
            load_base_model(_config(use_liger_kernel=True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # an import of it fails, installed or not
    with pytest.raises(ConfigError, match="^use_liger_kernel needs the liger-kernel package"):
        apply_kernels(model, _config(use_liger_kernel=True))
    monkeypatch.setattr(model.config, "model_type", "mistral")
    with pytest.raises(ConfigError, match="^use_liger_kernel patches Llama layers; this model is 'mistral'"):
        apply_kernels(model, _config(use_liger_kernel=True))


def test_torch_compile_refused_without_a_compiler(monkeypatch):
    """Inductor writes C++ on the CPU: with no compiler it is refused at load, not at the first step."""
    if torch.cuda.is_available():
        pytest.skip("CUDA compiles with Triton")

    def no_compiler() -> str:
        raise InvalidCxxCompiler()

    monkeypatch.setattr("torch._inductor.cpp_builder.get_cpp_compiler", no_compiler)
    with pytest.raises(ConfigError, match="^torch_compile on the CPU needs a C\\+\\+ compiler .*install g\\+\\+"):
        load_base_model(_config(torch_compile=True))


@pytest.mark.e2e
def test_compiled_layers_equal_eager_layers(tmp_path):
    """Packed rows through the policy (forward and backward) and the reference (adapters off, no
    gradients), with the decoder layers compiled and not: the same log-probs and LoRA gradients, and a
    second packed length runs without recompiling the layers (dynamic shapes).

    Inductor fuses the RMSNorm, RoPE and SwiGLU pointwise work and reorders its reductions, so the
    compiled layers round differently from the eager ones: tolerances.logp_rtol (a few roundings of
    each residual block per token, summed over the sequence) relative to each sum. A LoRA gradient goes
    through every layer's forward and backward: 4 linear stages each way per layer, each summing
    fan_in products whose independent roundings add in quadrature (sqrt(fan_in) 2^-24 relative to the
    stage's size, fan_in at most intermediate_size), and both sides round: 16 num_layers sqrt(fan_in)
    2^-24 times the gradient's largest element (1.3e-5 here; observed up to 6.9e-7).

    The tiny model cut to one decoder layer: the layers are one class, each compiled on its own
    (kernels.compile_decoder_layers), so one proves the compiled layer, and a second one is another graph
    for inductor to compile (with an empty inductor cache, on 2 shared cores: 89 s for one layer, 154 s for
    two). In the e2e tier although it runs in-process: the compiles of the training forward, its backward
    and the reference forward take more than the whole unit tier may."""
    model = tmp_path / "one-layer"
    model.mkdir()
    shape = json.loads((TINY_LLAMA_DIR / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**shape, "num_hidden_layers": 1}))
    eager = SequenceLogps(load_model(_config(model)))
    compiled = SequenceLogps(load_model(_config(model, torch_compile=True)))
    compiled.load_state_dict(eager.state_dict())
    torch.manual_seed(1)
    with torch.no_grad():  # nonzero adapters, so that policy and reference differ
        for name, parameter in eager.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
                dict(compiled.named_parameters())[name].copy_(parameter)
    ids, completion = torch.randint(3, 900, (1, 40)), torch.rand(1, 40) > 0.3
    lengths = torch.tensor([10, 17, 13])
    results = []
    for module in (eager, compiled):
        policy = module(ids, completion, sequence_lengths=lengths)
        policy.sum().backward()
        with reference_mode(module.model):
            reference = module(ids, completion, sequence_lengths=lengths)
        grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
        results.append((policy.detach(), reference, grads))
    (policy, reference, grads), (policy_c, reference_c, grads_c) = results
    layers, fan_in = eager.model.config.num_hidden_layers, eager.model.config.intermediate_size
    torch.testing.assert_close(policy_c, policy, atol=0, rtol=logp_rtol(layers))
    torch.testing.assert_close(reference_c, reference, atol=0, rtol=logp_rtol(layers))
    assert not torch.allclose(policy, reference)
    for name, grad in grads.items():
        bound = 16 * layers * fan_in ** 0.5 * FP32_EPS * float(grad.abs().max())
        assert float((grads_c[name] - grad).abs().max()) <= bound, name

    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    longer = torch.randint(3, 900, (1, 55))
    compiled(longer, torch.rand(1, 55) > 0.3, sequence_lengths=torch.tensor([10, 17, 28])).sum().backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
