"""The search driver: Ray Tune trials over an Optuna define-by-run space with ASHA early
stopping, resumable, with the winner's held-out accuracy next to the zero-shot baseline."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings
from pathlib import Path

import optuna
import ray
import yaml
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from search.config import ConfigError, SearchConfig
from search.jobs import WORKER_ENV
from spaces import DEFAULT_POINTS, SPACES, CustomSpace
from trainables.config import TrainConfig
from trainables.tasks import is_task_file
from trainables.trainable import tune_trial

SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
# The search metric's counterpart on the confirm split (trainables.loop.final_metrics); none for train_loss.
CONFIRMED = {"best_dev_accuracy": "confirmed_dev_accuracy", "dev_accuracy": "confirmed_dev_accuracy",
             "dev_f1": "confirmed_dev_f1"}
CONFIG_FILE, SUMMARY_FILE, STUDY_FILE = "softprompt-search.yaml", "softprompt-summary.json", "optuna.db"


class AshaAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna a trial ASHA stopped early was PRUNED. Ray's own class
    reports it COMPLETE with its truncated metric, which TPE then mistakes for a finished run.
    A trial that finished reports status completed/diverged last; a stopped one is still running."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if error or not result or result.get("status") != "running" or trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error)
        ot_trial = self._ot_trials[trial_id]
        with warnings.catch_warnings():  # the stopping result may already be reported at this step
            warnings.simplefilter("ignore")
            ot_trial.report(result[self.metric], result["training_iteration"])
        self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)


def experiment_dir(storage_path: str, name: str) -> Path:
    return Path(storage_path).expanduser().resolve() / name


def _space_function(cfg: SearchConfig):
    space = SPACES[cfg.space] if isinstance(cfg.space, str) else CustomSpace(cfg.space)
    return functools.partial(space, checkpoints=list(cfg.checkpoints))


def _points(cfg: SearchConfig) -> list[dict]:
    points = list(cfg.points_to_evaluate) if cfg.points_to_evaluate is not None else (
        [DEFAULT_POINTS[cfg.space]] if isinstance(cfg.space, str) and cfg.space in DEFAULT_POINTS else [])
    if len(cfg.checkpoints) > 1:  # the first checkpoint listed is the paper's (LM-adapted) default
        points = [{"model": cfg.checkpoints[0], **p} for p in points]
    return points


def _base_fields(cfg: SearchConfig) -> dict:
    base = cfg.train.to_dict()
    if is_task_file(base["task"]):  # trials may run with another working directory
        base["task"] = str(Path(base["task"]).resolve())
    return base


def build_trainable(cfg: SearchConfig, trainable=tune_trial, tracking=None):
    tracked = {"tracking": tracking} if tracking else {}  # a trainable need not know about tracking
    with_params = tune.with_parameters(trainable, base=_base_fields(cfg), metric=cfg.metric, mode=cfg.mode,
                                       gpu_fraction=cfg.gpus_per_trial, **tracked)
    return tune.with_resources(with_params, {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def build_tuner(cfg: SearchConfig, trainable=tune_trial, tracking=None) -> tune.Tuner:
    folder = experiment_dir(cfg.storage_path, cfg.name)
    folder.mkdir(parents=True, exist_ok=True)
    searcher = AshaAwareOptunaSearch(
        space=_space_function(cfg), metric=cfg.metric, mode=cfg.mode, points_to_evaluate=_points(cfg) or None,
        sampler=SAMPLERS[cfg.sampler](seed=cfg.seed),
        storage=optuna.storages.RDBStorage(f"sqlite:///{folder / STUDY_FILE}"), study_name=cfg.name)
    scheduler = (ASHAScheduler(time_attr="step", metric=cfg.asha_metric, mode=cfg.asha_mode, max_t=cfg.train.max_steps,
                               grace_period=cfg.grace_period, reduction_factor=cfg.reduction_factor)
                 if cfg.scheduler == "asha" else FIFOScheduler())
    return tune.Tuner(
        build_trainable(cfg, trainable, tracking),
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=cfg.trials,
            max_concurrent_trials=cfg.concurrency, reuse_actors=True, time_budget_s=cfg.time_limit_s,
            trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(
            name=cfg.name, storage_path=str(folder.parent),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures), verbose=1))


def save_search_config(cfg: SearchConfig) -> None:
    folder = experiment_dir(cfg.storage_path, cfg.name)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def load_saved_config(storage_path: str, name: str) -> SearchConfig:
    path = experiment_dir(storage_path, name) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError("search name", name, f"a search under {Path(storage_path).resolve()} "
                                               f"(no {CONFIG_FILE} there)")
    values = yaml.safe_load(path.read_text())
    train = values["train"]
    values["train"] = TrainConfig(**{**train, "eval_steps": tuple(train["eval_steps"]) if train.get("eval_steps") else None})
    values["checkpoints"] = tuple(values["checkpoints"])
    values.setdefault("asha_metric", values["metric"])  # saved before ASHA's metric could differ
    if values["points_to_evaluate"] is not None:
        values["points_to_evaluate"] = tuple(values["points_to_evaluate"])
    return SearchConfig(**values)


def give_local_workers_env() -> None:
    """A local Ray started after this call runs its workers with WORKER_ENV: they inherit this
    process's environment (glibc reads MALLOC_ARENA_MAX once, when a process starts)."""
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)


def ensure_ray(cfg: SearchConfig) -> None:
    """Join the cluster named by RAY_ADDRESS (a submitted job), else start a local Ray."""
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    # Snapshotting after each checkpoint is what num_to_keep=1 asks for; the warning is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):  # a submitted job: its runtime env carries WORKER_ENV
            ray.init(include_dashboard=False, configure_logging=False)
        else:
            give_local_workers_env()
            ray.init(include_dashboard=False, configure_logging=False, logging_level="WARNING")


def run_search(cfg: SearchConfig, trainable=tune_trial, tracking_uri: str | None = None) -> tune.ResultGrid:
    """Start a new search; refuses to overwrite a finished or interrupted one of the same name.
    With `tracking_uri`, MLflow gets one parent run for the search and a child run per trial."""
    folder = experiment_dir(cfg.storage_path, cfg.name)
    if (folder / CONFIG_FILE).exists():
        raise ConfigError("name", cfg.name, f"a new search name: {folder} exists "
                                            f"(`softprompt search resume {cfg.name}` continues it)")
    ensure_ray(cfg)
    save_search_config(cfg)
    if tracking_uri is None:
        return build_tuner(cfg, trainable).fit()
    from search.tracking import finish_search_run, start_search_run  # it imports this module
    results = build_tuner(cfg, trainable, start_search_run(cfg, tracking_uri)).fit()
    finish_search_run(cfg.storage_path, cfg.name)
    return results


def resume_search(storage_path: str, name: str, trainable=tune_trial, tracking_uri: str | None = None) -> tune.ResultGrid:
    """Continue an interrupted search: finished trials are kept, unfinished ones resume from
    their last checkpoint, errored ones are retried. A tracked search keeps logging to its parent
    run (or to a new one at `tracking_uri`)."""
    from search.tracking import finish_search_run, load_target, start_search_run  # it imports this module

    cfg = load_saved_config(storage_path, name)
    ensure_ray(cfg)
    saved = load_target(storage_path, name)
    uri = tracking_uri or (saved.uri if saved else None)
    tracking = start_search_run(cfg, uri) if uri else None
    tuner = tune.Tuner.restore(str(experiment_dir(storage_path, name)),
                               trainable=build_trainable(cfg, trainable, tracking),
                               resume_unfinished=True, resume_errored=True)
    results = tuner.fit()
    if tracking:
        finish_search_run(storage_path, name)
    return results


def trial_status(trial_state: str, last: dict) -> str:
    if trial_state == "ERROR":
        return "errored"
    if trial_state != "TERMINATED":
        return "unfinished"
    return {"running": "stopped early", "completed": "completed"}.get(last.get("status"), last.get("status", "?"))


def trial_rows(storage_path: str, name: str) -> list[dict]:
    """One row per trial: id, status, parameters, last step and metrics (`confirmed`: the search
    metric on the confirm split, for trials that ran to the end), checkpoint folder."""
    from ray.tune import ExperimentAnalysis

    folder = experiment_dir(storage_path, name)
    cfg = load_saved_config(storage_path, name)
    analysis = ExperimentAnalysis(str(folder))
    rows = []
    for trial in analysis.trials:
        last = trial.last_result or {}
        checkpoint = trial.checkpoint.path if trial.checkpoint else None
        rows.append({"trial_id": trial.trial_id, "status": trial_status(trial.status, last),
                     "params": trial.config, "step": last.get("step"), "metric": last.get(cfg.metric),
                     "confirmed": last.get(CONFIRMED.get(cfg.metric, "")), "test_accuracy": last.get("test_accuracy"),
                     "prompt": f"{checkpoint}/best" if checkpoint else None})
    return rows


def ranked_trials(storage_path: str, name: str) -> list[dict]:
    """The evaluated trials with a prompt, best first. Trials confirmed on further dev examples
    come first, by that score: a search metric like best_dev_accuracy is the largest of several
    small-sample scores, and a lucky one would win otherwise. The rest follow by the metric.
    A search with no such trial is an error."""
    mode = load_saved_config(storage_path, name).mode
    rows = [r for r in trial_rows(storage_path, name) if r["metric"] is not None and r["prompt"]]
    if not rows:
        raise ConfigError("search", name, "a search with at least one evaluated trial")
    return rank_rows(rows, mode)


def rank_rows(rows: list[dict], mode: str) -> list[dict]:
    """`trial_rows` rows best first: confirmed ones by `confirmed`, then the rest by `metric`
    (`mode` max or min); on a tie, a completed trial first."""
    sign = 1 if mode == "max" else -1
    return sorted(rows, reverse=True, key=lambda r: (r["confirmed"] is not None, r["confirmed"] or 0.0,
                                                     sign * r["metric"], r["status"] == "completed"))


def best_trial(storage_path: str, name: str) -> dict:
    return ranked_trials(storage_path, name)[0]


def write_summary(storage_path: str, name: str, summary: dict) -> Path:
    path = experiment_dir(storage_path, name) / SUMMARY_FILE
    path.write_text(json.dumps(summary, indent=2, default=str))
    return path
