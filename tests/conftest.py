"""Shared fixtures: the SmolLM2 tokenizer, tiny random Llama and T5 backbones built on it (saved to
disk and loaded through `load_backbone`, so the real loading code runs), and the real SmolLM2.
Shared helpers, imported by the test modules (`from conftest import ...`): a test-sized search, a free
port, a search's Optuna trials, `softprompt` in a process of its own, and a driver that one of its own
trials stops (Ctrl-C or a kill) at a named point."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from softprompt.models.backbone import load_backbone
from softprompt.models.hub import OFFLINE_MODELS

torch.set_num_threads(1)  # the tiny models' ops are too small to gain from threads; test_learning asks for 2


def package_folders() -> dict[str, Path]:
    """Each installed package and the repository folder it comes from (pyproject.toml maps the rooms, top-level
    folders here, under `softprompt`)."""
    root = Path(__file__).resolve().parents[1]
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {package: root / setuptools["package-dir"].get(package, package.replace(".", "/"))
            for package in setuptools["packages"]}


# ---- running the suite in several processes (`make test`: pytest -n 4 --dist loadgroup) ----
# Seconds the slowest tests took under `make test` (rounded; from --durations). Only the order of the
# work depends on them: the longest groups are dealt out first, so no process is left with one at the end.
SLOW_TESTS = {
    "test_a_driver_killed_mid_search_on_s3_resumes_elsewhere_with_nothing_lost": 95,
    "test_a_shared_search_whose_driver_was_killed_resumes_to_its_end_on_the_server_it_left": 75,
    "test_killing_the_server_fails_only_its_trials_which_resume_from_their_checkpoints": 150,
    "test_ctrl_c_stops_a_seeded_search_without_scoring_a_winner_and_its_resume_reruns_nothing_and_runs_each_seed_once":
        100,
    "test_a_winner_that_does_not_beat_zero_shot_is_called_out_in_the_summary_best_and_mlflow": 85,
    "test_small_search_runs_the_default_point_first_and_asha_prunes_weak_trials": 85,
    "test_a_trial_fused_with_three_others_ends_with_the_prompt_it_reaches_alone_on_the_server": 75,
    "test_checkpoints_appear_at_the_requested_steps_and_each_loads_as_a_backbone": 90,
    "test_a_job_killed_while_its_snapshot_was_rewritten_resumes_from_the_newest_complete_state": 125,
    "test_a_search_explores_the_adapted_checkpoints_with_their_adaptation_steps": 50,
    "test_a_trial_resumes_from_its_newest_complete_checkpoint_or_starts_over_and_nothing_is_lost": 40,
    "test_a_searcher_state_a_kill_left_unreadable_is_rebuilt_from_the_study_and_the_search_completes": 30,
    "test_a_tracking_server_stopped_during_a_search_loses_nothing": 60,
    "test_a_search_on_s3_keeps_tune_state_checkpoints_and_its_own_files_there": 55,
    "test_the_driver_scores_the_winner_on_its_whole_test_split_and_says_how_many": 55,
    "test_the_forking_interpreter_has_no_project_module_loaded": 50,
    "test_mlflow_ui_prints_a_link_that_opens_on_the_search_s_trials_in_a_browser": 50,
    "test_a_search_that_a_diverged_trial_ended_resumes_to_its_end": 45,
    "test_serve_status_and_stop_manage_an_application_on_a_cluster": 30,  # with its module's Serve tests: ~60
    "test_serve_in_the_foreground_answers_and_stops_on_ctrl_c": 60,
}


def _shared_instances(item) -> set[tuple]:
    """The module-scoped fixture instances a test uses: (module, fixture, its parameter)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return {(item.module.__name__, name, repr(params.get(name)))
            for name, defs in item._fixtureinfo.name2fixturedefs.items() if defs and defs[-1].scope == "module"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist's loadgroup, one group per set of tests that share a module-scoped fixture
    instance (a fixture parametrized twice makes two groups): each such fixture is built once, in one
    process, and everything else spreads over the processes. The longest groups are sent first."""
    misplaced = [item.nodeid for item in items
                 if item.get_closest_marker("no_ray") and "ray_cluster" in item.fixturenames]
    if misplaced:
        raise pytest.UsageError(f"marked no_ray but uses the session's Ray: {misplaced}")
    if not getattr(config.option, "loadgroup", False):  # set in xdist's workers, where `dist` reads "no"
        return
    parent = list(range(len(items)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[tuple, int] = {}
    for i, item in enumerate(items):
        for instance in _shared_instances(item):
            parent[root(i)] = root(owner.setdefault(instance, i))
    weight: dict[int, float] = {}
    for i, item in enumerate(items):
        weight[root(i)] = weight.get(root(i), 0.0) + SLOW_TESTS.get(item.originalname, 0.5)
    for i, item in enumerate(items):
        item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}-{root(i)}"))
    items[:] = [items[i] for i in sorted(range(len(items)), key=lambda i: (-weight[root(i)], root(i), i))]


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    return AutoTokenizer.from_pretrained(OFFLINE_MODELS["smollm2-135m"]())


def _save_tiny(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(smollm2_tokenizer, tmp_path_factory):
    """A randomly initialised 2-layer Llama on SmolLM2's vocabulary. The initializer range is wider
    than the default so that a wrong position id or a leaked pad token changes the scores visibly."""
    tok = smollm2_tokenizer
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True,
                         initializer_range=0.2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return _save_tiny(LlamaForCausalLM(config), tok, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_t5_dir(smollm2_tokenizer, tmp_path_factory):
    tok = smollm2_tokenizer
    config = T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2,
                      decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    return _save_tiny(T5ForConditionalGeneration(config), tok, tmp_path_factory.mktemp("tiny-t5"))


# float32, whatever `auto` picks on the machine: these check the scoring path's logic to 1e-5, which
# is only measurable in float32. bfloat16 has its own tests (tests/test_precision.py).
@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    return load_backbone(str(tiny_llama_dir), "float32", device=torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny_t5(tiny_t5_dir):
    return load_backbone(str(tiny_t5_dir), "float32", device=torch.device("cpu"))


@pytest.fixture(scope="session")
def smollm2():
    return load_backbone("smollm2-135m", "float32", device=torch.device("cpu"))


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray cluster for the whole session (starting one costs seconds and ~1 GiB). It declares
    one logical GPU, so fractional-GPU packing can be tested on a CPU machine; a trial's device
    is still chosen by torch.cuda.is_available(), not by Ray's GPU ids."""
    import os

    import ray

    from softprompt.search.tuner import give_local_workers_env

    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    give_local_workers_env()  # as `softprompt search run` starts its local Ray
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, configure_logging=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def repository_stays_clean():
    """Tests write only under tmp folders: MLflow's habit of creating ./mlruns, or a CLI run's
    default sqlite store, must not leak into the checkout."""
    from pathlib import Path

    root = Path(__file__).parents[1]
    watched = ["mlruns", "mlartifacts", "mlflow.db", "runs"]
    before = {name for name in watched if (root / name).exists()}
    yield
    leaked = {name for name in watched if (root / name).exists()} - before
    assert not leaked, f"the test session created {sorted(leaked)} in {root}"


# ---- helpers the test modules import ----

def tiny_search_values(model_dir, folder: Path, **overrides) -> dict:
    """A search sized for a test: 2 trials of 4 steps on the tiny model, 64 training and 16 dev examples,
    one trial at a time (each trial process costs seconds of CPU to start; one, reused, serves both).
    A trial confirms its prompt on 8 more dev examples, and the driver's verdict scores 16 test examples
    (a search's own defaults are 500 and the whole test split, what a user wants and a test does not need).
    `train` overrides are merged into the trial fields; every other key replaces the search field."""
    values = {"name": "tiny", "trials": 2, "max_steps": 4, "concurrency": 1, "scheduler": "none",
              "metric": "best_dev_accuracy", "storage_path": str(folder / "runs"), "seed": 0,
              "train": {"model": str(model_dir), "task": "rotten_tomatoes", "batch_size": 4, "eval_every": 2,
                        "max_eval_examples": 16, "max_train_examples": 64, "confirm_examples": 8,
                        "max_test_examples": 16, "output_dir": str(folder)}}
    for key, value in overrides.items():
        values[key] = {**values["train"], **value} if key == "train" else value
    if values.get("sampler") == "grid" and "trials" not in overrides:
        del values["trials"]  # a grid runs each of its cells once
    return values


def tiny_search(model_dir, folder: Path, **overrides):
    """tiny_search_values, validated: a SearchConfig."""
    from softprompt.search.config import search_config

    return search_config(tiny_search_values(model_dir, folder, **overrides))


def tiny_search_file(model_dir, folder: Path, **overrides) -> Path:
    """tiny_search_values as a config file (`softprompt search run FILE`), named after the search."""
    values = tiny_search_values(model_dir, folder, **overrides)
    path = folder / f"{values['name']}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def study_trials(cfg) -> list:
    """The search's Optuna trials, from its study on local storage."""
    import optuna

    from softprompt.search.storage import SearchStorage

    folder = SearchStorage(cfg.storage_path, cfg.name).folder
    return optuna.load_study(study_name=cfg.name, storage=f"sqlite:///{folder / 'optuna.db'}").trials


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SOFTPROMPT = [sys.executable, "-m", "softprompt"]


def on_session_ray() -> dict:
    """The environment of a command that joins this session's Ray cluster (ray_cluster must be running)."""
    import ray

    return {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}


def softprompt(*args: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`softprompt ARGS` in a process of its own; its output captured."""
    return subprocess.run([*SOFTPROMPT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


class StubTune:
    """What the trainable (trainables/trainable.py) reads of `ray.tune`, without Ray: a checkpoint to resume
    from (or none), and the reports, each with a copy of its checkpoint folder."""

    def __init__(self, keep: Path, resume_from: Path | None = None):
        self.keep, self.resume_from, self.reports = keep, resume_from, []
        self.Checkpoint = SimpleNamespace(from_directory=lambda folder: shutil.copytree(
            folder, keep / f"checkpoint_{len(self.reports)}"))

    def get_checkpoint(self):
        folder = self.resume_from
        return folder and SimpleNamespace(as_directory=lambda: contextlib.nullcontext(str(folder)))

    def report(self, metrics: dict, checkpoint=None) -> None:
        self.reports.append(metrics)


# ---- a driver stopped at a named point, by one of its trials ----

STOP_FILE = "stop.json"  # in the search's train.output_dir: which trial stops the driver, when and how


def _start_number(folder: Path) -> int:
    """This trial's place in the order trials started (1, 2, ...), claimed with a file each."""
    number = 1
    while True:
        try:
            os.close(os.open(folder / f"started-{number}", os.O_CREAT | os.O_EXCL))
            return number
        except FileExistsError:
            number += 1


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def stops_the_driver(config, base, metric, mode, gpu_fraction=0.0, tracking=None, **options):
    """The real trainable; but the trial that starts as number `trial` (STOP_FILE), once its step-`step`
    checkpoint is registered and Tune's saved state names it and shows the trials before it ended, sends
    the driver `signal` and parks until the driver is gone or Tune stops it. Where the driver stops is
    then certain, not a race between the test and the trials."""
    import signal
    import time

    from ray import tune

    from softprompt.search.record import COMPLETED, SearchRecord
    from softprompt.trainables.trainable import tune_trial

    folder = Path(base["output_dir"])
    stop = json.loads((folder / STOP_FILE).read_text())
    report = tune.report

    def saved_as_expected() -> bool:
        before = {key: os.environ.get(key) for key in stop["env"]}
        os.environ.update(stop["env"])  # what reading the search's storage takes (an S3 endpoint, keys)
        try:
            rows = SearchRecord.load(stop["storage_path"], stop["name"]).trials
        except Exception:
            return False
        finally:  # as it was: the worker's later trials reach storage as a cluster's would
            for key, value in before.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        mine = [r for r in rows if r["trial_id"] == tune.get_context().get_trial_id()]
        return (sum(r["status"] == COMPLETED for r in rows) >= stop["trial"] - 1 and len(mine) == 1
                and mine[0]["step"] == stop["step"] and mine[0]["prompt"] is not None)

    def report_then_stop(metrics, checkpoint=None):
        report(metrics, checkpoint=checkpoint)  # returns once the driver has registered the checkpoint
        if metrics["step"] != stop["step"]:
            return
        driver = int((folder / "driver.pid").read_text())
        deadline = time.monotonic() + 120  # a guard: Tune saves its state every few seconds
        while not saved_as_expected() and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(driver, getattr(signal, stop["signal"]))
        deadline = time.monotonic() + 300
        while _alive(driver) and time.monotonic() < deadline:
            time.sleep(0.2)
        os._exit(0)  # nothing more from this attempt: the driver that ran it is gone

    if tune.get_checkpoint() is None and _start_number(folder) == stop["trial"]:
        tune.report = report_then_stop
    try:
        tune_trial(config, base, metric, mode, gpu_fraction, tracking, **options)
    finally:
        tune.report = report  # workers are reused by later trials


stops_the_driver.__name__ = "tune_trial"  # Tune resumes a search only with a trainable of the name it started with

# The driver: `softprompt ARGS` with stops_the_driver as the search's trainable.
STOPPED_DRIVER = """
import functools, os, sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])
import conftest, ray
import softprompt.search.tuner as tuner
from softprompt.cli.main import main

ray.cloudpickle.register_pickle_by_value(conftest)  # trial workers cannot import it by name
Path(sys.argv[2], "driver.pid").write_text(str(os.getpid()))
tuner.run_search = functools.partial(tuner.run_search, trainable=conftest.stops_the_driver)
sys.exit(main(sys.argv[3:]))
"""


def run_stopped(config: Path, signal_name: str, trial: int, step: int, *args: str, env: dict,
                log: Path | None = None, storage_env: dict | None = None) -> subprocess.CompletedProcess:
    """`softprompt search run CONFIG ARGS` (the config's trials run one at a time), stopped by `signal_name`
    (SIGINT: Ctrl-C; SIGKILL: a kill, nothing flushed) once the `trial`-th trial to start has its step-`step`
    checkpoint registered and saved in Tune's state, the trials before it finished. `storage_env`: what the
    trial needs in its environment to read that state (the session's workers started without it). Output to
    `log`, or captured."""
    values = yaml.safe_load(config.read_text())
    folder = Path(values["train"]["output_dir"])
    (folder / STOP_FILE).write_text(json.dumps({"signal": signal_name, "trial": trial, "step": step,
                                                "storage_path": values["storage_path"], "name": values["name"],
                                                "env": storage_env or {}}))
    command = [sys.executable, "-c", STOPPED_DRIVER, str(Path(__file__).parent), str(folder), "search", "run",
               str(config), *args]
    if log is None:
        return subprocess.run(command, env=env, cwd=folder, capture_output=True, text=True, timeout=600)
    with open(log, "w") as out:
        return subprocess.run(command, env=env, cwd=folder, stdout=out, stderr=subprocess.STDOUT, text=True,
                              timeout=600)
