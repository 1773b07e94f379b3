"""Config files, validated at the edge: every error names the field, the value and what is
allowed, so inner code can trust what it gets."""
from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from softprompt.configfile import (
    ConfigError,
    Rule,
    check_fields,
    integer,
    is_int,
    is_number,
    load_yaml,
    number,
    one_of,
    parse_overrides,
    text,
)
from softprompt.models.data import check_sentinel
from softprompt.models.evaluate import EVAL_MODES
from softprompt.models.hub import MODELS_ALLOWED, model_problem
from softprompt.models.manifest import expand_manifests
from softprompt.models.tasks import (
    FILE_SUFFIXES,
    OFFLINE_TASKS,
    ROLES,
    TASK_KEYS,
    TaskError,
    is_local_source,
    is_task_file,
    load_task,
    task_names,
)
from softprompt.search.rules import MAX_TRIALS, SEARCH_RULES, STORAGE_PATH, search_values
from softprompt.spaces import CustomSpace
from softprompt.trainables.config import (
    ASHA_METRICS,
    FIELDS,
    RANK_ONLY_METRICS,
    SEARCH_METRICS,
    SELECT_METRICS,
    TrainConfig,
)
from softprompt.trainables.inits import INITS
from softprompt.trainables.optimizers import LR_UNITS, OPTIMIZERS, PARAMETER_SCALING


def _has_cxx() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def _valid_task(v) -> bool:
    return isinstance(v, dict) or (isinstance(v, str) and (v in task_names() or is_task_file(v)))


def _valid_verbalizers(v) -> bool:
    return v is None or (isinstance(v, dict) and len(v) >= 2
                         and all(isinstance(x, str) and x.strip() for x in v.values()))


def _valid_task_name(v) -> bool:  # it names the task's folder in an exported bundle: no way out of it
    return isinstance(v, str) and re.fullmatch(r"[\w.-]+(/[\w.-]+)*", v) is not None and ".." not in v.split("/")


# A task mapping (models.tasks.dataset_task); what its data holds is checked when it is read.
TASK_RULES: dict[str, Rule] = {
    "name": Rule(_valid_task_name, "letters, digits, '-', '_' and '.', in '/'-separated parts"),
    "dataset": text(),
    "config": text(optional=True),
    "revision": text(optional=True),
    "splits": Rule(lambda v: isinstance(v, dict) and set(v) <= set(ROLES)
                   and all(s is None or (isinstance(s, str) and s.strip()) for s in v.values()),
                   "a mapping of train / dev / test to split names (dev or test null: carved from train)"),
    "template": text(optional=True),
    "label_column": text(optional=True),
    "verbalizers": Rule(lambda v: _valid_verbalizers(v) or (isinstance(v, list) and len(v) >= 2
                                                            and len(set(v)) == len(v)
                                                            and all(isinstance(x, str) and x.strip() for x in v)),
                        "null, a list of 2+ distinct non-empty strings (class i: the i-th), or a mapping of 2+ label "
                        "values to non-empty strings"),
}
assert set(TASK_RULES) == set(TASK_KEYS), "every task mapping key needs a rule"


TRAIN_RULES: dict[str, Rule] = {
    "model": text(),
    "dtype": one_of("auto", "float32", "bfloat16", "float16"),
    "compile": Rule(lambda v: v is False or (v is True and _has_cxx()),
                    "true or false; true needs a C++ compiler on the PATH (g++, c++ or clang++: inductor builds "
                    "its CPU kernels with it)"),
    "task": Rule(_valid_task, f"one of {', '.join(task_names())}, a data file ({', '.join(FILE_SUFFIXES)}), "
                              f"or a mapping with dataset: (a hub id, a save_to_disk folder, or files)"),
    "text_column": text(),
    "label_column": text(),
    "verbalizers": Rule(_valid_verbalizers, "null or a mapping of 2+ label values to non-empty strings"),
    "max_length": integer(8),
    "max_train_examples": integer(1, optional=True),
    "max_eval_examples": integer(1, optional=True),
    "max_test_examples": integer(1, optional=True),
    "confirm_examples": integer(0),
    "prompt_length": integer(1, 1000),
    "init": one_of(*INITS),
    "init_scale": number(0, low_open=True),
    "init_text": text(optional=True),
    "optimizer": one_of(*OPTIMIZERS),
    "lr": number(0, 10, low_open=True, optional=True),
    "lr_unit": one_of(*LR_UNITS),
    "weight_decay": number(0, 1),
    "parameter_scaling": Rule(lambda v: isinstance(v, bool), "true or false"),
    "warmup_steps": integer(0),
    "decay_factor": number(0, 1, low_open=True, optional=True),
    "decay_steps": integer(1, optional=True),
    "dropout": Rule(lambda v: is_number(v) and 0 <= v < 1, "a finite number >= 0 and < 1"),
    "sentinel": Rule(lambda v: isinstance(v, bool), "true or false"),
    "batch_size": integer(1, 4096),
    "max_steps": integer(1),
    "eval_every": integer(1),
    "eval_steps": Rule(lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) > 0
                                               and all(is_int(x) and x >= 1 for x in v)),
                       "null or a list of steps (integers >= 1)"),
    "eval_mode": one_of(*EVAL_MODES),
    "eval_batch_size": integer(1, 4096),
    "select_metric": one_of(*SELECT_METRICS),
    "seed": integer(0),
    "output_dir": text(),
}
assert set(TRAIN_RULES) == set(FIELDS), "every TrainConfig field needs a rule"


def check_model_name(field: str, name: str, source: str | None) -> None:
    """A model that cannot be loaded is a config error, found before any trial starts."""
    problem = model_problem(name)
    if problem:
        raise ConfigError(field, name, f"{MODELS_ALLOWED} ({problem})", source)


def train_config(values: dict, source: str | None = None, prefix: str = "") -> TrainConfig:
    """A TrainConfig from a plain mapping (no lr: the optimizer's default, see TrainConfig.lr)."""
    if not isinstance(values, dict):
        raise ConfigError(prefix.rstrip(".") or "config", values, "a mapping of field: value", source)
    check_fields(values, TRAIN_RULES, source, prefix)
    values = dict(values)
    if values.get("init") == "text" and not values.get("init_text"):
        raise ConfigError(prefix + "init_text", values.get("init_text"), "a non-empty string when init is text", source)
    optimizer = values.get("optimizer", TrainConfig.optimizer)
    if values.get("parameter_scaling") and optimizer not in PARAMETER_SCALING:
        raise ConfigError(prefix + "parameter_scaling", True, f"false with optimizer {optimizer} (only "
                                                              f"{', '.join(PARAMETER_SCALING)} have it)", source)
    if is_task_file(values.get("task", "")) and not Path(values["task"]).is_file():
        raise ConfigError(prefix + "task", values["task"], "an existing data file (no such file)", source)
    if isinstance(values.get("task"), dict):
        values["task"] = _task_mapping(values, source, prefix)
    if values.get("eval_steps") is not None:  # a tuple: the config is frozen and hashable
        values["eval_steps"] = tuple(sorted(set(values["eval_steps"])))
    cfg = TrainConfig(**values)
    check_model_name(prefix + "model", cfg.model, source)
    # Read the task once here: a bad row, split or hub id must not surface in every trial.
    if not (isinstance(cfg.task, str) and cfg.task in OFFLINE_TASKS):
        try:
            load_task(cfg.task, cfg.text_column, cfg.label_column, cfg.verbalizers)
        except TaskError as error:
            if error.field is None:  # a task file's error names the file and row
                raise
            raise TaskError(f"{source}: {prefix}{error}" if source else f"{prefix}{error}") from None
    return cfg


def _task_mapping(values: dict, source: str | None, prefix: str) -> dict:
    """A task mapping, its keys checked; a local `dataset` made absolute, as trials may run elsewhere."""
    task = values["task"]
    check_fields(task, TASK_RULES, source, prefix + "task.")
    if "dataset" not in task:
        raise ConfigError(prefix + "task.dataset", None, "a hub dataset id, a save_to_disk folder, or a data file / "
                                                         "glob / folder of files", source)
    for key, instead in (("text_column", "template"), ("label_column", "label_column"), ("verbalizers", "verbalizers")):
        if key in values:
            raise ConfigError(prefix + key, values[key], f"left out with a task mapping: set task.{instead}", source)
    local = is_local_source(task["dataset"])
    return {**task, "dataset": os.path.abspath(task["dataset"]) if local else task["dataset"]}


def load_train_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    return train_config({**load_yaml(path), **parse_overrides(list(overrides))}, source=str(path))


# ---- search configs ----

# The dev metric that keeps each trial's best prompt, by search metric; train_loss: train.select_metric.
SELECT_BY_METRIC = {"best_dev_accuracy": "accuracy", "dev_accuracy": "accuracy", "best_dev_f1": "f1", "dev_f1": "f1"}
# A search's trials that run to max_steps score their best prompt on this many further dev examples
# (train.confirm_examples), and the winner is picked by that score: a trial's best dev accuracy is
# the maximum of several scores on max_eval_examples, biased upwards by noise.
SEARCH_CONFIRM_EXAMPLES = 500


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """A validated search; a field without a default here gets one from the others (`search_config`)."""
    name: str                     # default: the config file's name
    train: TrainConfig            # fixed fields of every trial (max_steps is the budget's)
    space: str | dict = "quick"   # a name in spaces.SPACES, or a validated custom definition
    checkpoints: tuple[str, ...]  # the models a space may choose among (default: train.model)
    points_to_evaluate: tuple[dict, ...] | None = None
    metric: str = "best_dev_accuracy"
    asha_metric: str              # what ASHA compares trials by at its rungs (default: metric)
    sampler: str = "tpe"          # tpe | random | grid (a space of choices: lists only; each cell runs once)
    startup_trials: int | None = None  # tpe: random points before TPE models the results (None: a quarter of
                                       # the trials, 2 to 10: search.tuner.startup_trials)
    trials: int = 8               # points the sampler suggests (a grid: its cells); Tune runs trials x seeds
    seeds: int = 1                # runs per point, seeds train.seed + 0..seeds-1: points rank by their mean
    time_limit_s: float | None = None
    scheduler: str = "asha"       # asha | none
    grace_period: int             # default: three ASHA rungs (search_config)
    reduction_factor: int = 3
    concurrency: int = 2          # at most trials
    cpus_per_trial: float = 1
    gpus_per_trial: float = 0
    shared_backbone: bool = False  # trials train through one frozen copy per node (per GPU) (backbone_server/server.py)
    storage_path: str = STORAGE_PATH
    seed: int = 0
    max_failures: int = 1

    @property
    def mode(self) -> str:
        return SEARCH_METRICS[self.metric]

    @property
    def asha_mode(self) -> str:
        return ASHA_METRICS[self.asha_metric]


# What a search config file leaves out: None where the field's default comes from other fields;
# max_steps, every trial's budget, becomes train.max_steps.
SEARCH_DEFAULTS = {**{f.name: None if f.default is MISSING else f.default for f in fields(SearchConfig)},
                   "train": {}, "max_steps": 100}


assert set(SEARCH_RULES) == set(SEARCH_DEFAULTS), "every SearchConfig field needs a rule"
SPACE_KEYS = {"choices", "low", "high", "log", "int", "when"}
SPACE_EXTRA_PARAMS = {"warmup_fraction": number(0, 1), "decay_fraction": number(0, 1, low_open=True)}


def _check_space(space: dict, source: str | None) -> None:
    """Every parameter sets a TrainConfig field (optionally `field@branch`), and every value it
    can take passes that field's own rule."""
    seen: list[str] = []
    for name, spec in space.items():
        where = f"space.{name}"
        field = str(name).split("@")[0]
        rule = TRAIN_RULES.get(field) or SPACE_EXTRA_PARAMS.get(field)
        if field == "compile":
            raise ConfigError(where, name, "not a space parameter: compiling is search-wide (train.compile)", source)
        if rule is None or field in ("max_steps", "output_dir"):
            raise ConfigError(where, name,
                              "a training field name (optionally field@branch), e.g. lr, prompt_length, init", source)
        if not isinstance(spec, dict) or set(spec) - SPACE_KEYS:
            raise ConfigError(where, spec, f"a mapping with keys from {sorted(SPACE_KEYS)}", source)
        if "choices" in spec:
            if not isinstance(spec["choices"], list) or not spec["choices"]:
                raise ConfigError(where + ".choices", spec["choices"], "a non-empty list", source)
            for choice in spec["choices"]:
                if not rule.check(choice):
                    raise ConfigError(where + ".choices", choice, rule.allowed, source)
        else:
            low, high = spec.get("low"), spec.get("high")
            if not (is_number(low) and is_number(high) and low < high):
                raise ConfigError(where, spec, "either choices: [...] or numbers low < high", source)
            for bound in (low, high):
                if not rule.check(int(bound) if spec.get("int") else bound):
                    raise ConfigError(where, bound, rule.allowed, source)
            if spec.get("log") and low <= 0:
                raise ConfigError(where + ".low", low, "a number > 0 when log: true", source)
        when = spec.get("when", {})
        if not isinstance(when, dict) or any(k not in seen for k in when):
            raise ConfigError(where + ".when", when, f"a mapping over parameters defined above it ({seen})", source)
        seen.append(name)


def _grid_cells(merged: dict, given: dict, source: str | None, checkpoints: tuple[str, ...]) -> int:
    """The number of cells of a `sampler: grid` search, each run once (times seeds): its `trials`.
    Only a space of choices lists is finite; a `when:` would leave cells that differ in nothing.
    Several checkpoints are an axis of the grid, unless the space names `model` itself."""
    space = merged["space"]
    if isinstance(space, dict):
        space = CustomSpace(space, checkpoints).definition
    problem = (f"space {space!r} has ranges" if not isinstance(space, dict) else
               next((f"space.{name} has {'when:' if 'when' in spec else 'a range'}" for name, spec in space.items()
                     if "choices" not in spec or "when" in spec), None))
    if problem:
        raise ConfigError("sampler", "grid",
                          "one of tpe, random for this space; grid needs a space mapping whose every parameter "
                          f"lists choices: [...], without when: ({problem})", source)
    cells = math.prod(len(spec["choices"]) for spec in space.values())
    if cells > MAX_TRIALS:
        raise ConfigError("space", f"{cells} grid cells", f"a grid of at most {MAX_TRIALS} cells", source)
    if "trials" in given and given["trials"] != cells:
        raise ConfigError("trials", given["trials"], f"{cells}, the number of grid cells (sampler: grid runs each "
                                                     f"once), or leave it out", source)
    if merged["points_to_evaluate"] is not None:
        raise ConfigError("points_to_evaluate", merged["points_to_evaluate"], "left out with sampler: grid (it runs "
                                                                              "every cell once)", source)
    return cells


def asha_rungs(grace_period: int, reduction_factor: int, max_t: int) -> list[int]:
    """The steps at which Ray's ASHA compares trials (its `_Bracket` milestones), then max_t."""
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    return sorted({grace_period * reduction_factor ** k for k in range(count)} - {max_t}) + [max_t]


def search_config(values: dict, source: str | None = None, default_name: str = "search") -> SearchConfig:
    check_fields(values, SEARCH_RULES, source)
    merged = {**SEARCH_DEFAULTS, **values}
    if "max_steps" in merged["train"]:
        raise ConfigError("train.max_steps", merged["train"]["max_steps"],
                          "set the budget with the top-level max_steps", source)
    train = train_config({"confirm_examples": SEARCH_CONFIRM_EXAMPLES, **merged["train"],
                          "max_steps": merged["max_steps"]}, source, prefix="train.")
    select = SELECT_BY_METRIC.get(merged["metric"], train.select_metric)
    if train.select_metric != select and "select_metric" in merged["train"]:
        raise ConfigError("train.select_metric", train.select_metric, f"{select} (set by metric: {merged['metric']}), "
                                                                      f"or leave it out", source)
    train = train.replace(select_metric=select)
    checkpoints = tuple(expand_manifests(merged["checkpoints"] or [train.model]))
    for model in checkpoints:
        check_model_name("checkpoints", model, source)
    if len(checkpoints) == 1 and checkpoints[0] != train.model:  # the space has no model to choose
        if "model" in merged["train"]:
            raise ConfigError("checkpoints", list(checkpoints), f"the same model as train.model ({train.model!r}) "
                                                                f"when only one is listed", source)
        train = train.replace(model=checkpoints[0])
    if isinstance(merged["space"], dict):
        _check_space(merged["space"], source)
        seeded = [name for name in merged["space"] if str(name).split("@")[0] == "seed"]
        if seeded and merged["seeds"] > 1:
            raise ConfigError(f"space.{seeded[0]}", merged["space"][seeded[0]],
                              "left out with seeds > 1 (a point's seeds are train.seed + 0..seeds-1)", source)
    space_sentinel = (isinstance(merged["space"], dict)
                      and True in merged["space"].get("sentinel", {}).get("choices", []))
    if train.sentinel or space_sentinel:  # refused here, before any trial starts, not in every trial
        for model in checkpoints:
            check_sentinel(model)
    if merged["sampler"] == "grid":
        merged["trials"] = _grid_cells(merged, values, source, checkpoints)
    # default: three ASHA rungs (about max_steps / factor^2, max_steps / factor, and max_steps)
    grace = merged["grace_period"] or max(1, math.ceil(merged["max_steps"] / merged["reduction_factor"] ** 2))
    if grace > merged["max_steps"]:
        raise ConfigError("grace_period", grace, f"at most max_steps ({merged['max_steps']})", source)
    if merged["scheduler"] == "asha" and train.eval_steps is None:
        # Evaluate where ASHA compares trials (and every eval_every steps if that was set too): an
        # evaluation costs several training steps, and one ASHA never looks at is wasted. Reports,
        # and so checkpoints, come at the same steps.
        steps = set(asha_rungs(grace, merged["reduction_factor"], merged["max_steps"]))
        if "eval_every" in merged["train"]:
            steps |= set(range(train.eval_every, merged["max_steps"], train.eval_every))
        train = train.replace(eval_steps=tuple(sorted(steps)))
    asha_metric = merged["asha_metric"] or merged["metric"]
    if asha_metric in RANK_ONLY_METRICS and train.eval_mode != "rank":
        raise ConfigError("asha_metric", asha_metric, f"one of {', '.join(SEARCH_METRICS)} with exact-match "
                                                      f"evaluation, or train.eval_mode: rank", source)
    if merged["startup_trials"] is not None and merged["sampler"] != "tpe":
        raise ConfigError("startup_trials", merged["startup_trials"], f"null with sampler: {merged['sampler']} (only "
                                                                      f"tpe has start-up trials)", source)
    if merged["shared_backbone"] and merged["gpus_per_trial"] > 1:
        raise ConfigError("gpus_per_trial", merged["gpus_per_trial"], "at most 1 with shared_backbone: true (a trial's "
                                                                      "share of the one GPU its server uses)", source)
    if train.compile and merged["shared_backbone"]:
        raise ConfigError("train.compile", True, "false with shared_backbone: true (a backbone server runs its "
                                                 "passes uncompiled)", source)
    points = merged["points_to_evaluate"]
    merged.update(name=merged["name"] or default_name, train=train, checkpoints=checkpoints, asha_metric=asha_metric,
                  points_to_evaluate=tuple(points) if points is not None else None, grace_period=grace,
                  concurrency=min(merged["concurrency"], merged["trials"] * merged["seeds"]))
    return SearchConfig(**{f.name: merged[f.name] for f in fields(SearchConfig)})


def load_search_config(path: str | Path, overrides: list[str] = ()) -> SearchConfig:
    """The YAML file, then `--set` overrides: `trials=4`, or `train.batch_size=16` for a trial field."""
    return search_config(search_values(path, overrides), source=str(path), default_name=Path(path).stem)
