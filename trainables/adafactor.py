"""T5X's Adafactor (t5x/adafactor.py), the optimizer the paper's code ran, as a torch optimizer.

With the defaults below it is what google-research/prompt-tuning's `t5_1_1_prompt.gin` configures:
decay rate 0.8, no momentum, no parameter scaling, update clipping 1.0, weight decay 1e-5 applied
as T5X applies it. One step at step number t (counted from 1) on a parameter p with gradient g:

    beta2 = 1 - t^-decay_rate                      0 at t = 1: the first step sees only its own g
    v     = beta2 v + (1 - beta2) (g^2 + epsilon1)  as row and column means when the two largest
                                                    dimensions are both >= min_dim_size_to_factor
    u     = g / sqrt(v), then u / max(1, RMS(u) / clipping_threshold)
    p     = (1 - weight_decay) p - lr * scale * u   scale = max(RMS(p), epsilon2) with parameter
                                                    scaling, else 1

So from a fresh state the first update of an unfactored parameter is lr * sign(g): a prompt of
length below 128 keeps a full second moment, whatever its width.
"""
from __future__ import annotations

import torch


class Adafactor(torch.optim.Optimizer):
    """T5X's Adafactor for parameters of up to two dimensions (a soft prompt is one [length, width] tensor)."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, decay_rate: float = 0.8,
                 clipping_threshold: float | None = 1.0, min_dim_size_to_factor: int = 128,
                 epsilon1: float = 1e-30, epsilon2: float = 1e-3, multiply_by_parameter_scale: bool = False):
        # weight_decay is T5X's weight_decay_rate: a fraction of the weight removed per step, not
        # multiplied by lr (prompt-tuning sets no weight_decay_rate_lr_exponent), unlike
        # transformers' Adafactor and torch's AdamW, which remove lr * weight_decay.
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "decay_rate": decay_rate,
                                  "clipping_threshold": clipping_threshold,
                                  "min_dim_size_to_factor": min_dim_size_to_factor, "epsilon1": epsilon1,
                                  "epsilon2": epsilon2, "multiply_by_parameter_scale": multiply_by_parameter_scale})

    def load_state_dict(self, state_dict: dict) -> None:
        # `adafactor` named transformers' Adafactor before; its checkpoints hold other keys, and
        # would otherwise fail later, inside a step, with a bare KeyError
        for state in state_dict["state"].values():
            if "v" not in state and not {"v_row", "v_col"} <= state.keys():
                raise ValueError(f"optimizer state with {', '.join(sorted(state))} is not T5X Adafactor's (v, or "
                                 f"v_row and v_col): a checkpoint of transformers' Adafactor resumes with adafactor_hf")
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(initial_state(p, group["min_dim_size_to_factor"]))
                state["step"] += 1
                p.copy_(updated(p.float(), p.grad.float(), state, group).to(p.dtype))
        return loss


def factored_dims(shape: torch.Size, min_dim_size_to_factor: int) -> tuple[int, int] | None:
    """(second largest, largest) dimension when both are at least min_dim_size_to_factor, else None
    (T5X's `_factored_dims`; on equal sizes the earlier dimension counts as the smaller)."""
    if len(shape) > 2:
        raise ValueError(f"a parameter of shape {tuple(shape)} has more than 2 dimensions: T5X factors those "
                         f"only by explicit rules, which this Adafactor does not take")
    if len(shape) < 2:
        return None
    smaller, larger = sorted(range(2), key=lambda d: shape[d])
    return (smaller, larger) if shape[smaller] >= min_dim_size_to_factor else None


def initial_state(p: torch.Tensor, min_dim_size_to_factor: int) -> dict:
    dims = factored_dims(p.shape, min_dim_size_to_factor)
    if dims is None:
        return {"step": 0, "v": torch.zeros_like(p, dtype=torch.float32)}
    smaller, larger = dims
    # v_row: the mean over the largest dimension (one value per row); v_col: over the other one
    return {"step": 0, "v_row": p.new_zeros(p.shape[smaller], dtype=torch.float32),
            "v_col": p.new_zeros(p.shape[larger], dtype=torch.float32)}


def updated(p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
    """The parameter after one step; the second-moment state is updated in place."""
    beta2 = 1.0 - state["step"] ** -group["decay_rate"]
    grad_sqr = grad * grad + group["epsilon1"]
    if "v" in state:
        state["v"].mul_(beta2).add_(grad_sqr, alpha=1.0 - beta2)
        u = grad * state["v"].rsqrt()
    else:
        smaller, larger = factored_dims(p.shape, group["min_dim_size_to_factor"])
        state["v_row"].mul_(beta2).add_(grad_sqr.mean(larger), alpha=1.0 - beta2)
        state["v_col"].mul_(beta2).add_(grad_sqr.mean(smaller), alpha=1.0 - beta2)
        row_factor = (state["v_row"] / state["v_row"].mean()).rsqrt()
        u = grad * row_factor.unsqueeze(larger) * state["v_col"].rsqrt().unsqueeze(smaller)
    if group["clipping_threshold"] is not None:
        u = u / torch.clamp(u.square().mean().sqrt() / group["clipping_threshold"], min=1.0)
    scale = group["lr"]
    if group["multiply_by_parameter_scale"]:
        scale = scale * torch.clamp(p.square().mean().sqrt(), min=group["epsilon2"])
    return (1.0 - group["weight_decay"]) * p - scale * u
