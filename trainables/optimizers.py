"""Optimizers for the soft prompt, by name, and the learning-rate schedule."""
from __future__ import annotations

import torch
from transformers.optimization import Adafactor


def adafactor(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The paper's setting (t5_1_1_prompt.gin): constant lr, no parameter scaling, no relative
    step, beta2 decay 0.8. HF's decay_rate is the exponent of 1 - t^decay_rate, hence -0.8."""
    return Adafactor(params, lr=lr, weight_decay=weight_decay, decay_rate=-0.8,
                     scale_parameter=False, relative_step=False, warmup_init=False,
                     clip_threshold=1.0, beta1=None)


def adamw(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


OPTIMIZERS = {f.__name__: f for f in (adafactor, adamw)}

# The defaults a user gets when naming only the optimizer.
DEFAULT_LR = {"adafactor": 0.3, "adamw": 0.03}


def lr_multiplier(step: int, warmup_steps: int, decay_factor: float | None, max_steps: int) -> float:
    """Linear warmup, then exponential decay reaching `decay_factor` at max_steps (paper Table 6)."""
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    decay = decay_factor ** (step / max_steps) if decay_factor is not None else 1.0
    return warmup * decay


def build_optimizer(name: str, prompt: torch.nn.Parameter, lr: float | None, weight_decay: float,
                    warmup_steps: int, decay_factor: float | None, max_steps: int):
    """The named optimizer at `lr`, or at its own default (DEFAULT_LR) when `lr` is None, with its schedule."""
    optimizer = OPTIMIZERS[name]([prompt], DEFAULT_LR[name] if lr is None else lr, weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup_steps, decay_factor, max_steps))
    return optimizer, schedule
