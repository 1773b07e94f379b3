"""What a trial must report and keep so that a search survives it: a diverged trial reports every
metric ASHA and Optuna read (issue 15, item 1), a trial gets its own optimizer's default lr (item 3),
and the kept prompt is the best by the search's own metric (item 6)."""
from __future__ import annotations

import json
import math
import sys

import optuna
import pytest
import ray
import torch
from conftest import StubTune, study_trials
from conftest import tiny_search as shared_tiny_search
from ray import tune

from softprompt.models.checkpoint import load_checkpoint, save_checkpoint
from softprompt.search.config import ConfigError
from softprompt.search.record import SearchRecord
from softprompt.search.storage import SearchStorage
from softprompt.search.tuner import resume_search, run_search
from softprompt.trainables.config import ASHA_METRICS, SEARCH_METRICS
from softprompt.trainables.loop import keeps, prepare_data, train

optuna.logging.set_verbosity(optuna.logging.WARNING)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this module by name

DIVERGES = 1.0e39  # as init_scale of random_uniform: overflows float32, so the loss is NaN at step 1


def tiny_search(model_dir, tmp_path, **overrides):
    """The shared test-sized search (conftest), one trial at a time under ASHA, 2-vector prompts, no confirmation."""
    train = {"prompt_length": 2, "confirm_examples": 0, **overrides.pop("train", {})}
    values = {"concurrency": 1, "scheduler": "asha", **overrides, "train": train}
    return shared_tiny_search(model_dir, tmp_path, **values)


def diverging_search(model_dir, tmp_path, asha_metric: str):
    """Two trials, the diverging one first: before the fix its report ended the search right there."""
    return tiny_search(model_dir, tmp_path, name="diverging", asha_metric=asha_metric,
                       space={"init_scale": {"choices": [0.5, DIVERGES]}},
                       points_to_evaluate=[{"init_scale": DIVERGES}, {"init_scale": 0.5}],
                       train={"init": "random_uniform"})


def reports(cfg, trial_id: str) -> list[dict]:
    path = SearchStorage(cfg.storage_path, cfg.name).folder / f"trial_{trial_id}" / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_the_diverged_trial_ended_with_every_worst_value_and_the_search_went_on(cfg):
    rows = {r["params"]["init_scale"]: r for r in SearchRecord.load(cfg.storage_path, cfg.name).trials}
    assert {scale: r["status"] for scale, r in rows.items()} == {DIVERGES: "diverged", 0.5: "completed"}
    last = reports(cfg, rows[DIVERGES]["trial_id"])[-1]
    for name, mode in ASHA_METRICS.items():  # ASHA reads asha_metric, Optuna metric: both finite, both worst
        assert math.isfinite(last[name])
        assert last[name] == 0.0 if mode == "max" else last[name] >= 1e9
    assert last["step"] == cfg.train.max_steps  # ASHA's time_attr
    assert all(cfg.asha_metric in r for r in reports(cfg, rows[0.5]["trial_id"]))
    values = {t.params["init_scale"]: (t.state.name, t.value) for t in study_trials(cfg)}
    assert values[DIVERGES] == ("COMPLETE", 0.0)  # told to Optuna, at the worst best_dev_accuracy
    assert values[0.5][0] == "COMPLETE"


# ---- 1. a diverged trial ----

@pytest.mark.parametrize("metric", list(SEARCH_METRICS))
def test_a_diverged_trials_last_report_holds_every_metric_asha_and_optuna_read_at_its_worst(
        tiny_llama_dir, tmp_path, monkeypatch, metric):
    """The real trainable, without Ray (StubTune), for every search metric: its last report is what ASHA
    (by any asha_metric) and Optuna (by the search metric) read."""
    import softprompt.trainables.trainable as trainable

    base = tiny_search(tiny_llama_dir, tmp_path, metric=metric, train={"init": "random_uniform"}).train.to_dict()
    stub = StubTune(tmp_path / "reports")
    monkeypatch.setattr(trainable, "tune", stub)
    trainable.tune_trial({"init_scale": DIVERGES}, base, metric, SEARCH_METRICS[metric])
    last = stub.reports[-1]
    assert (last["status"], last["step"]) == ("diverged", base["max_steps"])  # step: ASHA's time_attr
    assert set(ASHA_METRICS) <= set(last)
    for name, mode in ASHA_METRICS.items():
        assert math.isfinite(last[name])
        assert last[name] == 0.0 if mode == "max" else last[name] >= 1e9


# A real search per direction of ASHA's metric, neither of them the search's own (best_dev_accuracy):
# before issue 15 the diverged trial's report lacked it, and Ray ended the search right there.
@pytest.mark.parametrize("asha_metric", ["dev_auc", "dev_log_loss"])
def test_a_diverged_trial_reports_every_metric_asha_and_optuna_read_and_the_search_goes_on(
        ray_cluster, tiny_llama_dir, tmp_path, asha_metric):
    cfg = diverging_search(tiny_llama_dir, tmp_path, asha_metric)
    assert cfg.metric == "best_dev_accuracy" and cfg.scheduler == "asha"
    run_search(cfg)
    assert_the_diverged_trial_ended_with_every_worst_value_and_the_search_went_on(cfg)


def reports_only_the_search_metric_on_failure(config, base, metric, mode, gpu_fraction=0.0, tracking=None, **options):
    """The real trainable, but a failed trial's last report carries only the search metric, as softprompt's
    did before issue 15: it leaves a search that Ray ended mid-way, as an older version left it."""
    from softprompt.trainables.trainable import tune_trial

    report = tune.report

    def trimmed(metrics, checkpoint=None):
        if metrics.get("status") == "diverged":
            metrics = {k: v for k, v in metrics.items() if k not in ASHA_METRICS or k == metric}
        report(metrics, checkpoint=checkpoint)

    tune.report = trimmed
    try:
        tune_trial(config, base, metric, mode, gpu_fraction, tracking, **options)
    finally:
        tune.report = report  # workers are reused by later trials


# Tune restores a search only with a trainable of the name it started with, as the older version's was.
reports_only_the_search_metric_on_failure.__name__ = "tune_trial"


def test_a_search_that_a_diverged_trial_ended_resumes_to_its_end(ray_cluster, tiny_llama_dir, tmp_path):
    cfg = diverging_search(tiny_llama_dir, tmp_path, "train_loss")
    with pytest.raises(Exception, match="did not include the specified metric"):
        run_search(cfg, trainable=reports_only_the_search_metric_on_failure)
    resume_search(cfg.storage_path, cfg.name)
    assert_the_diverged_trial_ended_with_every_worst_value_and_the_search_went_on(cfg)


# ---- 3 and 6: a trial's lr, and the prompt it keeps ----

@pytest.mark.parametrize("metric", ["dev_f1", "best_dev_f1"])
def test_a_trial_runs_at_its_optimizers_default_lr_and_keeps_the_prompt_with_the_best_dev_f1(
        ray_cluster, tiny_llama_dir, tmp_path, metric):
    cfg = tiny_search(tiny_llama_dir, tmp_path, name="adamw-f1", trials=1, scheduler="none", metric=metric,
                      space={"optimizer": {"choices": ["adamw"]}}, train={"eval_every": 2})
    assert (cfg.train.optimizer, cfg.train.select_metric) == ("adafactor", "f1")
    run_search(cfg)
    (row,) = SearchRecord.load(cfg.storage_path, cfg.name).trials
    assert row["params"] == {"optimizer": "adamw"} and row["status"] == "completed"
    current = load_checkpoint(row["prompt"].removesuffix("best") + "current")
    assert current.meta["config"]["optimizer"] == "adamw"
    assert [g["lr"] for g in current.optimizer_state["param_groups"]] == [0.03]  # not Adafactor's 0.3

    steps = reports(cfg, row["trial_id"])
    last = steps[-1]
    kept = next(r for r in steps if r["step"] == last["best_step"])
    assert last["best_dev_f1"] == max(r["dev_f1"] for r in steps) == kept["dev_f1"]
    assert last["best_dev_accuracy"] == kept["dev_accuracy"]  # the kept prompt's, not the highest seen
    best = load_checkpoint(row["prompt"])
    assert best.meta["step"] == last["best_step"]
    kept_metrics = best.meta["metrics"]
    assert (kept_metrics["dev_f1"], kept_metrics["dev_accuracy"]) == (kept["dev_f1"], kept["dev_accuracy"])
    assert row["metric"] == last[metric]  # best_dev_f1 ranks trials by their kept prompt's F1


def kept_step(evaluations: list[tuple[int, dict]], select_metric: str) -> int:
    best_step, best_dev = 0, None
    for step, dev in evaluations:
        if keeps(dev, best_dev, select_metric):
            best_step, best_dev = step, dev
    return best_step


def test_the_kept_prompt_is_the_first_with_the_highest_select_metric():
    evaluations = [(2, {"accuracy": 0.6, "f1": 0.5}), (4, {"accuracy": 0.7, "f1": 0.4}),
                   (6, {"accuracy": 0.65, "f1": 0.8}), (8, {"accuracy": 0.7, "f1": 0.8})]
    assert kept_step(evaluations, "accuracy") == 4
    assert kept_step(evaluations, "f1") == 6


def test_a_run_keeps_the_prompt_of_the_step_its_select_metric_picks(tiny_llama, tmp_path):
    """A real run whose dev accuracy and dev f1 peak at different steps (16 dev examples, seed 2)."""
    from softprompt.trainables.config import TrainConfig

    cfg = TrainConfig(model="tiny", task="rotten_tomatoes", batch_size=4, max_steps=8, eval_every=1,
                      max_eval_examples=16, max_train_examples=64, prompt_length=2, init="random_uniform",
                      optimizer="adamw", lr=0.1, seed=2)
    data = prepare_data(cfg, tiny_llama)
    runs = {}
    for select in ("accuracy", "f1"):
        seen = []
        result = train(cfg.replace(select_metric=select), tiny_llama, data,
                       report=lambda m, _, seen=seen: seen.append(m))
        first_best = max(seen, key=lambda m: m[f"dev_{select}"])  # max() returns the first of equals
        assert result["best_step"] == first_best["step"]
        assert result[f"best_dev_{select}"] == first_best[f"dev_{select}"]
        runs[select] = result
    assert runs["accuracy"]["best_step"] != runs["f1"]["best_step"]  # the two metrics disagree in this run
    assert runs["f1"]["best_dev_f1"] > runs["accuracy"]["best_dev_f1"]
    assert not torch.equal(runs["accuracy"]["prompt"], runs["f1"]["prompt"])


def test_a_run_checkpointed_before_select_metric_existed_resumes_to_the_same_result(tiny_llama, tmp_path):
    """Such a checkpoint's best prompt records its dev accuracy only; here that prompt (step 2) stays the best."""
    from softprompt.trainables.config import TrainConfig

    cfg = TrainConfig(model="tiny", task="rotten_tomatoes", batch_size=4, max_steps=4, eval_every=2,
                      max_eval_examples=16, max_train_examples=64, prompt_length=2, optimizer="adamw", seed=1)
    data = prepare_data(cfg, tiny_llama)
    straight = train(cfg, tiny_llama, data, report=lambda m, save: save(tmp_path / str(m["step"])))
    assert straight["best_step"] == 2
    best = load_checkpoint(tmp_path / "2" / "best")
    old_meta = {k: v for k, v in best.meta.items() if k not in ("format", "length", "width", "prompt_sha256")}
    accuracy_only = {"dev_accuracy": best.meta["metrics"]["dev_accuracy"]}
    save_checkpoint(tmp_path / "2" / "best", best.prompt, {**old_meta, "metrics": accuracy_only})
    resumed = train(cfg, tiny_llama, data, resume_from=tmp_path / "2")
    assert torch.equal(resumed.pop("prompt"), straight.pop("prompt"))
    assert "best_dev_f1" not in resumed  # never measured for that prompt
    assert resumed == {k: v for k, v in straight.items() if k != "best_dev_f1"}


def test_a_trial_checkpointed_when_adafactor_was_transformers_resumes_with_that_optimizer(tiny_llama, tmp_path):
    """A search started before `adafactor` meant T5X's: its trials' saved config says adafactor, their
    optimizer state is transformers' Adafactor's, and resuming must continue that run, not fail."""
    from softprompt.trainables.config import TrainConfig

    old = TrainConfig(model="tiny", task="rotten_tomatoes", batch_size=4, max_steps=4, eval_every=2,
                      max_eval_examples=16, max_train_examples=64, prompt_length=2, optimizer="adafactor_hf", seed=1)
    data = prepare_data(old, tiny_llama)
    straight = train(old, tiny_llama, data, report=lambda m, save: save(tmp_path / str(m["step"])))
    resumed = train(old.replace(optimizer="adafactor"), tiny_llama, data, resume_from=tmp_path / "2")
    assert torch.equal(resumed.pop("prompt"), straight.pop("prompt"))
    assert resumed == straight


# ---- the search config sets what the trial keeps ----

@pytest.mark.parametrize("metric", list(SEARCH_METRICS))
def test_the_search_metric_sets_the_dev_metric_that_keeps_each_trials_prompt(tiny_llama_dir, tmp_path, metric):
    cfg = tiny_search(tiny_llama_dir, tmp_path, metric=metric)
    assert cfg.train.select_metric == {"dev_f1": "f1", "best_dev_f1": "f1"}.get(metric, "accuracy")


def test_a_train_loss_search_keeps_prompts_by_the_dev_metric_the_user_chose(tiny_llama_dir, tmp_path):
    cfg = tiny_search(tiny_llama_dir, tmp_path, metric="train_loss", train={"select_metric": "f1"})
    assert cfg.train.select_metric == "f1"


def test_a_select_metric_that_contradicts_the_search_metric_is_refused(tiny_llama_dir, tmp_path):
    with pytest.raises(ConfigError) as error:
        tiny_search(tiny_llama_dir, tmp_path, metric="dev_f1", train={"select_metric": "accuracy"})
    assert str(error.value).splitlines()[0].startswith("train.select_metric = 'accuracy' is not allowed: f1")


# ---- a retried trial whose checkpoint is incomplete starts over instead of failing ----

DAMAGED_SEARCH = None  # the search folder the damaging trainable works in (pickled with it by value)


def tune_trial(config, base, metric, mode, gpu_fraction=0.0, tracking=None, **options):
    """The real trainable; but its first attempt, once its first checkpoint is stored, deletes that
    checkpoint's current/prompt.json and fails, as a driver killed while Ray prunes or uploads
    checkpoints leaves one (Ray then retries the trial from it)."""
    import softprompt.trainables.trainable as trainable

    report = tune.report

    def report_then_damage(metrics, checkpoint=None):
        report(metrics, checkpoint=checkpoint)
        trial_dir = DAMAGED_SEARCH / f"trial_{tune.get_context().get_trial_id()}"
        (next(trial_dir.glob("checkpoint_*")) / "current" / "prompt.json").unlink()
        raise RuntimeError("injected: the trial fails after its first checkpoint")

    if tune.get_checkpoint() is None:
        tune.report = report_then_damage
    try:
        trainable.tune_trial(config, base, metric, mode, gpu_fraction, tracking, **options)
    finally:
        tune.report = report  # workers are reused by later trials


def test_a_retried_trial_whose_checkpoint_is_incomplete_starts_over_and_completes(ray_cluster, tiny_llama_dir,
                                                                                   tmp_path):
    global DAMAGED_SEARCH
    cfg = tiny_search(tiny_llama_dir, tmp_path, name="damaged", trials=1, scheduler="none", max_failures=1,
                      train={"eval_every": 2})
    DAMAGED_SEARCH = SearchStorage(cfg.storage_path, cfg.name).folder
    run_search(cfg, trainable=tune_trial)
    (row,) = SearchRecord.load(cfg.storage_path, cfg.name).trials
    assert row["status"] == "completed"
    steps = reports(cfg, row["trial_id"])
    assert [r["step"] for r in steps] == [2, 2, 4]  # the failed attempt's step 2, then a whole run
    assert steps[-1]["resumed_from_step"] == 0 and "current/prompt.json: missing" in steps[-1]["resume_error"]


# ---- a trial resumed in another dtype says so ----

def test_a_trial_resumed_in_another_dtype_records_both_and_says_so(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    import softprompt.trainables.trainable as trainable

    base = tiny_search(tiny_llama_dir, tmp_path, max_steps=4, scheduler="none", train={"eval_every": 2}).train.to_dict()
    first = StubTune(tmp_path / "first")
    monkeypatch.setattr(trainable, "tune", first)
    trainable.tune_trial({"dtype": "bfloat16"}, base, "best_dev_accuracy", "max")
    assert load_checkpoint(tmp_path / "first" / "checkpoint_0" / "current").meta["dtype"] == "bfloat16"

    again = StubTune(tmp_path / "again", resume_from=tmp_path / "first" / "checkpoint_0")
    monkeypatch.setattr(trainable, "tune", again)
    trainable.tune_trial({"dtype": "float32"}, base, "best_dev_accuracy", "max")
    assert [r["step"] for r in again.reports] == [4]
    assert again.reports[-1]["resumed_dtype_changed"] == "bfloat16 -> float32"
    assert "trial resumed from step 2 with its dtype changed (bfloat16 -> float32)" in capsys.readouterr().err
    assert "resumed_dtype_changed" not in first.reports[-1]


# ---- a trial resumed from its final checkpoint reports it again ----

def test_a_trial_resumed_from_its_final_checkpoint_reports_its_final_result_again_and_trains_nothing(
        tiny_llama_dir, tmp_path, monkeypatch):
    """What a search's resume meets when its driver was killed after a trial's final report but before Tune
    saved its state with it: Tune restarts the trial from that final checkpoint. It must report again, or
    Tune keeps the report before (the trial read "stopped early", its checkpoint one rung old)."""
    import softprompt.trainables.trainable as trainable

    base = tiny_search(tiny_llama_dir, tmp_path, max_steps=4, scheduler="none", train={"eval_every": 2}).train.to_dict()
    first = StubTune(tmp_path / "first")
    monkeypatch.setattr(trainable, "tune", first)
    trainable.tune_trial({}, base, "best_dev_accuracy", "max")
    assert [(r["step"], r["status"]) for r in first.reports] == [(2, "running"), (4, "completed")]

    again = StubTune(tmp_path / "again", resume_from=tmp_path / "first" / "checkpoint_1")
    monkeypatch.setattr(trainable, "tune", again)
    trainable.tune_trial({}, base, "best_dev_accuracy", "max")
    (report,) = again.reports
    assert report["status"] == "completed" and report["resumed_from_step"] == 4
    setup = {"backbone_reused", "backbone_load_s", "setup_s", "resumed_from_step"}
    assert {k: v for k, v in report.items() if k not in setup} == \
        {k: v for k, v in first.reports[-1].items() if k not in setup}  # the saved report, timings included
    for part in ("current", "best"):  # and its checkpoint is the final one
        resumed = load_checkpoint(tmp_path / "again" / "checkpoint_0" / part)
        final = load_checkpoint(tmp_path / "first" / "checkpoint_1" / part)
        assert resumed.meta["step"] == final.meta["step"] and torch.equal(resumed.prompt, final.prompt)
