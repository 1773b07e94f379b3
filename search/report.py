"""`softprompt search report NAME`: each searched parameter's effect on the search metric, the mean
and sample sd over the trials with each value (the paper's Figure 3 view of an ablation), as a
markdown table and a plot in the search's folder and on its MLflow parent run."""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from search.configfile import ConfigError
from search.record import SEED, SearchRecord, sample_sd
from search.tracking import log_report

TABLE_FILE, PLOT_FILE = "report.md", "report.png"


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


def parameter_effects(record: SearchRecord) -> dict[str, list[dict]]:
    """For each searched parameter (the seed left out), each value it took: the mean, sample sd and n
    of the search metric over the trials with that value. Trials without the metric are left out."""
    values: dict[str, dict[str, tuple[object, list[float]]]] = {}
    for row in record.trials:
        if row["metric"] is None:
            continue
        for name, value in row["params"].items():
            if name != SEED:  # same-typed keys: 5 and "5" stay apart
                values.setdefault(name, {}).setdefault(json.dumps(value, default=str), (value, []))[1].append(row["metric"])
    return {name: [{"value": value, "mean": statistics.fmean(metrics), "sd": sample_sd(metrics), "n": len(metrics)}
                   for value, metrics in sorted(by_value.values(), key=lambda item: _order(item[0]))]
            for name, by_value in values.items()}


def markdown(record: SearchRecord, effects: dict[str, list[dict]]) -> str:
    """A table per parameter: value, mean, sd, n."""
    metric, left_out = record.config.metric, sum(row["metric"] is None for row in record.trials)
    lines = [f"# Search {record.storage.name}: {metric} by parameter value", "",
             f"Mean and sample sd of {metric} over the trials with each value; {len(record.trials) - left_out} "
             f"trials, {left_out} without {metric} left out."]
    for name, rows in effects.items():
        lines += ["", f"## {name}", "", "| value | mean | sd | n |", "|---|---:|---:|---:|"]
        lines += [f"| {row['value']} | {row['mean']:.4f} | {'-' if row['sd'] is None else format(row['sd'], '.4f')} "
                  f"| {row['n']} |" for row in rows]
    return "\n".join(lines) + "\n"


def plot(effects: dict[str, list[dict]], metric: str, path: Path) -> Path:
    """One panel per parameter: the mean at each value, with the sd as an error bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(effects), figsize=(3.5 * len(effects), 3.2), squeeze=False, sharey=True)
    for ax, (name, rows) in zip(axes[0], effects.items()):
        numeric = all(_order(r["value"])[0] == 0 for r in rows)  # a line only where values lie on an axis
        ax.errorbar(range(len(rows)), [r["mean"] for r in rows], yerr=[r["sd"] or 0.0 for r in rows],
                    fmt="o-" if numeric else "o", capsize=4)
        ax.set_xticks(range(len(rows)), [str(r["value"]) for r in rows])
        ax.set_title(name)
        ax.set_xlabel("value")
    axes[0][0].set_ylabel(f"{metric} (mean ± sd)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_report(record: SearchRecord) -> Report:
    """Write the table and the plot into the search's folder and, if it was tracked, log both on its
    MLflow parent run. A search in which no trial has reported its metric is an error."""
    effects = parameter_effects(record)
    if not effects:
        raise ConfigError("search", record.storage.name, "a search with at least one trial that reported "
                                                         f"{record.config.metric} and a searched parameter")
    text = markdown(record, effects)
    table = record.storage.write_text(TABLE_FILE, text)
    plot(effects, record.config.metric, record.storage.folder / PLOT_FILE)
    image = record.storage.upload(PLOT_FILE)
    return Report(text, table, image, log_report(record.storage, [table, image]))
