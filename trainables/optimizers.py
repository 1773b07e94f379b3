"""Optimizers for the soft prompt, by name, and the learning-rate schedule."""
from __future__ import annotations

import torch

from softprompt.trainables.adafactor import Adafactor


def adafactor(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The paper's optimizer: T5X's Adafactor as t5_1_1_prompt.gin sets it (beta2 decay 0.8, no
    momentum, no parameter scaling, update clipping 1.0, second moment factored only when both
    dimensions are >= 128)."""
    return Adafactor(params, lr=lr, weight_decay=weight_decay)


def adafactor_hf(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """transformers' Adafactor at the same settings, kept so a bench can measure what the paper's
    differs by: it factors every 2-D tensor (so its first step is not lr * sign(grad)) and removes
    lr * weight_decay per step. Its decay_rate is the exponent of 1 - t^decay_rate, hence -0.8.
    Imported here: transformers.optimization imports peft, 1.5 s of every trial's start otherwise."""
    from transformers.optimization import Adafactor as TransformersAdafactor

    return TransformersAdafactor(params, lr=lr, weight_decay=weight_decay, decay_rate=-0.8,
                                 scale_parameter=False, relative_step=False, warmup_init=False,
                                 clip_threshold=1.0, beta1=None)


def adamw(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


OPTIMIZERS = {f.__name__: f for f in (adafactor, adamw, adafactor_hf)}

DEFAULT_LR = {"adafactor": 0.3, "adamw": 0.03, "adafactor_hf": 0.3}

# What a configured lr is measured in: absolute, or in units of the model's embedding RMS (inits.embedding_rms).
LR_UNITS = ("absolute", "embedding_rms")


def absolute_lr(name: str, lr: float | None, unit: str, embedding_rms: float) -> float:
    """The step size optimizer `name` is given for a configured `lr` in `unit` (None: its absolute default).
    Adam's and T5X's Adafactor's first steps move every prompt element by about the step size, whatever
    the gradient's scale, so embedding_rms makes one value the same share of any backbone's embeddings. (The
    best lr did not follow that share between backbones, bench/results/units.md: the named spaces are absolute.)"""
    if lr is None:
        return DEFAULT_LR[name]
    return lr * embedding_rms if unit == "embedding_rms" else lr

# The param-group option that turns on "parameter scaling" (paper Table 6: each step is lr times the
# prompt's RMS, at least 1e-3), for the optimizers that have it.
PARAMETER_SCALING = {"adafactor": "multiply_by_parameter_scale", "adafactor_hf": "scale_parameter"}


def lr_multiplier(step: int, warmup_steps: int, decay_factor: float | None, max_steps: int,
                  decay_steps: int | None = None) -> float:
    """Linear warmup, times a decay by `decay_factor`: every `decay_steps` steps (a staircase, the
    paper's Table 6 "steps per decay", as T5X's `decay_every`), or without decay_steps smoothly,
    reaching decay_factor at max_steps."""
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    if decay_factor is None:
        decay = 1.0
    elif decay_steps:
        decay = decay_factor ** (step // decay_steps)
    else:
        decay = decay_factor ** (step / max_steps)
    return warmup * decay


def build_optimizer(name: str, prompt: torch.nn.Parameter, lr: float | None, weight_decay: float,
                    warmup_steps: int, decay_factor: float | None, max_steps: int,
                    decay_steps: int | None = None, parameter_scaling: bool = False):
    """The named optimizer at `lr`, or at its own default (DEFAULT_LR) when `lr` is None, with its schedule."""
    group = {"params": [prompt]}
    # An option of the Adafactors alone, as Table 6 searched it: a space that draws it beside the
    # optimizer (or a search's train.parameter_scaling) leaves AdamW trials as they are. A config
    # that fixes both is refused at the edge (search.config.train_config).
    if parameter_scaling and name in PARAMETER_SCALING:
        group[PARAMETER_SCALING[name]] = True
    optimizer = OPTIMIZERS[name]([group], DEFAULT_LR[name] if lr is None else lr, weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup_steps, decay_factor, max_steps, decay_steps))
    return optimizer, schedule
