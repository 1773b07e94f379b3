"""A prompt-tuning run's one configuration object, validated at the edge (search.config): trainables/ trusts it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# What a search may pick trials by (`metric`), and what ASHA may compare them by at its rungs
# (`asha_metric`), each with the direction that is better. A trial's reports carry them all, a
# failed trial's last report too (with worst values): Ray ends the whole search on a result that
# lacks the scheduler's or the searcher's metric.
# best_dev_*: the kept prompt's (trainables.loop.best_metrics); dev_*: the latest evaluation's.
SEARCH_METRICS = {"best_dev_accuracy": "max", "best_dev_f1": "max", "dev_accuracy": "max", "dev_f1": "max",
                  "train_loss": "min"}
RANK_ONLY_METRICS = {"dev_auc": "max", "dev_log_loss": "min"}  # only rank classification reports these
ASHA_METRICS = {**SEARCH_METRICS, **RANK_ONLY_METRICS}
SELECT_METRICS = ("accuracy", "f1")  # dev metrics that may pick the kept prompt (higher is better)


@dataclass(frozen=True)
class TrainConfig:
    """Each field's reason, default and measurements: docs/configuration.md."""
    # backbone
    model: str = "smollm2-135m"       # offline alias, hub id, or local folder
    dtype: str = "auto"               # auto: bfloat16 where the device runs it natively (backbone.resolve_dtype)
    compile: bool = False             # torch.compile the model's passes once per worker: pays off only in long trials
    # task
    task: str | dict = "rotten_tomatoes"  # registered name, a data file, or a mapping (models.tasks.TASK_KEYS)
    text_column: str = "text"         # file tasks only
    label_column: str = "label"       # file tasks only
    verbalizers: dict | None = None   # file tasks: label value -> verbalizer string
    max_length: int = 256             # input tokens kept per example
    max_train_examples: int | None = None
    max_eval_examples: int | None = 400  # dev examples per evaluation (many evaluations per trial)
    max_test_examples: int | None = None  # None: the whole test split, comparable with published scores
    confirm_examples: int = 0         # further dev examples the best prompt is scored on at the end: a search's
                                      # winner is picked by that score, not by the luckiest of many small ones
    # soft prompt
    prompt_length: int = 20
    init: str = "class_label"
    init_scale: float = 0.5           # random_uniform's range [-scale, scale] (random_uniform_relative: x the RMS)
    init_text: str | None = None      # text init only
    # optimisation (the paper: Adafactor, lr 0.3, weight decay 1e-5, batch 32)
    optimizer: str = "adafactor"
    lr: float | None = None           # None: the optimizer's own default (optimizers.DEFAULT_LR), in a trial too
    lr_unit: str = "absolute"         # or embedding_rms: lr x the common tokens' embedding RMS (optimizers.absolute_lr)
    weight_decay: float = 1e-5
    parameter_scaling: bool = False   # adafactor(_hf) only: steps x the prompt's RMS (T5X); the paper's runs: off
    warmup_steps: int = 0
    decay_factor: float | None = None  # lr x decay_factor every decay_steps (the paper's Table 6), else smoothly
    decay_steps: int | None = None    # Table 6's "steps per decay"; no effect without decay_factor
    dropout: float = 0.0              # on the embedded input, in training; the frozen model's own stays off
    sentinel: bool = False            # T5: targets start with <extra_id_0>, the paper's span corruption + sentinel
    batch_size: int = 8
    max_steps: int = 200
    eval_every: int = 50
    eval_steps: tuple | None = None   # evaluate at exactly these steps (and max_steps) instead: a search's ASHA rungs
    eval_mode: str = "rank"           # rank | exact_match
    eval_batch_size: int = 32
    select_metric: str = "accuracy"   # the dev metric that picks the kept prompt: accuracy | f1 (a search: its metric)
    seed: int = 0
    output_dir: str = "runs/train"

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


# A trial parameter that only records something about another (its checkpoint's LM-adaptation steps).
ADAPTATION_STEPS = "adaptation_steps"


def trial_config(params: dict, base: dict) -> TrainConfig:
    """A search trial's TrainConfig: the search's fixed fields `base`, then the trial's parameters."""
    return TrainConfig(**{**base, **fields_from_params(params, base["max_steps"])})


def fields_from_params(params: dict, max_steps: int) -> dict:
    """TrainConfig fields from a search trial's parameters: a branch suffix (`lr@adamw`) is
    dropped, and `warmup_fraction` / `decay_fraction` of the step budget become `warmup_steps` /
    `decay_steps`."""
    fields = {name.split("@")[0]: value for name, value in params.items() if name != ADAPTATION_STEPS}
    if "warmup_fraction" in fields:
        fields["warmup_steps"] = round(fields.pop("warmup_fraction") * max_steps)
    if "decay_fraction" in fields:
        fields["decay_steps"] = max(1, round(fields.pop("decay_fraction") * max_steps))
    return fields
