"""`search report`'s plots and table read as a hyperparameter study does (issue 32, part 3; issue 27):
a parameter drawn from a range is a scatter of every trial, on a log axis where it was drawn on a log
scale, and binned in the table; a list of choices keeps its mean ± sd by value; floats show three
significant digits; and the absolute lr gets a panel of its own where the trials' lr was in another unit.
Optuna's plots on MLflow read the same way."""
from __future__ import annotations

import random
import re
import statistics

import optuna
import optuna.visualization.matplotlib as optuna_plots
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution

from softprompt.search.config import search_config
from softprompt.search.record import SearchRecord
from softprompt.search.report import ABSOLUTE_LR, figure, parameter_effects, write_report
from softprompt.search.storage import STUDY_FILE, SearchStorage
from softprompt.search.tracking import optuna_figure
from softprompt.spaces import paper

pytestmark = pytest.mark.no_ray  # `make test` runs it beside the loopback `ray up` test (pyproject.toml)

optuna.logging.set_verbosity(optuna.logging.WARNING)
LR = FloatDistribution(1e-3, 0.1, log=True)  # quick's lr@adamw
INIT = CategoricalDistribution(["random_uniform", "sampled_vocab", "class_label"])
WARMUP = CategoricalDistribution([0.0, 2000 / 30_000, 3000 / 30_000])  # paper's warmup fractions: floats, chosen


def searched(tmp_path, points: int, seeds: int = 1, rms: float | None = None, lr=LR) -> SearchRecord:
    """A finished search of `points` x `seeds` trials over lr@adamw (drawn from `lr`), init and
    warmup_fraction, as its record and its Optuna study hold it; each trial's absolute lr is its lr times
    `rms` (None: lr_unit absolute)."""
    cfg = search_config({"name": "synthetic", "storage_path": str(tmp_path), "space": "paper", "seeds": seeds})
    storage = SearchStorage(cfg.storage_path, cfg.name)
    storage.folder.mkdir(parents=True)
    study = optuna.create_study(study_name=cfg.name, storage=f"sqlite:///{storage.folder / STUDY_FILE}",
                                direction="maximize")
    pick, rows = random.Random(0), []
    for point in range(points):
        params = {"lr@adamw": 10 ** pick.uniform(-3, -1), "init": pick.choice(INIT.choices),
                  "warmup_fraction": pick.choice(WARMUP.choices)}
        metrics = [pick.uniform(0.5, 0.9) for _ in range(seeds)]
        study.add_trial(optuna.trial.create_trial(params=params, value=statistics.fmean(metrics), distributions={
            "lr@adamw": lr, "init": INIT, "warmup_fraction": WARMUP}))
        rows += [{"trial_id": f"t{point}_{seed}", "status": "completed", "params": {**params, "seed": seed},
                  "metric": metric, "lr_absolute": params["lr@adamw"] * (rms or 1.0)}
                 for seed, metric in enumerate(metrics)]
    return SearchRecord(storage, cfg, rows, None)


def table_rows(text: str) -> dict[str, list[list[str]]]:
    """Each parameter's table rows as their cells."""
    tables, name = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            name = line[3:]
            tables[name] = []
        elif name and re.match(r"\| [^-]", line) and not line.startswith("| value"):
            tables[name].append([cell.strip() for cell in line.strip("|").split("|")])
    return tables


def test_a_log_range_is_a_scatter_of_every_trial_on_a_log_axis_one_series_per_seed(tmp_path):
    record = searched(tmp_path, points=12, seeds=2)
    effects = parameter_effects(record)
    assert {name: effect["scale"] for name, effect in effects.items()} == \
        {"lr@adamw": "log", "init": None, "warmup_fraction": None}
    axes = {ax.get_title(): ax for ax in figure(effects, record.config.metric).axes}
    lr = axes["lr@adamw"]
    assert lr.get_xscale() == "log"
    by_seed = {series.get_label(): [tuple(xy) for xy in series.get_offsets()] for series in lr.collections}
    assert by_seed == {f"seed {seed}": [(r["params"]["lr@adamw"], r["metric"]) for r in record.trials
                                        if r["params"]["seed"] == seed] for seed in (0, 1)}
    assert axes["init"].get_xscale() == "linear"  # choices keep their mean ± sd by value


def drawn_ticks(ax) -> list[tuple[str, object]]:
    """The x tick labels drawn inside the panel (major and minor), each with its box on the canvas."""
    boxes = [(label.get_text(), label.get_window_extent()) for label in ax.get_xticklabels(which="both")
             if label.get_visible() and label.get_text()]
    return [(text, box) for text, box in boxes if ax.bbox.x0 - 1 <= (box.x0 + box.x1) / 2 <= ax.bbox.x1 + 1]


def test_the_plots_tick_labels_are_short_and_apart(tmp_path):
    record = searched(tmp_path, points=12, seeds=2, rms=0.02)
    plot = figure(parameter_effects(record), record.config.metric)
    plot.canvas.draw()
    axes = {ax.get_title(): ax for ax in plot.axes}
    assert [text for text, _ in drawn_ticks(axes["warmup_fraction"])] == ["0", "0.0667", "0.1"]
    for ax in plot.axes:
        ticks = drawn_ticks(ax)
        overlapping = [(a, b) for i, (a, box) in enumerate(ticks) for b, other in ticks[i + 1:] if box.overlaps(other)]
        assert not overlapping, (ax.get_title(), overlapping)
    for name in ("lr@adamw", ABSOLUTE_LR):  # powers of ten only, two at least
        shown = [text for text, _ in drawn_ticks(axes[name])]
        assert len(shown) >= 2 and all(re.fullmatch(r"\$\\mathdefault\{10\^\{-?\d\}\}\$", t) for t in shown), shown


def test_the_table_bins_a_log_range_by_decade_and_shows_floats_to_three_significant_digits(tmp_path):
    record = searched(tmp_path, points=40)
    tables = table_rows(write_report(record).text)
    lrs = [(r["params"]["lr@adamw"], r["metric"]) for r in record.trials]
    decades = [("0.001–0.01", 1e-3, 1e-2), ("0.01–0.1", 1e-2, 1e-1)]
    assert [row[0] for row in tables["lr@adamw"]] == [label for label, _, _ in decades]  # not one row per trial
    for row, (_, low, high) in zip(tables["lr@adamw"], decades):
        inside = [metric for lr, metric in lrs if low <= lr < high]
        assert row[1:] == [f"{statistics.fmean(inside):#.3g}", f"{statistics.stdev(inside):#.3g}", str(len(inside))]
    assert [row[0] for row in tables["warmup_fraction"]] == ["0", "0.0667", "0.1"]
    numbers = [cell for rows in tables.values() for row in rows for cell in row[1:3]]
    assert all(len(re.sub(r"^0\.0*|\.|e-\d+$", "", cell)) <= 3 for cell in numbers), numbers


def test_a_linear_range_is_binned_in_four_equal_widths_on_a_linear_axis(tmp_path):
    record = searched(tmp_path, points=40, lr=FloatDistribution(1e-3, 0.1))
    effect = parameter_effects(record)["lr@adamw"]
    lrs = [r["params"]["lr@adamw"] for r in record.trials]
    width = (max(lrs) - min(lrs)) / 4
    assert [edge for row in effect["rows"] for edge in row["value"]] == pytest.approx(
        [min(lrs) + edge * width for k in range(4) for edge in (k, k + 1)])
    assert sum(row["n"] for row in effect["rows"]) == 40
    axes = {ax.get_title(): ax for ax in figure({"lr@adamw": effect}, record.config.metric).axes}
    assert effect["scale"] == "linear" and axes["lr@adamw"].get_xscale() == "linear"


def test_an_absolute_lr_panel_appears_only_where_the_lr_was_in_another_unit(tmp_path):
    absolute = searched(tmp_path / "absolute", points=8)
    assert ABSOLUTE_LR not in parameter_effects(absolute)
    assert f"## {ABSOLUTE_LR}" not in write_report(absolute).text

    relative = searched(tmp_path / "relative", points=8, rms=0.02)  # lr in embedding-RMS units
    effects = parameter_effects(relative)
    assert effects[ABSOLUTE_LR]["scale"] == "log"
    assert [value for value, _, _ in effects[ABSOLUTE_LR]["points"]] == \
        pytest.approx([r["params"]["lr@adamw"] * 0.02 for r in relative.trials])
    assert f"## {ABSOLUTE_LR}" in write_report(relative).text
    axes = {ax.get_title(): ax for ax in figure(effects, relative.config.metric).axes}
    assert axes[ABSOLUTE_LR].get_xscale() == "log"


def test_optunas_parallel_coordinates_show_float_choices_to_three_digits_and_a_log_lr_by_decade():
    pick = random.Random(0)

    def objective(trial: optuna.Trial) -> float:
        paper(trial, ["model"])
        return pick.uniform(0.5, 0.9)

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(objective, n_trials=16)
    plot = optuna_figure(optuna_plots.plot_parallel_coordinate, study)
    plot.canvas.draw()
    ticks = [dict(zip([t.get_text() for t in ax.get_yticklabels()], ax.get_yticks())) for ax in plot.axes]
    assert {"0", "0.0667", "0.1"} <= {label for axis in ticks for label in axis}  # warmup_fraction's choices
    numbers = [label for axis in ticks for label in axis if re.fullmatch(r"[\d.e-]+", label)]
    assert all(len(re.sub(r"^0\.0*|\.|e-\d+$", "", label)) <= 3 for label in numbers), numbers
    decades = [[axis[label] for label in ("0.001", "0.01", "0.1") if label in axis] for axis in ticks]
    decades = [heights for heights in decades if len(heights) > 1]  # lr@adafactor's axis and lr@adamw's
    assert len(decades) == 2 and all(b - a == pytest.approx(1.0) for heights in decades  # log10: a decade a unit
                                     for a, b in zip(heights, heights[1:]))
    assert plot.get_figwidth() >= 1.5 * len(plot.axes)
