"""The optimizer and learning-rate schedule both engines build when the DeepSpeed JSON does not name its
own: AdamW over the LoRA parameters and transformers' schedule by name (`get_scheduler`)."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LRScheduler
from transformers import get_scheduler

from kto_scale.config import KTOConfig


@dataclass(frozen=True)
class OptimizerSettings:
    """What the optimizer and the schedule read: KTOConfig's fields (TrainingArguments' names), with the
    warmup resolved for a run of total_steps optimizer steps."""

    learning_rate: float
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    lr_scheduler_type: str
    warmup_steps: int
    total_steps: int

    @classmethod
    def from_config(cls, config: KTOConfig, total_steps: int) -> "OptimizerSettings":
        return cls(config.learning_rate, config.weight_decay, config.adam_beta1, config.adam_beta2, config.adam_epsilon,
                   config.lr_scheduler_type, config.warmup_steps_for(total_steps), total_steps)


def optimizer_and_schedule(settings: OptimizerSettings, trainable: list[torch.nn.Parameter]
                           ) -> tuple[torch.optim.AdamW, Callable[[torch.optim.Optimizer], LRScheduler]]:
    """AdamW over the LoRA parameters and a factory of transformers' schedule named by lr_scheduler_type
    (a factory: DeepSpeed hands it the optimizer it actually steps, its ZeRO wrapper)."""
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, betas=(settings.adam_beta1, settings.adam_beta2),
                                  eps=settings.adam_epsilon, weight_decay=settings.weight_decay)

    def schedule(opt: torch.optim.Optimizer) -> LRScheduler:
        return get_scheduler(settings.lr_scheduler_type, opt, num_warmup_steps=settings.warmup_steps,
                             num_training_steps=settings.total_steps)
    return optimizer, schedule
