"""The search driver: Ray Tune trials over an Optuna define-by-run space with ASHA early
stopping, resumable, with the winner's held-out accuracy next to the zero-shot baseline."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import threading
import warnings
from pathlib import Path

import optuna
import ray
import yaml
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from search.config import SEARCH_DEFAULTS, ConfigError, SearchConfig
from search.jobs import WORKER_ENV
from search.storage import CONFIG_FILE, STUDY_FILE, SUMMARY_FILE, SearchStorage, WorkingCopyStorage, copy_study
from spaces import DEFAULT_POINTS, SPACES, CustomSpace
from trainables.config import TrainConfig
from trainables.tasks import is_task_file
from trainables.trainable import tune_trial

SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
# The search metric's counterpart on the confirm split (trainables.loop.final_metrics); none for train_loss.
CONFIRMED = {"best_dev_accuracy": "confirmed_dev_accuracy", "dev_accuracy": "confirmed_dev_accuracy",
             "best_dev_f1": "confirmed_dev_f1", "dev_f1": "confirmed_dev_f1"}


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

    def save_to_dir(self, checkpoint_dir: str, session_str: str = "default"):
        """Tune's state snapshot. A search on a URI adds a copy of its study, which Tune uploads with
        the rest: a resumed search gets the two in step (search/storage.py)."""
        super().save_to_dir(checkpoint_dir, session_str)
        if isinstance(self._storage, WorkingCopyStorage):
            copy_study(self._storage.search.study_file, Path(checkpoint_dir) / STUDY_FILE)


def experiment_dir(storage_path: str, name: str) -> Path:
    """The search's folder on this machine: for a URI, its local mirror (search/storage.py)."""
    return SearchStorage(storage_path, name).folder


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
    search = SearchStorage(cfg.storage_path, cfg.name)
    searcher = AshaAwareOptunaSearch(
        space=_space_function(cfg), metric=cfg.metric, mode=cfg.mode, points_to_evaluate=_points(cfg) or None,
        sampler=SAMPLERS[cfg.sampler](seed=cfg.seed), storage=search.optuna_storage(), study_name=cfg.name)
    storage_path, filesystem = search.tune_storage()
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
            name=cfg.name, storage_path=storage_path, storage_filesystem=filesystem,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures), verbose=1))


def save_search_config(cfg: SearchConfig) -> None:
    SearchStorage(cfg.storage_path, cfg.name).write_text(CONFIG_FILE, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def load_saved_config(storage_path: str, name: str) -> SearchConfig:
    """The search's saved config; for a URI, with the search's own files brought to this machine first."""
    search = SearchStorage(storage_path, name)
    path = search.pull() / CONFIG_FILE
    if not path.is_file():
        raise ConfigError("search name", name, f"a search under {search.location.rsplit('/', 1)[0]} "
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
    """Join the cluster named by RAY_ADDRESS (a submitted job), else start a local Ray; then refuse
    a search whose trials the cluster can never hold (search/resources.py)."""
    from search.resources import check_cluster

    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    # Snapshotting after each checkpoint is what num_to_keep=1 asks for; the warning is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    started_here = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):  # a submitted job: its runtime env carries WORKER_ENV
            ray.init(include_dashboard=False, configure_logging=False)
        else:
            give_local_workers_env()
            ray.init(include_dashboard=False, configure_logging=False, logging_level="WARNING")
    check_cluster(cfg.cpus_per_trial, cfg.gpus_per_trial, started_here)


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a search: Tune has saved it, and the message says how to continue it."""

    def __init__(self, storage_path: str, name: str):
        where = "" if storage_path == SEARCH_DEFAULTS["storage_path"] else f" --storage-path {storage_path}"
        super().__init__(f"search {name} stopped; `softprompt search resume {name}{where}` continues it")


def _second_interrupt(signum, frame):
    raise KeyboardInterrupt  # while Tune saves the search after a first Ctrl-C: stop at once


def fit_unless_interrupted(tuner: tune.Tuner, storage_path: str, name: str) -> tune.ResultGrid:
    """`tuner.fit()`, or SearchInterrupted after Ctrl-C. Tune's fit() catches the first Ctrl-C, saves
    the search and returns as if it had ended; its handler then puts back the one it found, this
    function's, which is how the interrupt shows."""
    if threading.current_thread() is not threading.main_thread():  # no signal handlers off the main thread
        return tuner.fit()
    previous = signal.signal(signal.SIGINT, _second_interrupt)
    try:
        results = tuner.fit()
        interrupted = (signal.getsignal(signal.SIGINT) is _second_interrupt
                       and not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0")))  # then Tune never catches it
    finally:
        signal.signal(signal.SIGINT, previous)  # Tune leaves its own handler behind otherwise
    if interrupted:
        raise SearchInterrupted(storage_path, name)
    return results


def run_search(cfg: SearchConfig, trainable=tune_trial, tracking_uri: str | None = None) -> tune.ResultGrid:
    """Start a new search; refuses to overwrite a finished or interrupted one of the same name.
    With `tracking_uri`, MLflow gets one parent run for the search and a child run per trial."""
    search = SearchStorage(cfg.storage_path, cfg.name)
    if search.exists():
        raise ConfigError("name", cfg.name, f"a new search name: {search.location} exists "
                                            f"(`softprompt search resume {cfg.name}` continues it)")
    search.start()
    ensure_ray(cfg)
    save_search_config(cfg)
    if tracking_uri is None:
        return fit_unless_interrupted(build_tuner(cfg, trainable), cfg.storage_path, cfg.name)
    from search.tracking import finish_search_run, start_search_run  # it imports this module
    tuner = build_tuner(cfg, trainable, start_search_run(cfg, tracking_uri))
    results = fit_unless_interrupted(tuner, cfg.storage_path, cfg.name)
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
    tuner = restore_tuner(storage_path, name, build_trainable(cfg, trainable, tracking))
    results = fit_unless_interrupted(tuner, storage_path, name)
    if tracking:
        finish_search_run(storage_path, name)
    return results


def restore_tuner(storage_path: str, name: str, trainable) -> tune.Tuner:
    """Tune's saved search, to continue. For a URI, the study copy saved with Tune's last state
    becomes this machine's working copy first: the searcher that Tune unpickles opens it."""
    search = SearchStorage(storage_path, name)
    if search.remote:
        search.download(STUDY_FILE, search.study_file)
    _put_back_deleted_checkpoints(search)
    return tune.Tuner.restore(search.tune_path(), trainable=trainable, resume_unfinished=True, resume_errored=True,
                              storage_filesystem=search.tune_storage()[1])


def _put_back_deleted_checkpoints(search: SearchStorage) -> None:
    """Tune deletes a trial's previous checkpoint (num_to_keep=1) as soon as it registers the next
    one, and uploads the state that names the next one only afterwards. A driver killed in between
    (a wider gap on S3, where a deletion takes several requests) leaves an unfinished trial naming a
    checkpoint that is gone or half gone, and its restore fails. The newer one is complete (Tune
    registers a checkpoint once it is stored): copy it to where the state looks."""
    import pyarrow.fs
    from ray.tune import ExperimentAnalysis

    def files(filesystem, path: str) -> int:
        return sum(info.is_file for info in filesystem.get_file_info(
            pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True)))

    try:
        trials = ExperimentAnalysis(search.tune_path(), storage_filesystem=search.tune_storage()[1]).trials
    except ValueError:  # no state saved yet: Tuner.restore says so
        return
    for trial in trials:
        if trial.status == "TERMINATED" or trial.checkpoint is None:
            continue
        filesystem, path = trial.checkpoint.filesystem, trial.checkpoint.path
        newest = max((info.path for info in filesystem.get_file_info(pyarrow.fs.FileSelector(str(Path(path).parent)))
                      if info.type == pyarrow.fs.FileType.Directory and Path(info.path).name.startswith("checkpoint_")),
                     key=lambda p: Path(p).name, default=None)
        if newest is None or Path(newest).name <= Path(path).name or files(filesystem, path) >= files(filesystem, newest):
            continue  # the named checkpoint is the newest, or whole: a newer one may be half written
        if filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
            filesystem.delete_dir(path)
        pyarrow.fs.copy_files(newest, path, source_filesystem=filesystem, destination_filesystem=filesystem)


def trial_status(trial_state: str, last: dict) -> str:
    if trial_state == "ERROR":
        return "errored"
    if trial_state != "TERMINATED":
        return "unfinished"
    return {"running": "stopped early", "completed": "completed"}.get(last.get("status"), last.get("status", "?"))


def trial_rows(storage_path: str, name: str) -> list[dict]:
    """One row per trial: id, status, parameters, last step and metrics (`confirmed`: the search
    metric on the confirm split, for trials that ran to the end), and `prompt`: the best prompt's
    folder (for a search on a URI, its URI: `SearchStorage.local_copy` brings it here)."""
    from ray.tune import ExperimentAnalysis

    cfg = load_saved_config(storage_path, name)
    search = SearchStorage(storage_path, name)
    analysis = ExperimentAnalysis(search.tune_path(), storage_filesystem=search.tune_storage()[1])
    rows = []
    for trial in analysis.trials:
        last = trial.last_result or {}
        checkpoint = trial.checkpoint.path if trial.checkpoint else None
        rows.append({"trial_id": trial.trial_id, "status": trial_status(trial.status, last),
                     "params": trial.config, "step": last.get("step"), "metric": last.get(cfg.metric),
                     "confirmed": last.get(CONFIRMED.get(cfg.metric, "")), "test_accuracy": last.get("test_accuracy"),
                     "prompt": search.remote_location(f"{checkpoint}/best") if checkpoint else None})
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
    """The winner (`ranked_trials`), its `prompt` a folder on this machine."""
    best = ranked_trials(storage_path, name)[0]
    return {**best, "prompt": str(SearchStorage(storage_path, name).local_copy(best["prompt"]))}


def read_summary(storage_path: str, name: str, trial_id: str | None = None) -> dict | None:
    """The summary `search run|resume` wrote with the winner against zero-shot; None if there is none,
    or (given `trial_id`) if it was written for another winner."""
    path = experiment_dir(storage_path, name) / SUMMARY_FILE
    summary = json.loads(path.read_text()) if path.is_file() else {}
    if "beats_zero_shot" not in summary or trial_id not in (None, summary["best_trial"]):
        return None
    return summary


def write_summary(storage_path: str, name: str, summary: dict) -> Path:
    return SearchStorage(storage_path, name).write_text(SUMMARY_FILE, json.dumps(summary, indent=2, default=str))
