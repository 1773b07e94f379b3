"""The search: Optuna spaces, the Tuner with ASHA, divergence, fractional GPUs, bad configs (Ctrl-C and resume:
tests/test_driver_faults.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import ray
import torch
import yaml
from conftest import StubTune, study_trials
from conftest import tiny_search as shared_tiny_search
from ray import tune

from softprompt.search.config import ConfigError, asha_rungs, load_search_config, search_config
from softprompt.search.record import SearchRecord
from softprompt.search.storage import SearchStorage
from softprompt.search.tuner import run_search
from softprompt.spaces import DEFAULT_POINTS, CustomSpace, paper, quick

optuna.logging.set_verbosity(optuna.logging.WARNING)
# Ray workers cannot import this test module by name: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def tiny_search(tiny_llama_dir, tmp_path, **overrides):
    """The shared test-sized search (conftest): six trials of 8 steps under ASHA (rungs 2, 4, 8) by training loss."""
    values = {"trials": 6, "max_steps": 8, "scheduler": "asha", "grace_period": 2, "reduction_factor": 2,
              "metric": "train_loss", **overrides}
    return shared_tiny_search(tiny_llama_dir, tmp_path, **values)


# ---- spaces: pure functions of an Optuna trial ----

@pytest.mark.parametrize("space", [quick, paper])
def test_learning_rate_range_exists_only_for_the_chosen_optimizer(space):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    optimizers = set()
    for _ in range(40):
        trial = study.ask()
        space(trial, ["smollm2-135m"])
        optimizer = trial.params["optimizer"]
        optimizers.add(optimizer)
        other = "adamw" if optimizer == "adafactor" else "adafactor"
        assert f"lr@{optimizer}" in trial.params and f"lr@{other}" not in trial.params
        assert "model" not in trial.params  # one checkpoint: nothing to choose
        study.tell(trial, 0.5)
    assert optimizers == {"adafactor", "adamw"}


def test_paper_space_uses_the_papers_ablation_values_and_chooses_among_checkpoints():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = {"prompt_length": set(), "init": set(), "model": set()}
    for _ in range(60):
        trial = study.ask()
        paper(trial, ["google/t5-base-lm-adapt", "google/t5-v1_1-base"])
        for key in seen:
            seen[key].add(trial.params[key])
        lr = trial.params.get("lr@adafactor", trial.params.get("lr@adamw"))
        assert (1e-3 <= lr <= 0.5) if trial.params["optimizer"] == "adafactor" else (1e-5 <= lr <= 1e-1)
        study.tell(trial, 0.5)
    assert seen["prompt_length"] <= {1, 5, 20, 100, 150} and len(seen["prompt_length"]) >= 4
    assert seen["init"] == {"random_uniform", "sampled_vocab", "class_label"}
    assert seen["model"] == {"google/t5-base-lm-adapt", "google/t5-v1_1-base"}


def test_custom_space_suggests_a_conditional_parameter_only_when_its_condition_holds():
    space = CustomSpace({"optimizer": {"choices": ["adafactor", "adamw"]},
                         "lr@adamw": {"low": 1e-4, "high": 0.1, "log": True, "when": {"optimizer": "adamw"}},
                         "prompt_length": {"low": 1, "high": 50, "int": True}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        space(trial, [])
        assert ("lr@adamw" in trial.params) == (trial.params["optimizer"] == "adamw")
        assert isinstance(trial.params["prompt_length"], int) and 1 <= trial.params["prompt_length"] <= 50
        study.tell(trial, 0.0)


@pytest.mark.parametrize("grace, factor, max_t", [(5, 3, 45), (10, 3, 90), (2, 2, 8), (5, 4, 80), (3, 3, 10),
                                                  (10, 3, 10)])
def test_asha_rungs_are_the_milestones_ray_compares_at(grace, factor, max_t):
    from ray.tune.schedulers.async_hyperband import _Bracket

    milestones = {m for m, _ in _Bracket(min_t=grace, max_t=max_t, reduction_factor=factor, s=0)._rungs}
    assert asha_rungs(grace, factor, max_t) == sorted(milestones - {max_t}) + [max_t]


@pytest.mark.parametrize("fields, eval_steps", [
    ({"max_steps": 45, "grace_period": 5}, (5, 15, 45)),
    ({"max_steps": 100}, (12, 36, 100)),  # the default grace period: three rungs
    ({"max_steps": 45, "grace_period": 5, "train": {"eval_every": 10}}, (5, 10, 15, 20, 30, 40, 45)),
    ({"max_steps": 45, "grace_period": 5, "train": {"eval_steps": [9]}}, (9,)),  # as given
    ({"max_steps": 45, "scheduler": "none"}, None)])
def test_an_asha_search_evaluates_at_its_rungs(fields, eval_steps):
    values = {"train": {"task": "rotten_tomatoes"}, **fields}
    assert search_config(values).train.eval_steps == eval_steps


def test_set_overrides_a_trial_field_with_a_train_prefix(tmp_path):
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({"max_steps": 45, "train": {"task": "rotten_tomatoes", "batch_size": 8}}))
    cfg = load_search_config(path, ["train.batch_size=16", "train.eval_steps=[5, 15]", "trials=3"])
    assert (cfg.train.batch_size, cfg.train.eval_steps, cfg.trials, cfg.train.task) == (16, (5, 15), 3,
                                                                                        "rotten_tomatoes")
    with pytest.raises(ConfigError, match="train.eval_steps"):
        load_search_config(path, ["train.eval_steps=[0]"])


def test_a_trial_evaluates_at_its_eval_steps_and_at_the_end(tiny_llama):
    from softprompt.trainables.config import TrainConfig
    from softprompt.trainables.loop import train

    steps = []
    cfg = TrainConfig(model=tiny_llama.name, batch_size=2, max_steps=7, eval_steps=(2, 3), eval_every=1,
                      max_train_examples=32, max_eval_examples=4)
    train(cfg, tiny_llama, report=lambda metrics, save: steps.append((metrics["step"], "test_accuracy" in metrics)))
    assert steps == [(2, False), (3, False), (7, True)]


def test_a_trial_under_a_training_loss_scheduler_scores_dev_only_once_it_is_kept_going(tiny_llama):
    """With score_after_report, a rung's report comes before its dev scoring (Tune returns from report only
    to a trial its scheduler keeps); the prompt kept and the final result are those of scoring first."""
    from softprompt.trainables.config import TrainConfig
    from softprompt.trainables.loop import train

    cfg = TrainConfig(model=tiny_llama.name, batch_size=2, max_steps=6, eval_steps=(2, 4), max_train_examples=32,
                      max_eval_examples=8, lr=0.3, optimizer="adamw")
    runs = {}
    for later in (False, True):
        reports = []
        result = train(cfg, tiny_llama, report=lambda metrics, _, reports=reports: reports.append(dict(metrics)),
                       score_after_report=later)
        runs[later] = (reports, result)
    (first, second, last), result = runs[True]
    assert first["best_step"] == 0 and first["best_dev_accuracy"] == 0.0 and first["rung_eval_s"] == 0.0
    assert "dev_accuracy" not in first and "dev_accuracy" not in second
    assert second["rung_eval_s"] > 0  # step 2's prompt, scored after its report
    eager, _ = runs[False]
    assert (second["best_step"], second["best_dev_accuracy"]) == (eager[0]["best_step"], eager[0]["best_dev_accuracy"])
    assert (last["best_dev_accuracy"], last["dev_accuracy"]) == (eager[-1]["best_dev_accuracy"],
                                                                 eager[-1]["dev_accuracy"])
    torch.testing.assert_close(result["prompt"], runs[False][1]["prompt"])


def test_a_trial_counts_where_its_time_went_and_can_leave_test_to_the_driver(tiny_llama):
    from softprompt.trainables.config import TrainConfig
    from softprompt.trainables.loop import train

    cfg = TrainConfig(model=tiny_llama.name, batch_size=2, max_steps=4, eval_every=2, max_train_examples=32,
                      max_eval_examples=4, confirm_examples=8)
    reports = []
    result = train(cfg, tiny_llama, report=lambda metrics, save: reports.append(metrics), score_test=False)
    first, last = reports
    assert "test_accuracy" not in last and "test_accuracy" not in result and last["confirmed_dev_examples"] == 8
    assert first["train_s"] > 0 and first["rung_eval_s"] > 0 and first["confirm_s"] == first["test_s"] == 0
    assert last["train_s"] > first["train_s"] and last["rung_eval_s"] > first["rung_eval_s"]
    assert last["confirm_s"] > 0 and last["test_s"] == 0


def test_where_a_search_s_time_went_adds_up_to_its_slots():
    from softprompt.cli.search import _time_line
    from softprompt.search.record import SearchRecord

    cfg = search_config({"train": {"task": "rotten_tomatoes"}, "concurrency": 2})

    def seconds(s, t, r, c):
        return {"setup_s": s, "train_s": t, "rung_eval_s": r, "confirm_s": c}

    record = SearchRecord(None, cfg, [{"seconds": seconds(5, 100, 20, 0)}, {"seconds": seconds(5, 300, 30, 40)}], None)
    spent = record.time_spent(wall_s=300, driver_s=10)
    assert spent == {"start-up": 10, "training": 400, "dev scoring at rungs": 50, "confirmation": 40,
                     "final test scoring": 20, "Ray, scheduling and idle slots": 80}
    assert _time_line(spent, 300, 2) == ("time: 5.0 min x 2 slots = 600 slot-s: training 67%, Ray, scheduling and "
                                         "idle slots 13%, dev scoring at rungs 8%, confirmation 7%, final test scoring "
                                         "3%, start-up 2%")
    # a resume's line counts the trials that reported since it started, not one that had finished before
    record.trials[0]["reported_at"], record.trials[1]["reported_at"] = 1000, 2000
    assert record.time_spent(wall_s=300, driver_s=10, since=1500.7) == {
        "start-up": 5, "training": 300, "dev scoring at rungs": 30, "confirmation": 40, "final test scoring": 20,
        "Ray, scheduling and idle slots": 205}


def test_tpe_samples_at_random_for_a_quarter_of_the_trials_2_to_10():
    from softprompt.search.tuner import build_sampler, startup_trials

    assert [startup_trials(n) for n in (1, 8, 12, 40, 100, 1000)] == [2, 2, 3, 10, 10, 10]
    assert build_sampler(search_config({"train": {"task": "rotten_tomatoes"}, "trials": 20}))._n_startup_trials == 5
    assert build_sampler(search_config({"train": {"task": "rotten_tomatoes"}, "trials": 20,
                                        "startup_trials": 7}))._n_startup_trials == 7


def test_a_trial_confirms_its_best_prompt_on_further_dev_examples(tiny_llama):
    from softprompt.models.evaluate import evaluate
    from softprompt.models.prompt import PromptedModel, SoftPrompt
    from softprompt.trainables.config import TrainConfig
    from softprompt.trainables.loop import prepare_data, train

    cfg = TrainConfig(model=tiny_llama.name, batch_size=2, max_steps=4, eval_every=2, max_train_examples=32,
                      max_eval_examples=4, confirm_examples=40)
    reports = []
    result = train(cfg, tiny_llama, report=lambda metrics, save: reports.append(metrics))
    data = prepare_data(cfg, tiny_llama)
    assert len(data.splits["dev"]) == 4 and len(data.splits["confirm"]) == 40
    expected = evaluate(PromptedModel(tiny_llama, SoftPrompt(result["prompt"])), data, "confirm")
    assert result["confirmed_dev_accuracy"] == expected["accuracy"]
    assert reports[-1]["confirmed_dev_accuracy"] == expected["accuracy"] and reports[-1]["confirmed_dev_examples"] == 40
    assert "confirmed_dev_accuracy" not in reports[0]  # only the last report, with the test result


def test_confirmed_trials_rank_first_by_their_confirmed_score():
    from softprompt.search.record import rank_rows

    def row(trial, metric, confirmed=None, status="completed"):
        return {"trial_id": trial, "metric": metric, "confirmed": confirmed, "status": status}

    rows = [row("lucky", 0.95, status="stopped early"), row("a", 0.80, 0.71), row("b", 0.84, 0.70),
            row("c", 0.90, status="stopped early")]
    assert [r["trial_id"] for r in rank_rows(rows, "max")] == ["a", "b", "lucky", "c"]
    losses = [row("x", 0.5, status="stopped early"), row("y", 0.5), row("z", 0.2)]
    assert [r["trial_id"] for r in rank_rows(losses, "min")] == ["z", "y", "x"]


def test_a_search_confirms_on_500_dev_examples_unless_told_otherwise():
    assert search_config({"train": {"task": "rotten_tomatoes"}}).train.confirm_examples == 500
    assert search_config({"train": {"task": "rotten_tomatoes", "confirm_examples": 0}}).train.confirm_examples == 0


# ---- the Tuner, on the session's Ray cluster ----

@pytest.fixture(scope="module")
def small_search(ray_cluster, tiny_llama_dir, tmp_path_factory):
    """Six trials of 8 steps, one at a time, under ASHA by training loss: its config and Tune's results."""
    cfg = tiny_search(tiny_llama_dir, tmp_path_factory.mktemp("small"))
    return cfg, run_search(cfg)


def test_small_search_runs_the_default_point_first_and_asha_prunes_weak_trials(small_search):
    cfg, _ = small_search
    rows = SearchRecord.load(cfg.storage_path, cfg.name).trials
    assert len(rows) == 6
    statuses = [r["status"] for r in rows]
    assert "stopped early" in statuses and "completed" in statuses
    assert all(r["step"] < 8 for r in rows if r["status"] == "stopped early")
    # a trial leaves test to the driver, which scores the winner alone (a whole split per trial is waste)
    assert all(r["step"] == 8 and r["test_accuracy"] is None for r in rows if r["status"] == "completed")
    # trials evaluate (and report) only at their eval steps: ASHA's rungs 2, 4, 8 and every eval_every (2)
    assert cfg.train.eval_steps == (2, 4, 6, 8)
    folder = SearchStorage(cfg.storage_path, cfg.name).folder
    reported = [json.loads(line)["step"] for r in rows
                for line in (folder / f"trial_{r['trial_id']}" / "result.json").read_text().splitlines()]
    assert set(reported) <= {2, 4, 6, 8} and reported.count(2) == 6

    trials = study_trials(cfg)
    assert trials[0].params == DEFAULT_POINTS["quick"]  # points_to_evaluate ran first
    by_state = {t.state.name for t in trials}
    assert by_state == {"COMPLETE", "PRUNED"}  # ASHA-stopped trials are not fed to TPE as finished
    assert sum(t.state.name == "PRUNED" for t in trials) == statuses.count("stopped early")

    best = SearchRecord.load(cfg.storage_path, cfg.name).best()
    assert best["metric"] == min(r["metric"] for r in rows)
    assert (Path(best["prompt"]) / "prompt.safetensors").is_file()


def test_asha_can_compare_trials_by_another_metric_than_the_search_picks_by(ray_cluster, tiny_llama_dir, tmp_path):
    cfg = tiny_search(tiny_llama_dir, tmp_path, name="asha-metric", metric="best_dev_accuracy",
                      asha_metric="dev_log_loss")
    assert (cfg.asha_metric, cfg.asha_mode, cfg.mode) == ("dev_log_loss", "min", "max")
    run_search(cfg)
    record = SearchRecord.load(cfg.storage_path, cfg.name)
    rows, folder = record.trials, record.storage.folder
    results = {r["trial_id"]: [json.loads(line) for line in (folder / f"trial_{r['trial_id']}" / "result.json")
                               .read_text().splitlines()] for r in rows}
    assert all(0.0 <= res["dev_auc"] <= 1.0 and res["dev_log_loss"] > 0.0 for rs in results.values() for res in rs)
    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert stopped
    # every trial that ran to the end was confirmed on further dev examples, and the best of those won (below)
    assert all(r["confirmed"] is not None for r in rows if r["status"] == "completed")
    for r in stopped:  # stopped for its log-loss: some other trial did better at that rung
        last = results[r["trial_id"]][-1]
        others = [res["dev_log_loss"] for tid, rs in results.items() if tid != r["trial_id"]
                  for res in rs if res["step"] == last["step"]]
        assert last["dev_log_loss"] > min(others)
    # the winner is still picked by the search metric (here confirmed accuracy), and the saved config keeps both
    assert record.best()["confirmed"] == max(r["confirmed"] for r in rows if r["confirmed"] is not None)
    saved = yaml.safe_load((folder / "softprompt-search.yaml").read_text())
    assert (saved["metric"], saved["asha_metric"]) == ("best_dev_accuracy", "dev_log_loss")


def test_workers_reuse_the_frozen_backbone_across_trials(small_search):
    _, grid = small_search
    reused = [r.metrics["backbone_reused"] for r in grid]
    loads: dict[int, int] = {}  # per worker process (Tune's pid in every result): trials that loaded the model
    for r in grid:
        loads[r.metrics["pid"]] = loads.get(r.metrics["pid"], 0) + (not r.metrics["backbone_reused"])
    # 6 trials, one at a time: each worker loads the model once, for its first trial, and the later ones reuse
    # it; Ray may start a second worker (the bound allows one more load)
    assert len(reused) == 6 and set(loads.values()) == {1} and len(loads) <= 2 and reused.count(True) >= 4


def test_trial_workers_run_with_two_malloc_arenas(ray_cluster):
    """Uncapped, glibc's per-thread malloc arenas kept what trials freed: the demo's workers grew past
    4.5 GiB each (search/jobs.py WORKER_ENV)."""
    @ray.remote(num_cpus=0)
    def arena_cap():
        return os.environ.get("MALLOC_ARENA_MAX")

    assert ray.get(arena_cap.remote()) == "2"


@pytest.fixture(scope="module")
def overflowing_llama_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with an infinite final-norm weight: its loss is NaN from step 1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("inf"))
    folder = tmp_path_factory.mktemp("overflowing-llama")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(folder)
    return folder


def test_a_trial_on_a_model_whose_loss_overflows_ends_as_diverged_at_the_worst_metric(
        tiny_llama_dir, overflowing_llama_dir, tmp_path, monkeypatch):
    """The real trainable, without Ray (conftest's StubTune), on the overflowing model and on the healthy one.
    That a search goes on past a diverged trial, with every Optuna trial told, is tests/test_reliability.py's
    fault 3 and tests/test_trial_faults.py's diverging searches."""
    import softprompt.trainables.trainable as trainable

    base = tiny_search(tiny_llama_dir, tmp_path, scheduler="none", metric="best_dev_accuracy").train.to_dict()
    last = {}
    for name, model in (("overflowing", overflowing_llama_dir), ("healthy", tiny_llama_dir)):
        stub = StubTune(tmp_path / name)
        monkeypatch.setattr(trainable, "tune", stub)
        trainable.tune_trial({"model": str(model)}, base, "best_dev_accuracy", "max")
        last[name] = stub.reports[-1]
    assert last["overflowing"]["status"] == "diverged"
    assert last["overflowing"]["best_dev_accuracy"] == 0.0  # the worst accuracy, finite for Optuna
    assert last["healthy"]["status"] == "completed" and last["healthy"]["best_dev_accuracy"] > 0.0


def record_resources(config, base, metric, mode, gpu_fraction):
    """A stand-in trainable that records what Ray gave it, and how many trials had started while it
    waited for all four (a barrier in the search's output folder, not a sleep: load cannot decide it)."""
    barrier = Path(base["output_dir"])
    (barrier / tune.get_context().get_trial_id()).touch()
    deadline = time.time() + 300  # waited out only by a failing test: four workers may take minutes to start
    while len(list(barrier.iterdir())) < 4 and time.time() < deadline:
        time.sleep(0.1)
    tune.report({metric: 0.5, "step": base["max_steps"], "status": "completed",
                 "together": len(list(barrier.iterdir())), "gpu_ids": ray.get_gpu_ids(), "gpu_fraction": gpu_fraction,
                 "resources": ray.get_runtime_context().get_assigned_resources()})


def test_quarter_gpu_trials_pack_four_to_a_one_gpu_node(ray_cluster, tiny_llama_dir, tmp_path):
    (tmp_path / "barrier").mkdir()
    cfg = tiny_search(tiny_llama_dir, tmp_path, name="gpus", trials=4, concurrency=4, scheduler="none",
                      cpus_per_trial=0.5, gpus_per_trial=0.25, train={"output_dir": str(tmp_path / "barrier")})
    grid = run_search(cfg, trainable=record_resources)
    results = [r.metrics for r in grid]
    assert len(results) == 4
    assert [r["together"] for r in results] == [4] * 4  # all four ran at once: each saw the other three start
    for r in results:
        assert r["resources"]["GPU"] == 0.25 and r["gpu_fraction"] == 0.25
        assert len(r["gpu_ids"]) == 1


# ---- bad search configs ----

BAD_SEARCH_CONFIGS = [
    ({"trails": 4}, "trails", "did you mean 'trials'"),
    ({"scheduler": "hyperband"}, "scheduler", "one of asha, none"),
    ({"metric": "accuracy"}, "metric", "best_dev_accuracy"),
    ({"trials": 0}, "trials", "an integer >= 1"),
    ({"concurrency": 1.5}, "concurrency", "an integer"),
    ({"grace_period": 500, "max_steps": 100}, "grace_period", "at most max_steps"),
    ({"train": {"max_steps": 10}}, "train.max_steps", "top-level max_steps"),
    ({"train": {"optimizer": "sgd"}}, "train.optimizer", "one of adafactor, adamw"),
    ({"space": "huge"}, "space", "quick, paper"),
    ({"space": {"label_smoothing": {"choices": [0.1]}}}, "space.label_smoothing", "training field"),
    ({"space": {"init": {"choices": ["zeros"]}}}, "space.init.choices", "one of random_uniform"),
    ({"space": {"prompt_length": {"choices": [0, 5]}}}, "space.prompt_length.choices", "an integer >= 1"),
    ({"space": {"lr": {"low": 0.1, "high": 0.01}}}, "space.lr", "low < high"),
    ({"space": {"lr": {"low": 0.0, "high": 0.1, "log": True}}}, "space.lr", "> 0"),
    ({"space": {"lr": {"low": 1e-4, "high": 0.1, "when": {"optimizer": "adamw"}}}}, "space.lr.when", "defined above"),
    ({"space": {"lr": {"low": 1e-4, "high": 0.1, "step": 2}}}, "space.lr", "a mapping with keys"),
    ({"checkpoints": []}, "checkpoints", "non-empty list"),
    ({"gpus_per_trial": -1}, "gpus_per_trial", ">= 0"),
    ({"train": {"confirm_examples": -5}}, "train.confirm_examples", "an integer >= 0"),
    ({"asha_metric": "auc"}, "asha_metric", "dev_auc"),
    ({"asha_metric": "dev_auc", "train": {"eval_mode": "exact_match"}}, "asha_metric", "train.eval_mode: rank"),
]


@pytest.mark.parametrize("change,field,allowed", BAD_SEARCH_CONFIGS, ids=[c[1] for c in BAD_SEARCH_CONFIGS])
def test_bad_search_config_names_the_field_and_what_is_allowed(change, field, allowed):
    values = {"train": {"task": "rotten_tomatoes"}, **change}
    with pytest.raises(ConfigError) as caught:
        search_config(values, source="search.yaml")
    message = str(caught.value)
    assert caught.value.field == field
    assert message.startswith("search.yaml: ") and allowed in message


def test_cli_answers_a_bad_search_config_with_one_line_and_exit_code_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trials: 4\nscheduler: hyperband\n")
    result = subprocess.run([sys.executable, "-m", "softprompt", "search", "run", str(bad)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"softprompt: error: {bad}: scheduler = 'hyperband' is not allowed: one of asha, none"]
    assert "Traceback" not in result.stderr + result.stdout
