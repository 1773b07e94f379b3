"""The one configuration object of a prompt-tuning run. Validated at the edge (search.config);
code in trainables/ trusts it."""
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
    # backbone
    model: str = "smollm2-135m"       # offline alias, hub id, or local folder
    dtype: str = "auto"               # auto: bfloat16 on a GPU and on a CPU that multiplies it natively (AVX512-BF16,
                                      # AMX), else float32 (backbone.resolve_dtype)
    compile: bool = False             # torch.compile the model's passes, once per worker process: measured here
                                      # in bfloat16 1.2x per step for about 3 min of compiling, so worth it from
                                      # ~3,000 steps per worker (bench/results/core.md)
    # task
    task: str | dict = "rotten_tomatoes"  # registered name, a .csv/.jsonl/.parquet file, or a mapping
                                      # (trainables.tasks.TASK_KEYS: dataset, splits, template, ...)
    text_column: str = "text"         # file tasks only
    label_column: str = "label"       # file tasks only
    verbalizers: dict | None = None   # file tasks: label value -> verbalizer string
    max_length: int = 256             # input tokens kept per example
    max_train_examples: int | None = None
    max_eval_examples: int | None = 400  # dev examples per evaluation (many evaluations per trial)
    max_test_examples: int | None = None  # None: the whole test split, once per trial, so its score can
                                      # be compared with published ones; set it to cap the test split
    confirm_examples: int = 0         # after the last step, the best prompt is also scored on this many
                                      # further dev examples (past max_eval_examples): a search picks its
                                      # winner by that score, not by the maximum of many small-sample ones
    # soft prompt
    prompt_length: int = 20
    init: str = "class_label"
    init_scale: float = 0.5           # random_uniform draws from [-scale, scale]; random_uniform_relative from
                                      # [-scale, scale] times the RMS of the model's common-token embeddings
    init_text: str | None = None      # text init only
    # optimisation (the paper: Adafactor, lr 0.3, weight decay 1e-5, batch 32)
    optimizer: str = "adafactor"
    lr: float | None = None           # None: the optimizer's own default (optimizers.DEFAULT_LR: adafactor 0.3,
                                      # adamw 0.03), so a trial whose space picks the optimizer but not the lr
                                      # gets its optimizer's; a search's train.lr, if set, is every such trial's
    lr_unit: str = "absolute"         # absolute, or embedding_rms: lr times the RMS of the common tokens' embeddings
                                      # as the model receives them (optimizers.absolute_lr). The best lr moved no
                                      # less between backbones in that unit (bench/results/units.md)
    weight_decay: float = 1e-5
    parameter_scaling: bool = False   # adafactor (and adafactor_hf) only: each step is lr times the prompt's RMS
                                      # (T5X's multiply_by_parameter_scale); the paper's runs: off, Table 6 searched it
    warmup_steps: int = 0
    decay_factor: float | None = None  # lr is multiplied by decay_factor every decay_steps steps (the paper's
                                       # Table 6); without decay_steps it decays smoothly, reaching lr * decay_factor
                                       # at max_steps
    decay_steps: int | None = None    # Table 6's "steps per decay"; no effect without decay_factor
    dropout: float = 0.0              # dropout on the embedded input, prompt included, in training only. The paper's
                                      # T5 fine-tuning used 0.1 in every layer of the model; here the model is frozen
                                      # in eval mode, so only the input part can be reproduced, and the default
                                      # backbone (SmolLM2, a Llama) was pretrained without dropout: 0 until measured
    sentinel: bool = False            # encoder-decoders: every target starts with T5's sentinel <extra_id_0>, the
                                      # paper's "span corruption + sentinel" (section 3.2): a span-corruption
                                      # checkpoint then sees targets shaped like its pre-training ones
    batch_size: int = 8
    max_steps: int = 200
    eval_every: int = 50
    eval_steps: tuple | None = None   # evaluate at exactly these steps (and max_steps) instead; a search
                                      # with ASHA sets its rungs, so every evaluation is one ASHA uses
    eval_mode: str = "rank"           # rank | exact_match
    eval_batch_size: int = 32
    select_metric: str = "accuracy"   # the dev metric that picks the kept (best) prompt: accuracy | f1; a
                                      # search sets it from its metric (dev_f1: f1)
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
