"""`softprompt search report NAME`: each searched parameter's effect on the search metric, as a
markdown table and a plot in the search's folder and on its MLflow parent run. A parameter chosen
from a list shows the mean and sample sd over the trials with each value (the paper's Figure 3 view
of an ablation); one drawn from a range shows every trial as a point, on a log axis where it was
drawn on a log scale, and in the table its trials in bins."""
from __future__ import annotations

import bisect
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from softprompt.configfile import ConfigError
from softprompt.search.record import SEED, SearchRecord, sample_sd
from softprompt.search.storage import STUDY_FILE
from softprompt.search.tracking import log_report

TABLE_FILE, PLOT_FILE = "report.md", "report.png"
ABSOLUTE_LR = "lr (absolute)"  # a parameter of its own where the trials' lr was in another unit (TrainConfig.lr_unit)
BINS = 4  # a linear range's bins in the table


@dataclass(frozen=True)
class Report:
    text: str             # the markdown table, as written to `table`
    table: Path
    plot: Path
    run_id: str | None    # the MLflow parent run that got both files, if the search was tracked


def _order(value) -> tuple:
    """Numbers in numeric order, then everything else by its text (None, strings, booleans)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (0, value, "") if number else (1, 0, str(value))


def _shown(value) -> str:
    """A float to three significant digits, a bin as its edges, anything else as its text."""
    if isinstance(value, tuple):
        return "–".join(_shown(edge) for edge in value)
    return format(value, ".3g") if isinstance(value, float) else str(value)


def _is_lr(name: str) -> bool:
    return name.split("@")[0] == "lr"  # lr, or a branch's lr (lr@adamw)


def _ranges(record: SearchRecord) -> dict[str, str]:
    """Each parameter the search drew from a range rather than a list of choices, and its scale (log or
    linear), as its Optuna study recorded them: for a named space as much as for a mapping."""
    import optuna

    study = optuna.load_study(study_name=record.config.name, storage=f"sqlite:///{record.storage.folder / STUDY_FILE}")
    return {name: "log" if distribution.log else "linear" for trial in study.get_trials(deepcopy=False)
            for name, distribution in trial.distributions.items()
            if not isinstance(distribution, optuna.distributions.CategoricalDistribution)}


def _summary(value, metrics: list[float]) -> dict:
    return {"value": value, "mean": statistics.fmean(metrics), "sd": sample_sd(metrics), "n": len(metrics)}


def _by_value(trials: list[tuple]) -> list[dict]:
    """A list of choices' rows: the trials with each value, values in `_order`."""
    by_value: dict[str, tuple[object, list[float]]] = {}
    for value, metric, _ in trials:  # same-typed keys: 5 and "5" stay apart
        by_value.setdefault(json.dumps(value, default=str), (value, []))[1].append(metric)
    return [_summary(value, metrics) for value, metrics in sorted(by_value.values(), key=lambda item: _order(item[0]))]


def _by_bin(trials: list[tuple], scale: str) -> list[dict]:
    """A range's rows: the trials in each bin, (low, high) edges, that holds any. On a log scale the bins are
    decades, else BINS equal widths; a bin holds its lower edge, and the last its upper edge too."""
    values = [value for value, _, _ in trials]
    if scale == "log":
        low, high = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
        edges = [10.0 ** k for k in range(low, max(high, low + 1) + 1)]
    else:
        edges = [min(values) + (max(values) - min(values)) * k / BINS for k in range(BINS + 1)]
    binned: dict[int, list[float]] = {}
    for value, metric, _ in trials:
        binned.setdefault(min(bisect.bisect_right(edges, value), len(edges) - 1), []).append(metric)
    return [_summary((edges[i - 1], edges[i]), binned[i]) for i in sorted(binned)]


def parameter_effects(record: SearchRecord) -> dict[str, dict]:
    """For each searched parameter (the seed left out), and the absolute lr where the trials' lr was in
    another unit: `points`, each trial's (value, metric, seed); `scale`, None for a list of choices, else
    the range's (log or linear); `rows`, the mean, sample sd and n of the metric by value (`_by_value`),
    or for a range by bin (`_by_bin`). Trials without the metric are left out."""
    scored = [row for row in record.trials if row["metric"] is not None]
    points: dict[str, list[tuple]] = {}
    for row in scored:
        for name, value in row["params"].items():
            if name != SEED:
                points.setdefault(name, []).append((value, row["metric"], row["params"].get(SEED)))
    scales = _ranges(record)
    if any(row["lr_absolute"] is not None and not math.isclose(value, row["lr_absolute"])
           for row in scored for name, value in row["params"].items() if _is_lr(name)):
        points[ABSOLUTE_LR] = [(row["lr_absolute"], row["metric"], row["params"].get(SEED))
                               for row in scored if row["lr_absolute"] is not None]
        scales[ABSOLUTE_LR] = "log" if "log" in (scale for name, scale in scales.items() if _is_lr(name)) else "linear"
    return {name: {"points": trials, "scale": scales.get(name),
                   "rows": _by_bin(trials, scales[name]) if name in scales else _by_value(trials)}
            for name, trials in points.items()}


def markdown(record: SearchRecord, effects: dict[str, dict]) -> str:
    """A table per parameter: value (or bin), mean, sd, n."""
    metric, left_out = record.config.metric, sum(row["metric"] is None for row in record.trials)
    lines = [f"# Search {record.storage.name}: {metric} by parameter value", "",
             f"Mean and sample sd of {metric} over the trials with each value; for a parameter drawn from a range, "
             f"over the trials in each bin (decades on a log scale, else {BINS} equal widths; a bin holds its lower "
             f"edge). {len(record.trials) - left_out} trials, {left_out} without {metric} left out."]
    for name, effect in effects.items():
        lines += ["", f"## {name}", "", "| value | mean | sd | n |", "|---|---:|---:|---:|"]
        lines += [f"| {_shown(row['value'])} | {row['mean']:#.3g} | "
                  f"{'-' if row['sd'] is None else format(row['sd'], '#.3g')} | {row['n']} |" for row in effect["rows"]]
    return "\n".join(lines) + "\n"


def figure(effects: dict[str, dict], metric: str):
    """One panel per parameter: for a range, each trial's metric at its value (a series per seed), on the
    range's axis; for a list of choices, the mean at each value with the sd as an error bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(effects), figsize=(3.5 * len(effects), 3.2), squeeze=False, sharey=True)
    for ax, (name, effect) in zip(axes[0], effects.items()):
        if effect["scale"]:
            seeds = sorted({seed for _, _, seed in effect["points"]}, key=_order)
            for seed in seeds:
                values, metrics = zip(*[(value, metric) for value, metric, s in effect["points"] if s == seed])
                ax.scatter(values, metrics, s=14, alpha=0.7, label=f"seed {seed}")
            ax.set_xscale(effect["scale"])
            if effect["scale"] == "log":  # whole decades, the table's bins: labelled ticks at both ends, none between
                ax.set_xlim(effect["rows"][0]["value"][0], effect["rows"][-1]["value"][1])
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            if len(seeds) > 1:
                ax.legend(fontsize="small")
            ax.set_xlabel("value (each trial)")
        else:
            rows = effect["rows"]
            numeric = all(_order(r["value"])[0] == 0 for r in rows)  # a line only where values lie on an axis
            ax.errorbar(range(len(rows)), [r["mean"] for r in rows], yerr=[r["sd"] or 0.0 for r in rows],
                        fmt="o-" if numeric else "o", capsize=4)
            ax.set_xticks(range(len(rows)), [_shown(r["value"]) for r in rows])
            ax.set_xlabel("value (mean ± sd)")
        ax.set_title(name)
    axes[0][0].set_ylabel(metric)
    fig.tight_layout()
    plt.close(fig)  # off pyplot's list of open figures; it still saves and draws
    return fig


def write_report(record: SearchRecord) -> Report:
    """Write the table and the plot into the search's folder and, if it was tracked, log both on its
    MLflow parent run. A search in which no trial has reported its metric is an error."""
    effects = parameter_effects(record)
    if not effects:
        raise ConfigError("search", record.storage.name, "a search with at least one trial that reported "
                                                         f"{record.config.metric} and a searched parameter")
    text = markdown(record, effects)
    table = record.storage.write_text(TABLE_FILE, text)
    figure(effects, record.config.metric).savefig(record.storage.folder / PLOT_FILE, dpi=100)
    image = record.storage.upload(PLOT_FILE)
    return Report(text, table, image, log_report(record.storage, [table, image]))
