"""The prompt-tuning loop: one function, read top to bottom.

build batch -> forward -> loss -> backward -> step -> (at each eval step) evaluate on dev, keep the best
prompt, report and offer a checkpoint. At the end the best prompt (early stopping on dev, as in the paper)
is evaluated on the held-out test split.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from softprompt.models.backbone import Backbone, compiled_graphs
from softprompt.models.checkpoint import load_checkpoint, save_checkpoint
from softprompt.models.data import EncodedTask, TrainOrder, encode_task, train_batch
from softprompt.models.evaluate import evaluate
from softprompt.models.precision import dtype_name
from softprompt.models.prompt import InputDropout, PromptedModel, SoftPrompt
from softprompt.models.tasks import load_task
from softprompt.trainables.config import SELECT_METRICS, TrainConfig
from softprompt.trainables.inits import INITS, InitContext, embedding_rms
from softprompt.trainables.optimizers import absolute_lr, build_optimizer

# report(metrics, save): called after every evaluation; save(folder) writes a resumable checkpoint.
Reporter = Callable[[dict, Callable[[Path], None]], None]


class Diverged(RuntimeError):
    """The loss became NaN or infinite (e.g. AdamW at Adafactor's lr 0.3)."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"loss became {loss} at step {step}: the run diverged")
        self.step = step


@dataclass(frozen=True)
class DataSpec:
    """The TrainConfig fields a tokenised task depends on, the only ones prepare_data reads: a worker's
    cache keyed by them (trainable.py) cannot serve data made from other inputs."""
    task: str | dict
    text_column: str
    label_column: str
    verbalizers: dict | None
    max_length: int
    max_train_examples: int | None
    max_eval_examples: int | None
    confirm_examples: int
    max_test_examples: int | None
    sentinel: bool

    @classmethod
    def of(cls, cfg: TrainConfig) -> DataSpec:
        return cls(**{field.name: getattr(cfg, field.name) for field in dataclasses.fields(cls)})

    def __hash__(self) -> int:  # a task mapping and verbalizers are dicts: hashed as canonical JSON
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str))


def prepare_data(cfg: TrainConfig, backbone: Backbone) -> EncodedTask:
    spec = DataSpec.of(cfg)
    task = load_task(spec.task, spec.text_column, spec.label_column, spec.verbalizers)
    return encode_task(task, backbone.tokenizer, backbone.is_encoder_decoder, backbone.vocab_is_frequency_ordered,
                       spec.max_length, spec.max_train_examples, spec.max_eval_examples, spec.confirm_examples,
                       spec.max_test_examples, spec.sentinel)


def initial_prompt(cfg: TrainConfig, backbone: Backbone, data: EncodedTask) -> torch.Tensor:
    text_ids = backbone.tokenizer(cfg.init_text or "", add_special_tokens=False)["input_ids"]
    ctx = InitContext(
        embed=backbone.embed, width=backbone.width,  # embed: the embedding module's output, which a prompt sits beside
        common_token_ids=data.common_token_ids,
        class_token_ids=[ids[int(data.sentinel):-1] if data.is_encoder_decoder else ids  # no sentinel, no EOS
                         for ids in data.target_ids],
        text_token_ids=text_ids, scale=cfg.init_scale,
        generator=torch.Generator().manual_seed(cfg.seed))
    return INITS[cfg.init](cfg.prompt_length, ctx)


def checkpoint_meta(cfg: TrainConfig, backbone: Backbone, data: EncodedTask, step: int, metrics: dict) -> dict:
    """What a prompt belongs to; the template, verbalizers and label values travel with it to every
    export, so a served prompt formats raw input as it was trained and answers in the task's labels.
    `dtype`: what the backbone computed in (`auto` resolves per node)."""
    return {"backbone": cfg.model, "fingerprint": backbone.fingerprint, "dtype": dtype_name(backbone.dtype),
            "init": cfg.init, "task": data.name, "template": data.template, "verbalizers": data.verbalizers,
            "labels": data.labels or data.verbalizers, "sentinel": data.sentinel, "step": step, "metrics": metrics,
            "config": cfg.to_dict()}


def train(cfg: TrainConfig, backbone: Backbone, data: EncodedTask | None = None, report: Reporter | None = None,
          resume_from: Path | None = None, progress: bool = False, score_test: bool = True,
          score_after_report: bool = False) -> dict:
    """Tune a soft prompt on `cfg.task`; return the best dev metrics and (`score_test`) their test metrics.
    A search's trials leave test to the driver, which scores its winner alone. With `score_after_report`
    (a search whose scheduler compares training losses), an evaluation before the last reports first and
    scores dev only once `report` returns: Tune returns only to a trial its scheduler keeps, so a trial
    stopped there never pays for scoring a prompt it will not keep. (A trial resumed from such a report's
    checkpoint keeps its prompt from its later evaluations.)"""
    data = data or prepare_data(cfg, backbone)
    device = backbone.device
    if cfg.compile and isinstance(backbone, Backbone):
        backbone.compile()
    prompt = SoftPrompt(initial_prompt(cfg, backbone, data)).to(device)
    current = (load_checkpoint(Path(resume_from) / "current", backbone.fingerprint, backbone.width) if resume_from
               else None)
    optimizer_name = resumed_optimizer(cfg.optimizer, current.optimizer_state) if current else cfg.optimizer
    lr = absolute_lr(optimizer_name, cfg.lr, cfg.lr_unit, embedding_rms(backbone.embed, data.common_token_ids))
    optimizer, schedule = build_optimizer(optimizer_name, prompt.weight, lr, cfg.weight_decay,
                                          cfg.warmup_steps, cfg.decay_factor, cfg.max_steps, cfg.decay_steps,
                                          cfg.parameter_scaling)
    start, best = 0, {"dev": None, "step": 0, "prompt": prompt.weight.detach().clone()}
    if current is not None:
        best_saved = load_checkpoint(Path(resume_from) / "best", backbone.fingerprint, backbone.width)
        with torch.no_grad():
            prompt.weight.copy_(current.prompt)
        optimizer.load_state_dict(current.optimizer_state)
        schedule.load_state_dict(current.meta["scheduler"])
        start = current.meta["step"]
        # the kept prompt's dev metrics (dev_accuracy only, in checkpoints made before select_metric)
        best = {"dev": {k.removeprefix("dev_"): v for k, v in best_saved.meta["metrics"].items()} or None,
                "step": best_saved.meta["step"], "prompt": best_saved.prompt.to(device)}
    pm = backbone.prompted_model(prompt)  # here, or through a shared backbone's server
    order = TrainOrder([len(x) for x in data.splits["train"].input_ids], cfg.batch_size, cfg.seed)

    losses, examples, train_seconds = [], 0, 0.0
    seconds = dict.fromkeys(("train_s", "rung_eval_s", "confirm_s", "test_s"), 0.0)  # since this process started

    def score_dev(best: dict, step: int) -> tuple[dict, dict]:
        """The current prompt on dev, and what is kept after it."""
        started = time.perf_counter()
        dev = evaluate(pm, data, "dev", cfg.eval_mode, cfg.eval_batch_size)
        seconds["rung_eval_s"] += time.perf_counter() - started
        kept = {"dev": dev, "step": step, "prompt": prompt.weight.detach().clone()}
        return dev, kept if keeps(dev, best["dev"], cfg.select_metric) else best

    bar = tqdm(range(start, cfg.max_steps), desc=f"prompt-tuning {data.name}", disable=not progress,
               initial=start, total=cfg.max_steps, unit="step")
    for step in bar:
        started = time.perf_counter()
        batch = train_batch(data, order, step).to(device)
        loss = pm.loss_backward(batch, InputDropout.for_step(cfg.dropout, cfg.seed, step))
        if not math.isfinite(loss):
            raise Diverged(step + 1, loss)  # counted from 1, as reports count steps
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - started
        seconds["train_s"] += time.perf_counter() - started
        losses.append(loss)
        examples += len(batch.classes)
        bar.set_postfix(loss=f"{loss:.3f}")

        done = step + 1
        if not is_eval_step(cfg, done):
            continue
        deferred = score_after_report and done < cfg.max_steps
        if not deferred:
            dev, best = score_dev(best, done)
        metrics = {"step": done, "train_loss": sum(losses) / len(losses),
                   **({} if deferred else {f"dev_{k}": v for k, v in dev.items()}), **best_metrics(best),
                   "best_step": best["step"], "lr_absolute": lr, "examples_per_s": examples / train_seconds,
                   **({"compiled_graphs": compiled_graphs()} if cfg.compile else {})}  # in this worker, so far
        losses, examples, train_seconds = [], 0, 0.0
        if done == cfg.max_steps:  # the last report carries the kept prompt's confirmation and test scores
            metrics.update(final_metrics(pm, best["prompt"], data, cfg, score_test, seconds))
        metrics.update(seconds)
        if progress:
            bar.write(f"step {done}: train_loss {metrics['train_loss']:.4f}  dev_{cfg.select_metric} "
                      f"{dev[cfg.select_metric]:.4f}  best {best['dev'][cfg.select_metric]:.4f} @ {best['step']}")
        if report is not None:
            def save(folder: Path, step=done, metrics=metrics, best=best):  # this report's values, bound now
                save_checkpoint(Path(folder) / "current", prompt.weight,
                                {**checkpoint_meta(cfg, backbone, data, step, metrics),
                                 "scheduler": schedule.state_dict()}, optimizer.state_dict())
                save_checkpoint(Path(folder) / "best", best["prompt"],
                                checkpoint_meta(cfg, backbone, data, best["step"],
                                                {f"dev_{k}": v for k, v in (best["dev"] or {}).items()}))
            report(metrics, save)
        if deferred:
            dev, best = score_dev(best, done)

    if start >= cfg.max_steps:  # resumed from the final checkpoint: nothing left but the result
        metrics = final_metrics(pm, best["prompt"], data, cfg, score_test, seconds)
    return {"best_step": best["step"], **best_metrics(best),
            **{k: v for k, v in metrics.items() if k.startswith(("test_", "confirmed_")) and k != "test_s"},
            "prompt": best["prompt"].detach().cpu()}


def resumed_optimizer(name: str, state: dict) -> str:
    """The optimizer that wrote `state`: `adafactor` named transformers' Adafactor (now
    `adafactor_hf`) before it meant T5X's, and a trial of a search started then resumes with it."""
    hf_keys = {"exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col"}
    if name == "adafactor" and any(hf_keys & s.keys() for s in state["state"].values()):
        return "adafactor_hf"
    return name


def keeps(dev: dict, best_dev: dict | None, select_metric: str) -> bool:
    """Whether an evaluation's prompt replaces the kept one: a higher dev `select_metric` (on a tie
    the earlier prompt stays; the first evaluation is always kept)."""
    return best_dev is None or dev[select_metric] > best_dev[select_metric]


def best_metrics(best: dict) -> dict:
    """The kept prompt's dev accuracy and f1, as `best_dev_*`: each is the highest so far only when it
    is the select_metric. (Checkpoints made before select_metric kept dev accuracy only.) Before any
    evaluation, 0: Tune needs the search metric in every report, and `best_step` 0 says none was scored."""
    if best["dev"] is None:
        return {f"best_dev_{k}": 0.0 for k in SELECT_METRICS}
    return {f"best_dev_{k}": best["dev"][k] for k in SELECT_METRICS if k in best["dev"]}


def is_eval_step(cfg: TrainConfig, step: int) -> bool:
    """Evaluate (and report, and checkpoint) at `eval_steps`, else every `eval_every` steps; always at the end."""
    if step == cfg.max_steps:
        return True
    return step in cfg.eval_steps if cfg.eval_steps else step % cfg.eval_every == 0


def final_metrics(pm: PromptedModel, values: torch.Tensor, data: EncodedTask, cfg: TrainConfig,
                  score_test: bool = True, seconds: dict | None = None) -> dict:
    """The best prompt `values` on the test split if `score_test` (`test_*`, with `test_examples`: how
    many were scored) and, if the task has a confirm split, on it (`confirmed_dev_*`); the current
    prompt is put back after. `seconds` gets the time each split took added (confirm_s, test_s)."""
    current = pm.prompt.weight.detach().clone()
    confirm = data.splits.get("confirm")
    splits = {**({"test": ("test_", "test_s")} if score_test else {}),
              **({"confirm": ("confirmed_dev_", "confirm_s")} if confirm else {})}
    metrics, seconds = {}, {} if seconds is None else seconds
    with torch.no_grad():
        pm.prompt.weight.copy_(values)
        for split, (prefix, timer) in splits.items():
            metrics[f"{prefix}examples"] = len(data.splits[split])
            started = time.perf_counter()
            scores = evaluate(pm, data, split, cfg.eval_mode, cfg.eval_batch_size)
            metrics.update({prefix + k: v for k, v in scores.items()})
            seconds[timer] = seconds.get(timer, 0.0) + time.perf_counter() - started
        pm.prompt.weight.copy_(current)
    return metrics


def zero_shot(cfg: TrainConfig, backbone: Backbone, data: EncodedTask, split: str = "test") -> dict:
    """The frozen model with no prompt at all: the baseline prompt tuning must beat."""
    empty = SoftPrompt(torch.zeros(0, backbone.width)).to(backbone.device)
    return evaluate(PromptedModel(backbone, empty), data, split, cfg.eval_mode, cfg.eval_batch_size)


def train_and_save(cfg: TrainConfig, backbone: Backbone, data: EncodedTask) -> tuple[dict, dict]:
    """A run outside a search (`softprompt train`): the zero-shot baseline, training with a progress
    bar, then the best prompt (OUT/best) and the summary (OUT/result.json) in cfg.output_dir.
    Returns the summary and the baseline's metrics."""
    baseline = zero_shot(cfg, backbone, data)
    result = train(cfg, backbone, data, progress=True)
    out = Path(cfg.output_dir)
    save_checkpoint(out / "best", result.pop("prompt"),
                    checkpoint_meta(cfg, backbone, data, result["best_step"], result))
    summary = {"zero_shot_test_accuracy": baseline["accuracy"], **result}
    (out / "result.json").write_text(json.dumps(summary, indent=2))
    return summary, baseline
