"""Seeds, grid ablations and `search report` (issue 19, items 5 and 6): a point runs once per seed and
ranks by its seeds' mean, a grid runs each cell exactly once, and the report's numbers are the
means and sds of the trials behind them."""
from __future__ import annotations

import itertools
import re
import statistics

import optuna
import pytest
from conftest import study_trials, tiny_search_values
from mlflow.tracking import MlflowClient
from ray.tune.search import Searcher

from softprompt.cli.main import main
from softprompt.search.config import ConfigError, search_config
from softprompt.search.record import RUNNING, SearchRecord
from softprompt.search.report import PLOT_FILE, TABLE_FILE
from softprompt.search.seeds import SeedRepeater
from softprompt.search.storage import SearchStorage
from softprompt.search.tuner import run_search
from softprompt.trainables.tracking import PARENT_TAG

optuna.logging.set_verbosity(optuna.logging.WARNING)


def tiny(tiny_llama_dir, tmp_path, **values) -> dict:
    """The shared test-sized search's values (conftest), by training loss."""
    return tiny_search_values(tiny_llama_dir, tmp_path, **{"metric": "train_loss", **values})


def parent_run(uri: str, name: str):
    client = MlflowClient(uri)
    return client, client.search_runs([client.get_experiment_by_name("softprompt").experiment_id],
                                      f"tags.`softprompt.search` = '{name}'")[0]


# ---- the wrapper, without Ray ----

class Inner(Searcher):
    """Suggests points 0, 1, 2, ... and records what it is told."""

    def __init__(self):
        super().__init__(metric="loss", mode="min")
        self.suggested, self.told = 0, {}

    def suggest(self, trial_id):
        self.suggested += 1
        return {"point": self.suggested - 1}

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.told[trial_id] = (result, error)


def test_each_point_is_handed_out_once_per_seed_and_the_inner_searcher_gets_the_mean_when_all_ended():
    inner = Inner()
    seeds = SeedRepeater(inner, seeds=3, first_seed=10)
    configs = {f"t{i}": seeds.suggest(f"t{i}") for i in range(6)}
    assert [(c["point"], c["seed"]) for c in configs.values()] == [(0, 10), (0, 11), (0, 12), (1, 10), (1, 11), (1, 12)]
    assert inner.suggested == 2

    def done(loss, step=4):
        return {"loss": loss, "status": "completed", "training_iteration": step}

    seeds.on_trial_complete("t0", done(0.3))
    seeds.on_trial_complete("t2", done(0.6))
    assert inner.told == {}  # a seed is still running
    seeds.on_trial_complete("t1", done(0.9))
    assert inner.told == {"t0": ({"loss": pytest.approx(0.6), "status": "completed", "training_iteration": 4}, False)}
    seeds.on_trial_complete("t1", done(0.0))  # a retried seed after its point was told changes nothing
    assert inner.told["t0"][0]["loss"] == pytest.approx(0.6)


@pytest.mark.parametrize("outcomes, told", [
    # a seed ASHA stopped early: the point is stopped early, at that seed's step, with the mean
    ([({"loss": 0.2, "status": "completed", "training_iteration": 4}, False),
      ({"loss": 0.4, "status": RUNNING, "training_iteration": 2}, False)],
     ({"loss": pytest.approx(0.3), "status": RUNNING, "training_iteration": 2}, False)),
    # one seed errored: the mean of the others
    ([({"loss": 0.2, "status": "completed", "training_iteration": 4}, False), (None, True)],
     ({"loss": pytest.approx(0.2), "status": "completed", "training_iteration": 4}, False)),
    ([(None, True), (None, True)], (None, True)),  # every seed errored: the point errored
    ([(None, False), (None, True)], (None, False)),  # none reported: not errored, so stopped early
])
def test_a_point_is_stopped_early_if_any_seed_was_and_errored_only_if_all_were(outcomes, told):
    inner = Inner()
    seeds = SeedRepeater(inner, seeds=2, first_seed=0)
    for i in range(len(outcomes)):
        seeds.suggest(f"t{i}")
    for i, (result, error) in enumerate(outcomes):
        seeds.on_trial_complete(f"t{i}", result, error)
    assert inner.told == {"t0": told}


def test_the_wrappers_state_survives_a_snapshot():
    inner = Inner()
    seeds = SeedRepeater(inner, seeds=2, first_seed=0)
    seeds.suggest("a")
    seeds.on_trial_complete("a", {"loss": 1.0, "status": "completed", "training_iteration": 4})
    restored = SeedRepeater(inner, seeds=2, first_seed=0)
    restored.set_state(seeds.get_state())
    assert restored.suggest("b") == {"point": 0, "seed": 1}  # the open point's next seed, not a new point
    restored.on_trial_complete("b", {"loss": 3.0, "status": "completed", "training_iteration": 4})
    assert inner.told["a"][0]["loss"] == 2.0


# ---- configs ----

GRID = {"prompt_length": {"choices": [2, 4]}, "init": {"choices": ["random_uniform", "sampled_vocab", "class_label"]}}


def test_a_grid_search_has_one_trial_per_cell_and_seeds_multiply_the_trials_that_run_at_once():
    grid = search_config({"train": {"task": "rotten_tomatoes"}, "sampler": "grid", "space": GRID, "concurrency": 8})
    assert (grid.trials, grid.concurrency) == (6, 6)
    seeded = search_config({"train": {"task": "rotten_tomatoes"}, "trials": 2, "seeds": 3, "concurrency": 8})
    assert (seeded.trials, seeded.seeds, seeded.concurrency) == (2, 3, 6)
    assert search_config({"train": {"task": "rotten_tomatoes"}}).seeds == 1


@pytest.mark.parametrize("change, field, allowed", [
    ({"sampler": "grid"}, "sampler", "space 'quick' has ranges"),
    ({"sampler": "grid", "space": {**GRID, "lr": {"low": 0.01, "high": 0.3}}}, "sampler", "space.lr has a range"),
    ({"sampler": "grid", "space": {"optimizer": {"choices": ["adamw"]},
                                   "lr": {"choices": [0.1], "when": {"optimizer": "adamw"}}}},
     "sampler", "space.lr has when:"),
    ({"sampler": "grid", "space": GRID, "trials": 4}, "trials", "6, the number of grid cells"),
    ({"sampler": "grid", "space": GRID, "points_to_evaluate": [{"prompt_length": 2}]}, "points_to_evaluate",
     "left out with sampler: grid"),
    ({"seeds": 2, "space": {"seed": {"choices": [1, 2]}}}, "space.seed", "left out with seeds > 1"),
    ({"seeds": 0}, "seeds", "an integer >= 1"),
])
def test_a_grid_needs_a_finite_space_and_seeds_a_positive_count(change, field, allowed):
    with pytest.raises(ConfigError) as caught:
        search_config({"train": {"task": "rotten_tomatoes"}, **change}, source="search.yaml")
    assert caught.value.field == field and allowed in str(caught.value)


# ---- real searches on the tiny Llama ----

def test_a_seeded_search_trains_each_point_once_per_seed_and_ranks_points_by_their_mean(
        ray_cluster, tiny_llama_dir, tmp_path, capsys):
    values = tiny(tiny_llama_dir, tmp_path, name="seeded", trials=2, seeds=2, sampler="random",
                  space={"lr": {"low": 0.01, "high": 0.3, "log": True}}, points_to_evaluate=[{"lr": 0.3}])
    cfg = search_config(values)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_search(cfg, tracking_uri=uri)
    record = SearchRecord.load(cfg.storage_path, cfg.name)
    rows = record.trials
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows)
    by_lr = {}
    for r in rows:
        by_lr.setdefault(r["params"]["lr"], []).append(r)
    assert len(by_lr) == 2 and 0.3 in by_lr
    assert all(sorted(r["params"]["seed"] for r in group) == [0, 1] for group in by_lr.values())
    # the seeds are different runs: seed changes init, data order and so the loss
    assert all(len({r["metric"] for r in group}) == 2 for group in by_lr.values())

    means = {lr: statistics.fmean(r["metric"] for r in group) for lr, group in by_lr.items()}
    points = record.points()
    assert [p["metric"] for p in points] == pytest.approx(sorted(means.values()))  # train_loss: lower first
    best_lr = min(means, key=means.get)
    best = record.best()
    assert best["params"]["lr"] == best_lr
    assert best["metric"] == min(r["metric"] for r in by_lr[best_lr])  # the point's best seed: its prompt exports
    assert best["point"]["mean"] == pytest.approx(means[best_lr]) and best["point"]["n"] == 2
    assert best["point"]["sd"] == pytest.approx(statistics.stdev(r["metric"] for r in by_lr[best_lr]))

    trials = study_trials(cfg)  # Optuna saw one trial per point, valued at the point's mean
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert {t.params["lr"]: t.value for t in trials} == pytest.approx(means)

    client, parent = parent_run(uri, "seeded")
    assert parent.data.metrics["winner_mean_train_loss"] == pytest.approx(means[best_lr])
    assert parent.data.metrics["winner_sd_train_loss"] == pytest.approx(best["point"]["sd"])
    assert parent.data.metrics["winner_seeds"] == 2
    children = client.search_runs([parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    assert sorted(c.data.params["seed"] for c in children) == ["0", "0", "1", "1"]

    capsys.readouterr()
    assert main(["search", "status", "seeded", "--storage-path", cfg.storage_path]) == 0
    status = capsys.readouterr().out
    assert "seeded: 4 of 4 trials (2 points x 2 seeds) started" in status
    assert f"{means[best_lr]:.4f} ± {best['point']['sd']:.4f}" in status
    assert main(["search", "best", "seeded", "--storage-path", cfg.storage_path]) == 0
    assert f"point mean ± sd     {means[best_lr]:.4f} ± {best['point']['sd']:.4f}  (train_loss over 2 seeds" in \
        capsys.readouterr().out


def parse_report(text: str) -> dict[str, dict[str, tuple]]:
    tables, name = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            name = line[3:]
            tables[name] = {}
        elif name and re.match(r"\| [^-]", line) and not line.startswith("| value"):
            value, mean, sd, n = [cell.strip() for cell in line.strip("|").split("|")]
            tables[name][value] = (float(mean), None if sd == "-" else float(sd), int(n))
    return tables


@pytest.fixture(scope="module")
def grid_search(ray_cluster, tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grid")
    cfg = search_config(tiny(tiny_llama_dir, tmp, name="grid", sampler="grid", concurrency=2, space=GRID))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    run_search(cfg, tracking_uri=uri)
    return cfg, uri


def test_a_grid_search_runs_each_cell_exactly_once(grid_search):
    cfg, _ = grid_search
    rows = SearchRecord.load(cfg.storage_path, cfg.name).trials
    cells = sorted((r["params"]["prompt_length"], r["params"]["init"]) for r in rows)
    assert cells == sorted(itertools.product(GRID["prompt_length"]["choices"], GRID["init"]["choices"]))
    assert all(r["status"] == "completed" for r in rows)
    assert len(study_trials(cfg)) == 6


def test_search_report_writes_each_parameters_mean_and_sd_by_value_as_a_table_and_a_plot(grid_search, capsys):
    cfg, uri = grid_search
    assert main(["search", "report", "grid", "--storage-path", cfg.storage_path]) == 0
    out = capsys.readouterr().out
    folder = SearchStorage(cfg.storage_path, cfg.name).folder
    assert f"table: {folder / TABLE_FILE}" in out and f"plot:  {folder / PLOT_FILE}" in out
    text = (folder / TABLE_FILE).read_text()
    assert text in out

    rows = SearchRecord.load(cfg.storage_path, cfg.name).trials
    expected = {}
    for name in ("prompt_length", "init"):
        expected[name] = {}
        for value in sorted({r["params"][name] for r in rows}, key=str):
            metrics = [r["metric"] for r in rows if r["params"][name] == value]
            expected[name][str(value)] = (statistics.fmean(metrics), statistics.stdev(metrics), len(metrics))
    shown = parse_report(text)
    assert set(shown) == {"prompt_length", "init"}
    for name, values in expected.items():
        assert set(shown[name]) == set(values)
        for value, (mean, sd, n) in values.items():
            assert shown[name][value] == (pytest.approx(mean, rel=5e-3), pytest.approx(sd, rel=5e-3), n)  # 3 digits
    assert list(shown["prompt_length"]) == ["2", "4"]  # numbers in numeric order
    assert "6 trials, 0 without train_loss left out" in text
    assert (folder / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    client, parent = parent_run(uri, "grid")
    assert sorted(a.path for a in client.list_artifacts(parent.info.run_id, "report")) == \
        ["report/report.md", "report/report.png"]


# A seeded search stopped by Ctrl-C and resumed runs each seed once: tests/test_driver_faults.py's Ctrl-C test
# is such a search.


def test_the_grid_lets_tune_tell_its_last_cell_pruned_without_stopping_the_study():
    """Optuna's own GridSampler stops the study at its last cell, which raises outside study.optimize:
    through Ray's searcher that ended the last cell's trial as errored when ASHA had stopped it."""
    from softprompt.search.tuner import TuneGridSampler

    for sampler, raises in ((optuna.samplers.GridSampler({"x": [1, 2]}), True),
                            (TuneGridSampler({"x": [1, 2]}), False)):
        study = optuna.create_study(sampler=sampler)
        first, last = study.ask(), study.ask()
        for trial in (first, last):
            trial.suggest_categorical("x", [1, 2])
        study.tell(first, 0.5)
        try:
            study.tell(last, state=optuna.trial.TrialState.PRUNED)
            raised = False
        except RuntimeError:
            raised = True
        assert raised is raises
        assert sorted(t.params["x"] for t in study.trials) == [1, 2]


def test_a_point_suggested_twice_is_two_points_each_with_its_seeds_once(tiny_llama_dir, tmp_path):
    cfg = search_config(tiny(tiny_llama_dir, tmp_path, seeds=2, sampler="random",
                             space={"prompt_length": {"choices": [4]}}))

    def row(tid, seed, metric):
        return {"trial_id": tid, "status": "completed", "params": {"prompt_length": 4, "seed": seed},
                "metric": metric, "confirmed": None, "prompt": f"/p/{tid}"}

    rows = [row("a", 0, 0.1), row("b", 1, 0.3), row("c", 0, 0.5), row("d", 1, 0.7)]
    points = SearchRecord(SearchStorage(cfg.storage_path, cfg.name), cfg, rows, None).points()
    assert [([t["trial_id"] for t in p["trials"]], p["n"], p["metric"]) for p in points] == [
        (["a", "b"], 2, pytest.approx(0.2)), (["c", "d"], 2, pytest.approx(0.6))]  # train_loss: lower first


def test_a_custom_space_chooses_among_several_checkpoints_and_a_grid_counts_them_as_an_axis(tiny_llama_dir, tmp_path):
    other = tmp_path / "other-llama"
    import shutil
    shutil.copytree(tiny_llama_dir, other)
    cfg = search_config(tiny(tiny_llama_dir, tmp_path, sampler="grid", space={"prompt_length": {"choices": [2, 4]}},
                             checkpoints=[str(tiny_llama_dir), str(other)]))
    assert cfg.trials == 4
    from softprompt.spaces import CustomSpace

    assert CustomSpace(cfg.space, cfg.checkpoints).grid() == {"prompt_length": [2, 4],
                                                              "model": [str(tiny_llama_dir), str(other)]}
    named = {"model": {"choices": [str(other)]}, "prompt_length": {"choices": [2]}}
    assert CustomSpace(named, cfg.checkpoints).grid() == {"model": [str(other)], "prompt_length": [2]}


def test_a_point_missing_a_seeds_evaluation_ranks_after_the_whole_points(tiny_llama_dir, tmp_path):
    cfg = search_config(tiny(tiny_llama_dir, tmp_path, seeds=2, sampler="random",
                             space={"prompt_length": {"choices": [2, 4]}}))

    def row(tid, length, seed, metric):
        return {"trial_id": tid, "status": "completed", "metric": metric,
                "params": {"prompt_length": length, "seed": seed}, "confirmed": None, "prompt": f"/p/{tid}"}

    rows = [row("a", 2, 0, 0.5), row("b", 2, 1, 0.7), row("c", 4, 0, 0.1)]  # c's seed 1 never evaluated
    points = SearchRecord(SearchStorage(cfg.storage_path, cfg.name), cfg, rows, None).points()
    assert [([t["trial_id"] for t in p["trials"]], p["n"]) for p in points] == [(["a", "b"], 2), (["c"], 1)]
