"""MLflow tracking on the driver: one parent run per search, one nested child run per trial (the trials
log their own, trainables/tracking.py), and after the search the trials' final statuses, the winner, its
prompt and nearest tokens, and Optuna's plots on the parent. `finish_search_run` is idempotent and replays
the trials' spools first, so `softprompt mlflow sync` (which calls it again) repairs what a server missed.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
import urllib.parse
import warnings
from collections.abc import Callable
from pathlib import Path

from softprompt.errors import one_line
from softprompt.search.config import ConfigError, SearchConfig
from softprompt.search.record import CONFIRMED, SearchRecord
from softprompt.search.storage import CONFIG_FILE, STUDY_FILE, SearchStorage
from softprompt.trainables.tracking import (
    PARENT_TAG,
    RUN_FILE,
    TRIAL_TAG,
    TrackingTarget,
    client,
    find_or_create_child,
    replay_spool,
    set_status,
)

EXPERIMENT = "softprompt"
SEARCH_TAG = "softprompt.search"
SPOOL_DIR = "mlflow-spool"
NEAREST_TOKENS = 5
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI's name for model training
UI_PORT = 5000


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def ui_link(target: TrackingTarget, port: int = UI_PORT) -> str:
    """The MLflow UI's comparison of the search's trials (its parent's child runs): their names, parameters
    and metrics side by side. Not the runs table: MLflow 3.17's ignores a filter in its link and opens on
    the parent run, collapsed, inside a GenAI overview by default (mlflow#24498)."""
    base = target.uri.rstrip("/") if is_server(target.uri) else f"http://127.0.0.1:{port}"
    runs = sorted(_child_runs(client(target.uri), target).values())
    return (f"{base}/#/compare-runs?runs={urllib.parse.quote(json.dumps(runs))}"
            f"&experiments={urllib.parse.quote(json.dumps([target.experiment_id]))}")


def default_tracking_uri() -> str:
    """The embedded default: a SQLite store in the working folder."""
    return f"sqlite:///{Path('mlflow.db').resolve()}"


def softprompt_experiment(mlflow_client, uri: str) -> str:
    """The experiment every softprompt run goes in; with a sqlite store its artifacts sit beside the
    database (MLflow would otherwise put them in ./mlruns of whatever folder it runs from). It is
    marked as model training, also when an older softprompt made it: MLflow 3's UI opens an
    experiment without a kind on its GenAI (traces) overview, not on the runs table."""
    experiment = mlflow_client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        location = ((Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri() if uri.startswith("sqlite:")
                    else None)
        return mlflow_client.create_experiment(EXPERIMENT, artifact_location=location, tags=EXPERIMENT_KIND)
    for key, value in EXPERIMENT_KIND.items():
        if experiment.tags.get(key) != value:
            mlflow_client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def _search_params(cfg: SearchConfig) -> dict[str, str]:
    values = dataclasses.asdict(cfg)
    train = values.pop("train")
    flat = {**values, **{f"train.{k}": v for k, v in train.items()}}
    return {k: json.dumps(v) if isinstance(v, (dict, list, tuple)) else str(v) for k, v in flat.items()}


def _with_parent(mlflow_client, target: TrackingTarget, cfg: SearchConfig, folder: Path) -> TrackingTarget:
    """`target` with a new parent run for the search, its config logged as parameters and as a file."""
    from mlflow.entities import Param
    experiment_id = softprompt_experiment(mlflow_client, target.uri)
    run = mlflow_client.create_run(experiment_id, run_name=cfg.name, tags={SEARCH_TAG: cfg.name})
    mlflow_client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in _search_params(cfg).items()])
    if (folder / CONFIG_FILE).is_file():
        mlflow_client.log_artifact(run.info.run_id, str(folder / CONFIG_FILE))
    return dataclasses.replace(target, experiment_id=experiment_id, parent_run_id=run.info.run_id)


def _save_target(search: SearchStorage, target: TrackingTarget) -> None:
    search.write_text(RUN_FILE, json.dumps(dataclasses.asdict(target), indent=2))


def load_target(search: SearchStorage, uri: str | None = None) -> TrackingTarget | None:
    """The search's saved tracking target (None if it was never tracked); `uri` overrides the server."""
    path = search.pull() / RUN_FILE
    if not path.is_file():
        return None
    target = TrackingTarget(**json.loads(path.read_text()))
    if uri and uri != target.uri:  # another server: the saved run ids mean nothing there
        target = TrackingTarget(uri, None, None, target.spool_dir)
    return target


def start_search_run(cfg: SearchConfig, uri: str) -> TrackingTarget:
    """The search's parent run: created, or on resume the saved one, reopened. If the server cannot
    be reached the search runs anyway and every trial spools."""
    search = SearchStorage(cfg.storage_path, cfg.name)
    target = load_target(search, uri) or TrackingTarget(uri, None, None, str(search.folder / SPOOL_DIR))
    try:
        mlflow_client = client(uri)
        if target.parent_run_id is None:
            target = _with_parent(mlflow_client, target, cfg, search.folder)
        else:
            mlflow_client.update_run(target.parent_run_id, status="RUNNING")
    except Exception as error:
        print(f"softprompt: tracking server {uri} unreachable ({one_line(error)}); the search runs "
              f"and records go to {target.spool_dir}: `softprompt mlflow sync {cfg.name}` logs them later",
              file=sys.stderr, flush=True)
    _save_target(search, target)
    return target


def _child_runs(mlflow_client, target: TrackingTarget) -> dict[str, str]:
    runs = mlflow_client.search_runs([target.experiment_id], f"tags.`{PARENT_TAG}` = '{target.parent_run_id}'",
                                     max_results=10000)
    return {run.data.tags[TRIAL_TAG]: run.info.run_id for run in runs if TRIAL_TAG in run.data.tags}


def finish_search_run(record: SearchRecord, uri: str | None = None) -> TrackingTarget | None:
    """Replay spools, then put each trial's final status on its child run and the search's results
    on the parent. Safe to repeat. Returns the target, or None if the server is still unreachable."""
    target = load_target(record.storage, uri)
    if target is None:
        raise ConfigError("search", record.storage.name, f"a search that was tracked (no {RUN_FILE} in its folder)")
    try:
        mlflow_client = client(target.uri)
        if target.parent_run_id is None:
            target = _with_parent(mlflow_client, target, record.config, record.storage.folder)
            _save_target(record.storage, target)
        for spool in sorted(Path(target.spool_dir).glob("*.jsonl")):
            replay_spool(mlflow_client, target, spool)
        children = _child_runs(mlflow_client, target)
        for row in record.trials:  # ASHA-stopped trials never say so themselves; Ray's record is the truth
            run_id = children.get(row["trial_id"]) or find_or_create_child(mlflow_client, target, row["trial_id"],
                                                                           row["params"])
            set_status(mlflow_client, run_id, row["status"])
        _log_results(mlflow_client, target.parent_run_id, record)
        mlflow_client.set_terminated(target.parent_run_id, "FINISHED")
    except ConfigError:
        raise
    except Exception as error:
        print(f"softprompt: could not log to tracking server {target.uri}, unreachable? "
              f"({one_line(error)}); nothing is lost: `softprompt mlflow sync {record.storage.name}` "
              f"logs the search when it is back", file=sys.stderr, flush=True)
        return None
    return target


def _log_results(mlflow_client, run_id: str, record: SearchRecord) -> None:
    from mlflow.entities import Metric, RunTag

    mlflow_client.set_tag(run_id, "softprompt.statuses", json.dumps(record.statuses()))
    if not record.evaluated():  # nothing to name
        return
    cfg, best = record.config, record.best()
    now = int(time.time() * 1000)
    metrics = {f"winner_{cfg.metric}": best["metric"], "trials": len(record.trials)}
    if best["test_accuracy"] is not None:
        metrics["winner_test_accuracy"] = best["test_accuracy"]
    if best["confirmed"] is not None:  # what the winner was picked by
        metrics[f"winner_{CONFIRMED[cfg.metric]}"] = best["confirmed"]
    if "point" in best:  # with seeds the winner is a point, picked by its seeds' mean
        point = best["point"]
        metrics.update({f"winner_mean_{cfg.metric}": point["mean"], "winner_seeds": point["n"],
                        **({f"winner_sd_{cfg.metric}": point["sd"]} if point["sd"] is not None else {})})
    tags = {"softprompt.best_trial": best["trial_id"],
            "softprompt.best_params": json.dumps(best["params"], default=str)}
    mlflow_client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                            tags=[RunTag(k, v) for k, v in tags.items()])
    mlflow_client.log_artifacts(run_id, best["prompt"], "winning_prompt")
    _log_verdict(mlflow_client, run_id, record.summary_of(best["trial_id"]))
    _log_optuna_plots(mlflow_client, run_id, cfg, record.storage.folder)
    from softprompt.models.checkpoint import load_checkpoint
    checkpoint = load_checkpoint(best["prompt"])
    mlflow_client.log_table(run_id, nearest_tokens_table(checkpoint.prompt, checkpoint.meta["backbone"]),
                            "nearest_tokens.json")


def _log_verdict(mlflow_client, run_id: str, summary: dict | None) -> None:
    """The winner's test accuracy against zero-shot, from the search's summary, if any."""
    from mlflow.entities import Metric

    if summary is None:
        return
    now = int(time.time() * 1000)
    metrics = {"winner_test_accuracy": summary["test_accuracy"],
               "zero_shot_test_accuracy": summary["zero_shot_test_accuracy"]}
    mlflow_client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    mlflow_client.set_tag(run_id, "softprompt.beats_zero_shot", str(summary["beats_zero_shot"]).lower())


def _on_parent(search: SearchStorage, log: Callable[[object, str], None], later: str) -> str | None:
    """`log(client, parent run id)` for a tracked search; returns that run id, or None where the search was
    not tracked (or sync creates its parent later) or the server cannot be reached (a line says `later`)."""
    target = load_target(search)
    if target is None or target.parent_run_id is None:
        return None
    try:
        log(client(target.uri), target.parent_run_id)
    except Exception as error:
        print(f"softprompt: could not log to tracking server {target.uri} ({one_line(error)}); {later}",
              file=sys.stderr, flush=True)
        return None
    return target.parent_run_id


def log_verdict(search: SearchStorage, summary: dict) -> None:
    """Put the summary's winner-against-zero-shot on a tracked search's parent run; where the server
    cannot be reached, `softprompt mlflow sync` logs it later."""
    _on_parent(search, lambda mlflow_client, run_id: _log_verdict(mlflow_client, run_id, summary),
               f"`softprompt mlflow sync {search.name}` logs the result later")


def log_report(search: SearchStorage, files: list[Path]) -> str | None:
    """Put `softprompt search report`'s files on a tracked search's parent run (under report/); returns
    the run id, or None where it was not tracked or the server cannot be reached."""
    def log(mlflow_client, run_id: str) -> None:
        for path in files:
            mlflow_client.log_artifact(run_id, str(path), "report")
    return _on_parent(search, log, f"`softprompt search report {search.name}` logs the report once it is back")


def _log_optuna_plots(mlflow_client, run_id: str, cfg: SearchConfig, folder: Path) -> None:
    """Optimization history, parameter importances and parallel coordinates, as PNG images."""
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as plots

    study = optuna.load_study(study_name=cfg.name, storage=f"sqlite:///{folder / STUDY_FILE}")
    for plot in (plots.plot_optimization_history, plots.plot_param_importances, plots.plot_parallel_coordinate):
        try:
            figure = optuna_figure(plot, study)
        except (ValueError, RuntimeError) as error:  # e.g. importances need 2+ finished trials
            mlflow_client.log_text(run_id, str(error), f"optuna/{plot.__name__}.txt")
            continue
        mlflow_client.log_figure(run_id, figure, f"optuna/{plot.__name__}.png")
        plt.close(figure)


def optuna_figure(plot: Callable, study):
    """One of Optuna's matplotlib plots of `study`, made readable: Optuna prints a float choice in full
    (0.06666666666666667) and draws every plot 6.4 inches wide, so floats get three significant digits
    and each axis of the parallel coordinates an inch and a half. (A log-scale parameter's axis Optuna
    already draws by decade.)"""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.ticker

    with warnings.catch_warnings():  # Optuna's "experimental" notes and matplotlib's flat-axis
        warnings.simplefilter("ignore")  # note would end every search's output: noise to a user
        axes = plot(study)
    figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
    for axis in (axis for ax in figure.axes for axis in (ax.xaxis, ax.yaxis)):
        if isinstance(axis.get_major_locator(), matplotlib.ticker.FixedLocator):  # ticks Optuna labelled: choices
            axis.set_major_formatter(_three_digits(axis.get_major_formatter()))
    figure.set_size_inches(max(figure.get_figwidth(), 1.5 * len(figure.axes)), figure.get_figheight())
    figure.tight_layout()  # the rotated parameter names fit below
    return figure


def _three_digits(written: Callable[[float, int], str]) -> Callable[[float, int], str]:
    """A tick formatter: `written`'s labels, those that are floats to three significant digits."""
    def label(value: float, position: int) -> str:
        text = written(value, position)
        try:
            return format(float(text), ".3g")
        except ValueError:
            return text
    return label


def nearest_tokens_table(prompt, model: str, k: int = NEAREST_TOKENS) -> dict[str, list]:
    """Each prompt vector's k nearest vocabulary tokens by cosine (the paper's interpretability view).
    Only the embedding matrix is read, unscaled: a model that scales its embeddings (Gemma, by
    sqrt(width)) scales every row alike, and cosine ignores a global scale."""
    import torch

    from softprompt.models.tensors import input_embeddings

    embeddings, tokenizer = input_embeddings(model)
    vocab = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    cosine = torch.nn.functional.normalize(prompt.float(), dim=-1) @ vocab.T
    top = cosine.topk(k, dim=-1)
    table = {"position": [], "rank": [], "token": [], "cosine": []}
    for position in range(prompt.shape[0]):
        for rank, (score, token) in enumerate(zip(top.values[position].tolist(), top.indices[position].tolist())):
            table["position"].append(position)
            table["rank"].append(rank + 1)
            table["token"].append(tokenizer.decode([token]))
            table["cosine"].append(round(score, 4))
    return table
