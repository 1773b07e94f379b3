"""The search driver: runs and resumes Ray Tune trials over an Optuna define-by-run space with ASHA
early stopping. What a search found is read by search/record.py, its winner judged by search/verdict.py."""
from __future__ import annotations

import fnmatch
import logging
import os
import pickletools
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
import pyarrow.fs
import ray
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from softprompt.backbone_server.server import IDLE_EXIT_S
from softprompt.configfile import ConfigError
from softprompt.models.manifest import adaptation_steps
from softprompt.models.tasks import is_task_file
from softprompt.search.config import SearchConfig
from softprompt.search.console import TrialLines
from softprompt.search.jobs import WORKER_ENV
from softprompt.search.record import RUNNING, SearchRecord, read_config, save_config
from softprompt.search.resources import check_cluster
from softprompt.search.resume import experiment_folder, point_trials_at_complete_checkpoints
from softprompt.search.rules import STORAGE_PATH
from softprompt.search.seeds import SeedRepeater
from softprompt.search.servers import server_key, stop_servers
from softprompt.search.storage import STUDY_FILE, SearchStorage, WorkingCopyStorage, copy_study
from softprompt.search.tracking import finish_search_run, load_target, start_search_run
from softprompt.spaces import DEFAULT_POINTS, SPACES, CustomSpace
from softprompt.trainables.config import ADAPTATION_STEPS
from softprompt.trainables.trainable import tune_trial

TUNE_TRIAL_ID = "tune_trial_id"  # the Optuna trial's user attribute naming its Tune trial


class TuneGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid, without its stop at the last cell: Tune asks for exactly one trial per cell
    (num_samples), and study.stop() outside study.optimize raises, which ended the last cell's trial
    as errored when ASHA had stopped it."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def startup_trials(trials: int) -> int:
    """TPE's random start-up points for a search of `trials` points: a quarter, 2 to 10. Optuna's fixed 10
    suits searches of a hundred trials; it turned a search of 10 or fewer into random search."""
    return max(2, min(10, trials // 4))


def build_sampler(cfg: SearchConfig, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """The search's Optuna sampler (seeded with `seed`, default the search's); a grid's cells are its
    space's choices (search.config allows no other)."""
    seed = cfg.seed if seed is None else seed
    if cfg.sampler == "grid":
        return TuneGridSampler(CustomSpace(cfg.space, cfg.checkpoints).grid(), seed=seed)
    if cfg.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.startup_trials or startup_trials(cfg.trials))
    return optuna.samplers.RandomSampler(seed=seed)


class AshaAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna a trial ASHA stopped early was PRUNED. Ray's own class
    reports it COMPLETE with its truncated metric, which TPE then mistakes for a finished run.
    A trial that finished reports status completed/diverged last; a stopped one is still running.
    Each Optuna trial records its Tune trial's id, from which a resume can rebuild this searcher."""

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        self._ot_trials[trial_id].set_user_attr(TUNE_TRIAL_ID, trial_id)
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if error or not result or result.get("status") != RUNNING or trial_id in self._completed_trials:
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


class SpaceWithAdaptation:
    """The search's space; a trial on a checkpoint an LM-adaptation manifest lists also records that
    checkpoint's adaptation steps, for tables and MLflow (the trainable ignores it)."""

    def __init__(self, cfg: SearchConfig):
        self.space = SPACES[cfg.space] if isinstance(cfg.space, str) else CustomSpace(cfg.space, cfg.checkpoints)
        self.checkpoints, self.steps = list(cfg.checkpoints), adaptation_steps(cfg.checkpoints)

    def __call__(self, trial) -> dict:
        constants = self.space(trial, checkpoints=self.checkpoints)
        model = trial.params.get("model", self.checkpoints[0])
        return {**constants, ADAPTATION_STEPS: self.steps[model]} if model in self.steps else constants


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
    shared = {"shared": server_key(cfg.name, cfg.storage_path)} if cfg.shared_backbone else {}
    # ASHA comparing training losses needs no dev score at a rung, and the kept prompt's (best_dev_*) can wait
    # until the trial is known to go on: a trial stopped there never scores dev (rung_signals.md: this early,
    # dev accuracy does not say how a trial ends)
    later = {"score_after_report": True} if cfg.scheduler == "asha" and cfg.asha_metric == "train_loss" and \
        cfg.metric.startswith("best_dev_") else {}
    with_params = tune.with_parameters(trainable, base=_base_fields(cfg), metric=cfg.metric, mode=cfg.mode,
                                       gpu_fraction=cfg.gpus_per_trial, **tracked, **shared, **later)
    return tune.with_resources(with_params, {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def build_searcher(cfg: SearchConfig, points_to_evaluate: list[dict] | None,
                   sampler: optuna.samplers.BaseSampler) -> AshaAwareOptunaSearch:
    """The search's searcher on its Optuna study, created or, if it exists, opened."""
    return AshaAwareOptunaSearch(space=SpaceWithAdaptation(cfg), metric=cfg.metric, mode=cfg.mode,
                                 points_to_evaluate=points_to_evaluate, sampler=sampler, study_name=cfg.name,
                                 storage=SearchStorage(cfg.storage_path, cfg.name).optuna_storage())


def build_tuner(cfg: SearchConfig, trainable=tune_trial, tracking=None, verbose: bool = False) -> tune.Tuner:
    """The search's Tuner. It prints a line per trial event (search/console.py); Ray's tables only if `verbose`."""
    search = SearchStorage(cfg.storage_path, cfg.name)
    searcher = build_searcher(cfg, _points(cfg) or None, build_sampler(cfg))
    if cfg.seeds > 1:
        searcher = SeedRepeater(searcher, cfg.seeds, cfg.train.seed)
    storage_path, filesystem = search.tune_storage()
    scheduler = (ASHAScheduler(time_attr="step", metric=cfg.asha_metric, mode=cfg.asha_mode, max_t=cfg.train.max_steps,
                               grace_period=cfg.grace_period, reduction_factor=cfg.reduction_factor)
                 if cfg.scheduler == "asha" else FIFOScheduler())
    return tune.Tuner(
        build_trainable(cfg, trainable, tracking),
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=cfg.trials * cfg.seeds,
            max_concurrent_trials=cfg.concurrency, reuse_actors=True, time_budget_s=cfg.time_limit_s,
            trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(
            name=cfg.name, storage_path=storage_path, storage_filesystem=filesystem,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            callbacks=[TrialLines(cfg.metric, cfg.mode)], verbose=1 if verbose else 0))


def quiet_driver(verbose: bool = False) -> None:
    """The driver's console is the trial events' (search/console.py): Ray Tune's experiment box and
    tables (its new output engine prints a box even when silent; the old one at verbosity 0 prints
    nothing), Optuna's and MLflow's start-up notes only with `verbose`."""
    os.environ["RAY_AIR_NEW_OUTPUT"] = "1" if verbose else "0"
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.INFO if verbose else logging.WARNING)


def give_local_workers_env() -> None:
    """A local Ray started after this call runs its workers with WORKER_ENV: they inherit this
    process's environment (glibc reads MALLOC_ARENA_MAX once, when a process starts)."""
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)


def _not_the_token_auth_notice(record: logging.LogRecord) -> bool:
    """Ray 2.60 notes at every start that token auth is on (the safe default, once ~/.ray/auth_token
    exists): a line between a command and its answer. Its warning that auth is off still shows."""
    return not record.getMessage().startswith("Token authentication is enabled")


def ensure_ray(cfg: SearchConfig) -> None:
    """Join the cluster named by RAY_ADDRESS (a submitted job), else start a local Ray; then refuse
    a search whose trials the cluster can never hold (search/resources.py)."""
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    # Snapshotting after each checkpoint is what num_to_keep=1 asks for; the warning is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    started_here = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_not_the_token_auth_notice)
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
        where = "" if storage_path == STORAGE_PATH else f" --storage-path {storage_path}"
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


def run_search(cfg: SearchConfig, trainable=tune_trial, tracking_uri: str | None = None,
               announce: Callable[[], None] = lambda: None, verbose: bool = False) -> tune.ResultGrid:
    """Start a new search; refuses to overwrite a finished or interrupted one of the same name.
    With `tracking_uri`, MLflow gets one parent run for the search and a child run per trial.
    `announce` runs once the search's storage and its trials' resources are checked, before it starts."""
    search = SearchStorage(cfg.storage_path, cfg.name)
    if search.exists():
        raise ConfigError("name", cfg.name, f"a new search name: {search.location} exists "
                                            f"(`softprompt search resume {cfg.name}` continues it)")
    search.start()
    ensure_ray(cfg)
    quiet_driver(verbose)
    announce()
    save_config(cfg)
    tracking = start_search_run(cfg, tracking_uri) if tracking_uri else None
    return _fit(build_tuner(cfg, trainable, tracking, verbose), search, tracking, cfg)


def resume_search(storage_path: str, name: str, trainable=tune_trial,
                  tracking_uri: str | None = None) -> tune.ResultGrid:
    """Continue an interrupted search: finished trials are kept, unfinished ones resume from
    their last checkpoint, errored ones are retried. A tracked search keeps logging to its parent
    run (or to a new one at `tracking_uri`)."""
    search = SearchStorage(storage_path, name)
    cfg = read_config(search)
    ensure_ray(cfg)
    quiet_driver()
    saved = load_target(search)
    uri = tracking_uri or (saved.uri if saved else None)
    tracking = start_search_run(cfg, uri) if uri else None
    return _fit(restore_tuner(search, build_trainable(cfg, trainable, tracking), cfg), search, tracking, cfg)


def _fit(tuner: tune.Tuner, search: SearchStorage, tracking, cfg: SearchConfig) -> tune.ResultGrid:
    """Run the search to its end, then close a tracked one's parent run with its results. Its
    backbone servers, if it shares backbones, stop when it ends or is interrupted."""
    try:
        results = fit_unless_interrupted(tuner, search.storage_path, search.name)
    finally:
        if cfg.shared_backbone:
            try:
                stop_servers(server_key(cfg.name, cfg.storage_path))
            except Exception as error:  # Ray gone: its servers with it; never hide the search's own error
                print(f"softprompt: could not stop the search's backbone servers ({error}); an idle one exits "
                      f"after {IDLE_EXIT_S // 60} min", file=sys.stderr)
    if tracking:
        finish_search_run(SearchRecord.load(search.storage_path, search.name))
    return results


def restore_tuner(search: SearchStorage, trainable, cfg: SearchConfig) -> tune.Tuner:
    """Tune's saved search, to continue. For a URI, the study copy saved with Tune's last state
    becomes this machine's working copy first: the searcher that Tune unpickles opens it. What a kill
    may have left half written is repaired first: trials' checkpoints (search/resume.py), the searcher."""
    if search.remote:
        search.download(STUDY_FILE, search.study_file)
    point_trials_at_complete_checkpoints(search)
    rebuild_unreadable_searcher(search, cfg)
    return tune.Tuner.restore(search.tune_path(), trainable=trainable, resume_unfinished=True, resume_errored=True,
                              storage_filesystem=search.tune_storage()[1])


def rebuild_unreadable_searcher(search: SearchStorage, cfg: SearchConfig) -> None:
    """A searcher state that a kill emptied or cut short (Tune's newest searcher-state pickle) is
    written anew from the Optuna study, which holds every trial it was told. Tune would otherwise
    fail to read it, and its resume hung."""
    filesystem, folder = experiment_folder(search)
    found = sorted(info.path for info in filesystem.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
                   if fnmatch.fnmatch(Path(info.path).name, OptunaSearch.CKPT_FILE_TMPL.format("*")))
    if not found:
        return
    with filesystem.open_input_stream(found[-1]) as stream:
        if _is_whole_pickle(stream.readall()):
            return
    study = optuna.load_study(study_name=cfg.name, storage=search.optuna_storage())
    # Reseeded: the search's own seed would draw the points its first trials drew, again.
    searcher = build_searcher(cfg, None, build_sampler(cfg, seed=cfg.seed + len(study.trials)))
    for frozen in study.trials:
        if TUNE_TRIAL_ID in frozen.user_attrs:
            trial_id = frozen.user_attrs[TUNE_TRIAL_ID]
            searcher._ot_trials[trial_id] = optuna.trial.Trial(searcher._ot_study, frozen._trial_id)
            if frozen.state.is_finished():
                searcher._completed_trials.add(trial_id)
    with tempfile.TemporaryDirectory() as local:
        searcher.save(f"{local}/searcher.pkl")
        with filesystem.open_output_stream(found[-1]) as stream:
            stream.write(Path(f"{local}/searcher.pkl").read_bytes())
    print(f"softprompt: Tune's searcher state {Path(found[-1]).name} is unreadable; the searcher is rebuilt "
          f"from the Optuna study", file=sys.stderr)


def _is_whole_pickle(data: bytes) -> bool:
    """Whether `data` is a complete pickle, read without running it."""
    try:
        for _ in pickletools.genops(data):
            pass
    except ValueError:  # pickle exhausted before seeing STOP, or an unknown opcode
        return False
    return bool(data)
