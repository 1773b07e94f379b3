"""A search config's top-level fields and their rules, and where searches live: what `search run` and
`submit` check before torch and Ray are imported (search/config.py holds the rest)."""
from __future__ import annotations

from pathlib import Path

from softprompt.configfile import Rule, integer, load_yaml, number, one_of, parse_overrides, text
from softprompt.trainables.config import ASHA_METRICS, SEARCH_METRICS

STORAGE_PATH = "runs/search"  # where searches live unless a config or --storage-path names another place


def search_values(path: str | Path, overrides: list[str] = ()) -> dict:
    """A search config's YAML mapping, then `--set` overrides: `trials=4`, or `train.batch_size=16` (a trial field)."""
    values = load_yaml(path)
    for key, value in parse_overrides(list(overrides)).items():
        if key.startswith("train."):
            train = values.get("train") or {}
            values["train"] = {**train, key.removeprefix("train."): value} if isinstance(train, dict) else train
        else:
            values[key] = value
    return values


MAX_TRIALS = 10_000  # points per search (a grid search's cells)

SEARCH_RULES: dict[str, Rule] = {
    "name": Rule(lambda v: isinstance(v, str) and v.replace("-", "").replace("_", "").isalnum(),
                 "letters, digits, '-' and '_'"),
    "train": Rule(lambda v: isinstance(v, dict), "a mapping of training fields (see `softprompt train --help`)"),
    "space": Rule(lambda v: isinstance(v, dict) or v in ("quick", "paper"), "quick, paper, or a mapping of parameters"),
    "checkpoints": Rule(lambda v: v is None or (isinstance(v, list) and v and all(isinstance(x, str) and x for x in v)),
                        "a non-empty list of model names (offline alias, hub id or local folder) or "
                        "`softprompt lm-adapt` manifests"),
    "points_to_evaluate": Rule(lambda v: v is None or (isinstance(v, list) and all(isinstance(p, dict) for p in v)),
                               "null or a list of parameter mappings"),
    "metric": one_of(*SEARCH_METRICS),
    "asha_metric": one_of(*ASHA_METRICS, optional=True),
    "sampler": one_of("tpe", "random", "grid"),
    "startup_trials": integer(1, optional=True),
    "trials": integer(1, MAX_TRIALS),
    "seeds": integer(1, 100),
    "max_steps": integer(1),
    "time_limit_s": number(0, low_open=True, optional=True),
    "scheduler": one_of("asha", "none"),
    "grace_period": integer(1, optional=True),
    "reduction_factor": integer(2, 16),
    "concurrency": integer(1, 1024),
    "cpus_per_trial": number(0, low_open=True),
    "gpus_per_trial": number(0, 64),
    "shared_backbone": Rule(lambda v: isinstance(v, bool), "true or false"),
    "storage_path": text(),
    "seed": integer(0),
    "max_failures": integer(0, 100),
}
