"""Optional speed-ups of the base model's layers, both off by default until the GPU bench shows they pay.

- `use_liger_kernel`: Liger-Kernel's Triton kernels for the Llama layers' RMSNorm, SwiGLU MLP and
  RoPE. Not its losses: kto-scale's log-probs are already a chunked fp32 LM head (kto_scale.logprobs).
- `torch_compile`: each decoder layer compiled on its own (regional compilation): the layers share one
  compiled graph, compiled in seconds rather than the whole model's minutes, with dynamic shapes, so a
  new packed length reuses it instead of recompiling.

Each is applied to the base model before LoRA is attached (peft then swaps the projections inside the
patched layers, which keep calling them as modules), and each is refused in one line where it cannot run.
Also the device check of the attention backend (flex_attention trains on CUDA only).
"""

import logging

import torch
from transformers import PreTrainedModel

from kto_scale.attention import FLEX
from kto_scale.config import ConfigError, KTOConfig

logger = logging.getLogger(__name__)


def check_attention_device(config: KTOConfig) -> None:
    """flex_attention is for CUDA: torch has no FlexAttention backward on the CPU (training would fail
    at its first backward pass), and there the dense mask (sdpa) is the path."""
    if config.attn_implementation == FLEX and not torch.cuda.is_available():
        raise ConfigError("attn_implementation flex_attention needs a CUDA GPU (torch has no FlexAttention "
                          "backward on the CPU): use sdpa (or leave attn_implementation unset) on this machine.")


def apply_liger(model: PreTrainedModel) -> None:
    """Liger-Kernel's RMSNorm, SwiGLU and RoPE in this Llama model's layers (its losses stay off)."""
    if model.config.model_type != "llama":
        raise ConfigError(f"use_liger_kernel patches Llama layers; this model is {model.config.model_type!r}: "
                          "turn use_liger_kernel off.")
    if not torch.cuda.is_available():
        raise ConfigError("use_liger_kernel needs a CUDA GPU (Liger-Kernel's kernels are Triton): turn it off "
                          "on this machine.")
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError:
        raise ConfigError("use_liger_kernel needs the liger-kernel package, which is not installed: "
                          "pip install liger-kernel, or turn use_liger_kernel off.") from None
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=model)
    logger.info("use_liger_kernel: Liger-Kernel's RMSNorm, SwiGLU and RoPE in every layer.")


def _check_compiler() -> None:
    """torch.compile's inductor generates Triton on CUDA and C++ on the CPU: refuse when that toolchain
    is missing, in one line, instead of at the first forward pass (these are inductor's own checks)."""
    if torch.cuda.is_available():
        from torch.utils._triton import has_triton
        if not has_triton():
            raise ConfigError("torch_compile needs Triton on CUDA, which is not installed (pip install triton): "
                              "install it or turn torch_compile off.")
        return
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler
    try:
        get_cpp_compiler()
    except InvalidCxxCompiler as error:
        raise ConfigError(f"torch_compile on the CPU needs a C++ compiler ({' '.join(str(error).split())}): "
                          "install g++ (or set CXX) or turn torch_compile off.") from None


def compile_decoder_layers(model: PreTrainedModel) -> None:
    """Compile each decoder layer in place (nn.Module.compile), with dynamic shapes."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(f"torch_compile compiles the decoder layers, and {type(model).__name__} keeps none in "
                          "decoder.layers: turn torch_compile off.")
    _check_compiler()
    for layer in layers:
        layer.compile(dynamic=True)
    logger.info("torch_compile: %d decoder layers compiled (dynamic shapes; the first steps compile).", len(layers))


def apply_kernels(model: PreTrainedModel, config: KTOConfig) -> None:
    """The options' speed-ups on a loaded base model (before LoRA); refusals as ConfigError."""
    if config.use_liger_kernel:
        apply_liger(model)
    if config.torch_compile:
        compile_decoder_layers(model)
