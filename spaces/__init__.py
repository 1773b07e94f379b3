"""Optuna define-by-run search spaces: pure functions of an Optuna `trial` and the search's list
of model checkpoints. Each suggests parameters named after TrainConfig fields; a name may carry a
branch suffix (`lr@adamw`) when one field has a different range per branch
(`trainables.config.fields_from_params` turns them back into fields).
"""
from __future__ import annotations

from collections.abc import Callable

import optuna

# The paper's default point (sections 3, 7), on the first (LM-adapted) checkpoint: tried first by a `paper` search.
PAPER_DEFAULT = {"prompt_length": 100, "init": "class_label", "optimizer": "adafactor", "lr@adafactor": 0.3,
                 "parameter_scaling": False, "warmup_fraction": 0.0, "decay_factor": None}

# Table 6's step counts are out of 30,000; here they are fractions of the search's budget (max_steps).
PAPER_STEPS = 30_000


def paper(trial: optuna.Trial, checkpoints: list[str]) -> dict:
    """The paper's ablations (section 7) and its Table 6 search, its step counts as fractions of max_steps;
    AdamW, not in the paper, is the alternative to its Adafactor. Why batch size and steps are left out:
    docs/configuration.md#search-spaces."""
    trial.suggest_categorical("prompt_length", [1, 5, 20, 100, 150])
    trial.suggest_categorical("init", ["random_uniform", "sampled_vocab", "class_label"])
    optimizer = trial.suggest_categorical("optimizer", ["adafactor", "adamw"])
    if optimizer == "adafactor":
        trial.suggest_float("lr@adafactor", 1e-3, 0.5, log=True)
        trial.suggest_categorical("parameter_scaling", [False, True])
    else:
        trial.suggest_float("lr@adamw", 1e-5, 1e-1, log=True)
    trial.suggest_categorical("warmup_fraction", [0.0, 2000 / PAPER_STEPS, 3000 / PAPER_STEPS])
    if trial.suggest_categorical("decay_factor", [None, 0.1, 0.5]) is not None:
        trial.suggest_categorical("decay_fraction", [4000 / PAPER_STEPS, 6000 / PAPER_STEPS, 8000 / PAPER_STEPS])
    if len(checkpoints) > 1:
        trial.suggest_categorical("model", checkpoints)
    return {}


def quick(trial: optuna.Trial, checkpoints: list[str]) -> dict:
    """A CPU-sized space for the demo: short prompts, both optimizers, all three paper inits."""
    trial.suggest_categorical("prompt_length", [5, 20])
    trial.suggest_categorical("init", ["random_uniform", "sampled_vocab", "class_label"])
    optimizer = trial.suggest_categorical("optimizer", ["adafactor", "adamw"])
    if optimizer == "adafactor":
        trial.suggest_float("lr@adafactor", 0.01, 0.5, log=True)
    else:
        trial.suggest_float("lr@adamw", 1e-3, 0.1, log=True)
    if len(checkpoints) > 1:
        trial.suggest_categorical("model", checkpoints)
    return {}


SPACES: dict[str, Callable[[optuna.Trial, list[str]], dict]] = {"paper": paper, "quick": quick}
# quick's first trial: the best AdamW setting on SmolLM2 in bench/results/units.md.
DEFAULT_POINTS = {"paper": PAPER_DEFAULT,
                  "quick": {"prompt_length": 20, "init": "class_label", "optimizer": "adamw", "lr@adamw": 0.03}}


class CustomSpace:
    """A space from a validated YAML mapping: name -> {choices: [...]} or {low, high, log, int},
    each optionally `when: {other_param: value}`. Entries are suggested in the order written, so a
    condition may only refer to parameters above it. With several checkpoints, a mapping that does
    not name `model` chooses among them last, as the named spaces do. (A class, not a closure: Ray
    pickles it.)"""

    def __init__(self, definition: dict, checkpoints: list[str] = ()):
        chooses_model = len(checkpoints) > 1 and "model" not in definition
        self.definition = {**definition, "model": {"choices": list(checkpoints)}} if chooses_model else definition

    def __call__(self, trial: optuna.Trial, checkpoints: list[str] = ()) -> dict:
        for name, spec in self.definition.items():
            if any(trial.params.get(other) != value for other, value in spec.get("when", {}).items()):
                continue
            if "choices" in spec:
                trial.suggest_categorical(name, spec["choices"])
            elif spec.get("int"):
                trial.suggest_int(name, spec["low"], spec["high"], log=spec.get("log", False))
            else:
                trial.suggest_float(name, spec["low"], spec["high"], log=spec.get("log", False))
        return {}

    def grid(self) -> dict[str, list]:
        """Each parameter's choices: the grid Optuna's GridSampler runs, cell by cell, for a space of
        choices only (no ranges, no `when:`)."""
        return {name: spec["choices"] for name, spec in self.definition.items()}
