"""Where a training run spends its time: py-spy raw stacks, each sample labelled by the trainer's call site
(which forward pass, backward, optimizer step, data path, logging) and, inside a forward pass, by model
component (attention, MLP, LoRA A/B, LM head + log-softmax, other decoder work, DeepSpeed wrapper).

Call sites are found by searching the current source files for their text, so edits that move lines in
the trainers do not break the grouping; a call whose text changed falls into an "other" label.
"""

import functools
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from inputs import REPO

Frame = tuple[str, str, int]  # (qualified name, file, line)


class Stack:
    """One py-spy sample: frames root first, each "qualified.name (file:line)"."""

    def __init__(self, frames: list[str]):
        self.frames: list[Frame] = []
        for frame in frames:
            name, _, location = frame.partition(" (")
            file, _, line = location.rstrip(")").rpartition(":")
            self.frames.append((name, file, int(line) if line.isdigit() else -1))

    def find(self, func: str, file: str | None = None) -> Frame | None:
        """The innermost frame whose qualified name is func or ends with .func (and whose file contains file)."""
        for frame in reversed(self.frames):
            name, path, _ = frame
            if (name == func or name.endswith("." + func)) and (file is None or file in path):
                return frame
        return None

    def has(self, func: str, file: str | None = None) -> bool:
        return self.find(func, file) is not None


def call_lines(path: Path, needles: dict[str, str]) -> dict[int, str]:
    """{line number: label} of the first line of `path` containing each needle."""
    lines = path.read_text().splitlines()
    return {next(i for i, line in enumerate(lines, 1) if needle in line): label
            for needle, label in needles.items() if any(needle in line for line in lines)}


@functools.cache
def peft_lora_lines() -> list[str]:
    import peft.tuners.lora.layer as layer

    return Path(layer.__file__).read_text().splitlines()


def component(st: Stack, lm_head: bool) -> str:
    """What a forward-pass sample was doing."""
    if lm_head:
        return "LM head + log-softmax"
    lora = st.find("forward", "peft/tuners/lora/layer.py")
    if st.has("LlamaAttention.forward"):
        lines = peft_lora_lines()
        if lora is not None and 0 < lora[2] <= len(lines) and "lora_B(lora_A" in lines[lora[2] - 1]:
            return "LoRA A/B matmuls"
        return "attention (q,k,v,o proj + sdpa)"
    if st.has("LlamaMLP.forward"):
        return "MLP"
    if st.frames and "deepspeed/" in st.frames[-1][1]:
        return "DeepSpeed wrapper"
    if st.has("LlamaModel.forward"):
        return "decoder other (embed/norm/rope/mask)"
    return "other"


def classify_kto() -> Callable[[list[str]], str]:
    calls = call_lines(REPO / "kto_scale/scoring.py", {
        "reference, reference_kl = engine(": "reference forwards, example + KL seqs (no grad, adapters off)",
        "policy_kl = engine(": "policy forward on KL seqs (no grad)",
        "cache.lookup(": "reference cache lookup",
    })

    def classify(frames: list[str]) -> str:
        st = Stack(frames)
        if st.has("DeepSpeedEngine.backward"):
            if st.has("_token_logps"):
                return "backward: LM-head chunk recompute"
            if any("deepspeed/runtime/zero" in f[1] for f in st.frames):
                return "backward: DeepSpeed ZeRO-2 gradient hooks (python)"
            return "backward (autograd)"
        if st.has("DeepSpeedEngine.step"):
            return "optimizer step (DeepSpeed ZeRO-2 + AdamW)"
        if st.has("collate", "kto_scale/collate.py"):
            return "data: collate"
        if st.has("to_device", "kto_scale/collate.py"):
            return "data: to device"
        lm_head = st.has("chunked_completion_logps")
        frame = st.find("no_grad_logps", "kto_scale/scoring.py")
        if frame is not None:
            return f"{calls.get(frame[2], 'no_grad_logps other')} / {component(st, lm_head)}"
        if st.has("train_step") and st.has("SequenceLogps.forward"):
            return f"policy forward (grad) / {component(st, lm_head)}"
        if st.has("train_step"):
            return "train_step: loss, z_ref, metric sums"
        if st.has("summarize_sums") or st.has("MetricsLogger.log"):
            return "logging"
        if st.has("save_adapter"):
            return "train(): final save"
        if st.has("train", "kto_scale/trainer.py"):
            return "train(): setup/other"
        return "process: start-up/import/other"

    return classify


def classify_trl() -> Callable[[list[str]], str]:
    import trl.trainer.kto_trainer as kto_trainer

    calls = call_lines(Path(kto_trainer.__file__), {
        "KL_logps = self._compute_kl_logps(model, batch)": "policy forward on KL seqs (no grad)",
        "outputs = model(**model_kwargs, labels=completion_labels, fused_lm_head=True)": "policy forward (grad)",
        "ref_KL_logps = self._compute_kl_logps(self.model, batch)": "reference forward, KL seqs (adapters off)",
        "ref_outputs = self.model(**ref_model_kwargs": "reference forward, example seqs (adapters off)",
    })

    def classify(frames: list[str]) -> str:
        st = Stack(frames)
        lm_head = st.has("_fused_forward") and not st.has("LlamaModel.forward")
        if st.has("_precompute_ref_logps"):
            return f"precompute reference / {component(st, lm_head)}"
        if st.has("backward", "torch/_tensor.py") or st.has("Accelerator.backward"):
            chunk = any("chunked_logprob" in f[1] for f in st.frames)
            return "backward" + (": fused LM head backward (python tiles)" if chunk else " (autograd)")
        if st.has("clip_grad_norm_"):
            return "grad clipping"
        if st.has("step", "torch/optim") or st.has("AcceleratedOptimizer.step"):
            return "optimizer step (AdamW)"
        frame = st.find("_compute_loss", "trl/trainer/kto_trainer.py")
        if frame is not None:
            if frame[2] in calls:
                return f"{calls[frame[2]]} / {component(st, lm_head)}"
            return "loss, metrics (.item() syncs)"
        if st.has("__next__", "torch/utils/data") or st.has("get_batch_samples"):
            return "data: dataloader + collate"
        if st.has("_maybe_log_save_evaluate") or st.has("log", "trl/trainer/kto_trainer.py"):
            return "logging"
        if st.has("_inner_training_loop") or st.has("_run_epoch"):
            return "train(): loop other"
        return "process: start-up/setup/other"

    return classify


def in_training_loop(label: str) -> bool:
    """Start-up, set-up, the precompute and the final save are left out of a profile."""
    return not label.startswith(("process", "train():", "precompute"))


def summarize_profile(path: Path, classify: Callable[[list[str]], str]) -> dict:
    """Share of the training loop's samples per label, largest first."""
    counts: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        label = classify(frames)
        if in_training_loop(label):
            counts[label] += int(n)
    total = sum(counts.values())
    return {"samples": total, "phases": [(k, 100 * v / total) for k, v in counts.most_common()]}
