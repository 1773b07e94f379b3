"""Resume after a kill, fault by fault (issue 30). A kill lands somewhere in Ray's persistence: while a
trial's checkpoint uploads, while the checkpoint before it is pruned (num_to_keep=1), or while Tune's
own state (trial records, the searcher's pickle) is written. Rather than race a kill against those
writes, each test builds what a kill at one phase leaves on storage, from one real interrupted search,
then resumes and states what must hold: every trial ends completed and nothing is lost.

The interrupted search: 2 trials one at a time, 16 steps, a checkpoint every 4. The first trial
finishes; the second is stopped by a Ctrl-C right after its step-8 checkpoint (checkpoint_000001)
is registered, so Tune's saved state names that checkpoint. It runs once per storage (a folder, and
S3 on a real moto server); each test starts from a byte-for-byte copy of it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import ray
from ray import tune
from ray.train.constants import _get_ray_train_session_dir
from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint
from ray.tune.trainable.metadata import _TrainingRunMetadata
from test_s3 import environment, forget_this_machine, s3, s3_keys  # noqa: F401 (s3 is a fixture)

from softprompt.models.checkpoint import META, TENSORS
from softprompt.search.config import search_config
from softprompt.search.record import SearchRecord
from softprompt.search.resume import experiment_folder, point_trials_at_complete_checkpoints
from softprompt.search.storage import SearchStorage
from softprompt.search.tuner import SearchInterrupted, resume_search, run_search

optuna.logging.set_verbosity(optuna.logging.WARNING)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this module by name
NAME, STOP_STEP = "faulted", 8
ROOT = Path(__file__).resolve().parents[1]


def interrupted_after_step_8(config, base, metric, mode, gpu_fraction=0.0, tracking=None):
    """The real trainable; but the second trial to start, once its step-8 checkpoint is registered,
    sends the driver a Ctrl-C (once per test session) and waits there to be stopped."""
    from softprompt.trainables.trainable import tune_trial

    folder = Path(base["output_dir"])
    try:
        os.close(os.open(folder / "first", os.O_CREAT | os.O_EXCL))
        second = False
    except FileExistsError:
        second = tune.get_checkpoint() is None
    report = tune.report

    def report_then_interrupt(metrics, checkpoint=None):
        report(metrics, checkpoint=checkpoint)  # returns once the driver has registered the checkpoint
        if metrics["step"] == STOP_STEP and not (folder / "interrupted").exists():
            (folder / "interrupted").touch()
            os.kill(int((folder / "driver.pid").read_text()), signal.SIGINT)
            time.sleep(120)  # stopped by Tune long before this ends

    if second:
        tune.report = report_then_interrupt
    try:
        tune_trial(config, base, metric, mode, gpu_fraction, tracking)
    finally:
        tune.report = report  # workers are reused by later trials


interrupted_after_step_8.__name__ = "tune_trial"  # Tune resumes a search only with a trainable of the same name

class Storage:
    """One storage kind's interrupted search, its pristine copy, and the few file operations a fault needs."""

    def __init__(self, kind: str, storage_path: str, s3_server: dict | None, tmp: Path):
        self.kind, self.storage_path, self.s3, self.tmp = kind, storage_path, s3_server, tmp
        self.search = SearchStorage(storage_path, NAME)

    def env(self) -> dict:
        return self.s3["env"] if self.s3 else {}

    @property
    def prefix(self) -> str:
        """The search's folder: a local path, or the key prefix in the bucket."""
        return f"{self.storage_path.split('/', 3)[3]}/{NAME}" if self.s3 else str(self.search.folder)

    def names(self, under: str) -> list[str]:
        """Files under `under` (relative to the search's folder), relative to it."""
        if self.s3:
            return [k[len(self.prefix) + 1:] for k in s3_keys(self.s3, f"{self.prefix}/{under}")]
        root = self.search.folder
        return ([str(p.relative_to(root)) for p in (root / under).rglob("*") if p.is_file()]
                if (root / under).exists() else [])

    def read(self, name: str) -> bytes:
        if self.s3:
            return self.s3["client"].get_object(Bucket=self.s3["bucket"], Key=f"{self.prefix}/{name}")["Body"].read()
        return (self.search.folder / name).read_bytes()

    def write(self, name: str, data: bytes) -> None:
        if self.s3:
            self.s3["client"].put_object(Bucket=self.s3["bucket"], Key=f"{self.prefix}/{name}", Body=data)
        else:
            (self.search.folder / name).parent.mkdir(parents=True, exist_ok=True)
            (self.search.folder / name).write_bytes(data)

    def delete(self, name: str) -> None:
        if self.s3:
            self.s3["client"].delete_object(Bucket=self.s3["bucket"], Key=f"{self.prefix}/{name}")
        else:
            (self.search.folder / name).unlink()

    def copy(self, source: str, target: str) -> None:
        """Copy a folder of the search (a checkpoint) to another name in it."""
        for name in self.names(source):
            self.write(target + name[len(source):], self.read(name))

    def remove(self, folder: str) -> None:
        if not self.s3:
            return shutil.rmtree(self.search.folder / folder)
        for name in self.names(folder):
            self.delete(name)

    def save_pristine(self) -> None:
        self.pristine = {name: self.read(name) for name in self.names("")}

    def restore_pristine(self) -> None:
        """The interrupted search as it was, on storage; resumed as on a machine that never saw it: for
        S3 without the search's mirror, and without the state an earlier resume staged on this Ray node."""
        self.remove("")
        for name, data in self.pristine.items():
            self.write(name, data)
        if self.s3:
            shutil.rmtree(self.search.folder, ignore_errors=True)
        for staged in Path(_get_ray_train_session_dir()).glob(f"*/{NAME}"):
            shutil.rmtree(staged)

    def rows(self) -> dict[str, dict]:
        with environment(self.env()):
            return {r["trial_id"]: r for r in SearchRecord.load(self.storage_path, NAME).trials}

    def results(self, trial_id: str) -> list[dict]:
        return [json.loads(line) for line in self.read(f"trial_{trial_id}/result.json").decode().splitlines()]

    def study(self) -> list[tuple]:
        """The Optuna study on storage: (number, state, params, value) per trial."""
        local = self.tmp / f"study-{time.monotonic_ns()}.db"
        local.write_bytes(self.read("optuna.db"))
        study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{local}")
        return [(t.number, t.state.name, t.params, t.value) for t in study.trials]


@pytest.fixture(scope="module", params=["local", "s3"])
def interrupted(request, ray_cluster, tiny_llama_dir, tmp_path_factory):
    """The interrupted search on one storage kind, with what it held: the running trial's id, the
    finished trial's results, the Optuna trials it had told."""
    tmp = tmp_path_factory.mktemp(f"interrupted-{request.param}")
    if request.param == "s3":
        server = request.getfixturevalue("s3")
        storage = Storage("s3", f"s3://{server['bucket']}/faults", server, tmp)
    else:
        storage = Storage("local", str(tmp / "runs"), None, tmp)
    (tmp / "driver.pid").write_text(str(os.getpid()))
    cfg = search_config({
        "name": NAME, "trials": 2, "max_steps": 16, "concurrency": 1, "scheduler": "none", "seed": 0,
        "metric": "best_dev_accuracy", "storage_path": storage.storage_path,
        "train": {"model": str(tiny_llama_dir), "task": "rotten_tomatoes", "batch_size": 4, "eval_every": 4,
                  "max_eval_examples": 16, "max_train_examples": 64, "confirm_examples": 8,
                  "max_test_examples": 16, "output_dir": str(tmp)}})
    with environment(storage.env()), pytest.raises(SearchInterrupted):
        run_search(cfg, trainable=interrupted_after_step_8)
    rows = storage.rows()
    finished = [tid for tid, r in rows.items() if r["status"] == "completed"]
    running = [tid for tid, r in rows.items() if r["status"] != "completed"]
    assert len(finished) == 1 and len(running) == 1, rows
    storage.save_pristine()
    assert sorted(n for n in storage.names(f"trial_{running[0]}")
                  if "/checkpoint_" in f"/{n}" and n[-1] != "/") == [
        f"trial_{running[0]}/checkpoint_000001/{kind}/{name}"
        for kind in ("best", "current") for name in (META, TENSORS)]
    return {"storage": storage, "finished": finished[0], "running": running[0],
            "finished_results": storage.read(f"trial_{finished[0]}/result.json"),
            "told": [t for t in storage.study() if t[1] == "COMPLETE"]}


def checkpoint(trial_id: str, number: int) -> str:
    return f"trial_{trial_id}/checkpoint_{number:06d}"


def resume(interrupted, capsys) -> list[str]:
    """`search resume` on this machine (for S3: one without the search's mirror); softprompt's own lines."""
    storage = interrupted["storage"]
    capsys.readouterr()
    with environment(storage.env()):
        resume_search(storage.storage_path, NAME)
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("softprompt:")]


def assert_nothing_lost(interrupted) -> list[tuple]:
    """Both trials completed, the finished one not run again, the study's told trial kept and every
    Optuna trial COMPLETE; returns the resumed trial's reports as (step, resumed_from_step, resume_error)."""
    storage, running = interrupted["storage"], interrupted["running"]
    rows = storage.rows()
    assert sorted(rows) == sorted([interrupted["finished"], running])
    assert {tid: r["status"] for tid, r in rows.items()} == {tid: "completed" for tid in rows}
    assert storage.read(f"trial_{interrupted['finished']}/result.json") == interrupted["finished_results"]
    study = storage.study()
    assert [t[1] for t in study] == ["COMPLETE", "COMPLETE"]
    assert all(t in study for t in interrupted["told"])
    return [(r["step"], r.get("resumed_from_step"), r.get("resume_error")) for r in storage.results(running)]


RESUMED_AT_8 = [(4, None, None), (8, None, None), (12, STOP_STEP, None), (16, STOP_STEP, None)]
STARTED_OVER = [(4, None, None), (8, None, None), (12, None, None), (16, None, None)]  # Tune rewrites its results


# Each fault: what a kill at one phase of Ray's persistence leaves of the running trial's checkpoints
# (Tune's state names checkpoint_000001, at step 8), and where the trial must go on from.
def named_gone(storage, tid):
    """Killed after pruning, with the newer checkpoint not yet uploaded: the named one is gone, no other."""
    storage.remove(checkpoint(tid, 1))


def named_gone_newer_half_uploaded(storage, tid):
    """Killed after pruning, while the next checkpoint uploads: only its `current` half is there."""
    storage.copy(f"{checkpoint(tid, 1)}/current", f"{checkpoint(tid, 2)}/current")
    storage.remove(checkpoint(tid, 1))


def named_pruned_newer_complete(storage, tid):
    """Killed after the newer checkpoint was registered and the named one pruned, before the state naming
    the newer one was written."""
    storage.copy(checkpoint(tid, 1), checkpoint(tid, 2))
    storage.remove(checkpoint(tid, 1))


def named_half_pruned_newer_complete(storage, tid):
    """The same, killed midway through the pruning (on S3 a deletion takes a request per file)."""
    storage.copy(checkpoint(tid, 1), checkpoint(tid, 2))
    storage.delete(f"{checkpoint(tid, 1)}/current/{META}")


def named_damaged_older_complete(storage, tid):
    """The named checkpoint cut short (an upload the state got ahead of), its predecessor not yet pruned."""
    storage.copy(checkpoint(tid, 1), checkpoint(tid, 0))
    tensors = f"{checkpoint(tid, 1)}/current/{TENSORS}"
    storage.write(tensors, storage.read(tensors)[:100])


def newer_half_uploaded(storage, tid):
    """Killed while the next checkpoint uploads, before it was registered: the named one is whole."""
    storage.copy(f"{checkpoint(tid, 1)}/best", f"{checkpoint(tid, 2)}/best")


STARTS_OVER = None
FAULTS = [(named_gone, STARTS_OVER), (named_gone_newer_half_uploaded, STARTS_OVER),
          (named_pruned_newer_complete, 2), (named_half_pruned_newer_complete, 2),
          (named_damaged_older_complete, 0), (newer_half_uploaded, 1)]


def said(tid: str, resumes_from: int | None) -> list[str]:
    """softprompt's lines for a trial that resumes from checkpoint number `resumes_from` (1: the named one)."""
    if resumes_from is STARTS_OVER:
        return [f"softprompt: trial {tid} has no complete checkpoint left on storage; it starts over"]
    return [] if resumes_from == 1 else [
        f"softprompt: trial {tid}: checkpoint_000001 on storage is incomplete; it resumes from "
        f"checkpoint_{resumes_from:06d}"]


def named_in_state(storage, tid: str) -> str | None:
    """The checkpoint folder (relative to the search's folder) that Tune's newest state names for trial `tid`."""
    with environment(storage.env()):
        filesystem, folder = experiment_folder(storage.search)
        with filesystem.open_input_stream(_find_newest_experiment_checkpoint(folder, fs=filesystem)) as stream:
            state = json.loads(stream.readall())
    for trial, metadata in state["trial_data"]:
        if json.loads(trial)["trial_id"] == tid:
            named = _TrainingRunMetadata.from_json_state(metadata).checkpoint_manager.latest_checkpoint_result
            return named and "/".join(Path(named.checkpoint.path).parts[-2:])
    raise AssertionError(f"trial {tid} is not in Tune's state")


@pytest.mark.parametrize("fault,resumes_from", FAULTS, ids=[f.__name__ for f, _ in FAULTS])
def test_each_persistence_fault_is_repaired_to_the_trial_s_newest_complete_checkpoint_or_a_start_over(
        interrupted, fault, resumes_from, capsys):
    """What a resume does first (search/resume.py), fault by fault and on both storages: Tune's state then
    names a whole copy of the trial's step-8 checkpoint, or nothing (the trial starts over), and a line says
    which. The resumes below run Tune on each kind of repair."""
    storage, tid = interrupted["storage"], interrupted["running"]
    storage.restore_pristine()
    fault(storage, tid)
    capsys.readouterr()
    with environment(storage.env()):
        point_trials_at_complete_checkpoints(storage.search)
    assert capsys.readouterr().err.splitlines() == said(tid, resumes_from)
    named = named_in_state(storage, tid)
    if resumes_from is STARTS_OVER:
        assert named is None
    else:  # the name Tune restores from, holding the step-8 checkpoint whole
        assert named == checkpoint(tid, 1)
        step_8 = {name: data for name, data in storage.pristine.items() if name.startswith(named + "/")
                  and not name.endswith("/")}  # not S3's folder markers
        assert {name: storage.read(name) for name in storage.names(named) if not name.endswith("/")} == step_8


# A real resume for each kind of repair (see the test above): the state cleared (the trial starts over), a
# complete checkpoint copied to the named one (from an older one here; from a newer one on S3 in
# tests/test_s3.py, whose killed driver leaves named_half_pruned_newer_complete), and none needed (a
# half-uploaded newer checkpoint left where the trial's next one goes); the start-over on S3 too.
RESUMED = [("local", named_gone, STARTS_OVER), ("local", named_damaged_older_complete, 0),
           ("local", newer_half_uploaded, 1), ("s3", named_gone_newer_half_uploaded, STARTS_OVER)]


@pytest.mark.parametrize("interrupted,fault,resumes_from", RESUMED, indirect=["interrupted"],
                         ids=[f"{kind}-{f.__name__}" for kind, f, _ in RESUMED])
def test_a_trial_resumes_from_its_newest_complete_checkpoint_or_starts_over_and_nothing_is_lost(
        interrupted, fault, resumes_from, capsys, caplog):
    storage, tid = interrupted["storage"], interrupted["running"]
    storage.restore_pristine()
    fault(storage, tid)
    lines = resume(interrupted, capsys)
    reports = assert_nothing_lost(interrupted)
    assert not [r for r in caplog.records if "Error handling checkpoint" in r.getMessage()]  # none pruned wrongly
    # each checkpoint here holds step 8 (the copies a test makes are of it)
    assert reports == (STARTED_OVER if resumes_from is STARTS_OVER else RESUMED_AT_8)
    assert lines == said(tid, resumes_from)


@pytest.mark.parametrize("interrupted,how", [("local", "emptied"), ("s3", "cut short")], indirect=["interrupted"])
def test_a_searcher_state_a_kill_left_unreadable_is_rebuilt_from_the_study_and_the_search_completes(
        interrupted, how):
    storage = interrupted["storage"]
    storage.restore_pristine()
    [pickled] = [name for name in storage.names("") if name.startswith("searcher-state-") and name.endswith(".pkl")]
    storage.write(pickled, b"" if how == "emptied" else storage.read(pickled)[:200])
    env = {**os.environ, **storage.env(), "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PYTHONPATH": str(ROOT)}  # this checkout's code, whatever the environment has installed
    with open(storage.tmp / "resume.log", "w") as log:
        resumed = subprocess.run([sys.executable, "-m", "softprompt", "search", "resume", NAME, "--storage-path",
                                  storage.storage_path], env=env, cwd=storage.tmp, stdout=log, stderr=subprocess.STDOUT,
                                 timeout=300)  # a guard only: before the fix this resume hung
    logs = (storage.tmp / "resume.log").read_text()
    assert resumed.returncode == 0, logs[-3000:]
    assert f"softprompt: Tune's searcher state {pickled} is unreadable; the searcher is rebuilt from the Optuna study" \
           in logs.splitlines(), logs[-3000:]
    assert assert_nothing_lost(interrupted) == RESUMED_AT_8
