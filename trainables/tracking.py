"""A trial's MLflow child run: parameters once, every report's metrics with its step, the best
prompt so far as an artifact, and the final status, logged directly (from any node) under the
search's parent run. An unreachable server: records go to a JSONL spool in the search's folder from
the first failure on, in order, for `softprompt mlflow sync` (docs/architecture.md).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from softprompt.errors import one_line

RUN_FILE = "mlflow-run.json"  # in a search's folder, or an LM-adaptation job's state: the MLflow run it logs to
TRIAL_TAG, STATUS_TAG, PARENT_TAG = "softprompt.trial_id", "softprompt.status", "mlflow.parentRunId"
# MLflow retries an unreachable server for minutes by default; a trial must not stall that long.
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# softprompt status -> MLflow run status
RUN_STATUS = {"completed": "FINISHED", "stopped early": "FINISHED", "diverged": "FAILED",
              "out_of_memory": "FAILED", "errored": "FAILED", "unfinished": "KILLED"}

_warned: set[str] = set()


@dataclass(frozen=True)
class TrackingTarget:
    """Where a search logs: handed by the driver to every trial."""
    uri: str
    experiment_id: str | None
    parent_run_id: str | None   # None when the server was unreachable at the search's start
    spool_dir: str


def client(uri: str):
    for key, value in HTTP_SETTINGS.items():
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient  # late: importing mlflow costs seconds
    return MlflowClient(tracking_uri=uri)


def find_or_create_child(mlflow_client, target: TrackingTarget, trial_id: str, params: dict) -> str:
    """The trial's one child run: found by its tag on resume, else created with its parameters."""
    found = mlflow_client.search_runs(
        [target.experiment_id],
        filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`{PARENT_TAG}` = '{target.parent_run_id}'")
    if found:
        return found[0].info.run_id
    from mlflow.entities import Param
    run = mlflow_client.create_run(target.experiment_id, run_name=f"trial_{trial_id}",
                                   tags={PARENT_TAG: target.parent_run_id, TRIAL_TAG: trial_id})
    mlflow_client.log_batch(run.info.run_id, params=[Param(mlflow_param_key(k), str(v)) for k, v in params.items()])
    return run.info.run_id


def mlflow_param_key(name: str) -> str:
    """A tracking server refuses '@' in parameter names (`lr@adamw`, a space's per-branch field);
    the local sqlite store does not check, so both get `lr/adamw`."""
    return name.replace("@", "/")


def numeric_metrics(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and k != "step" and v == v}  # v == v: no NaN


def log_metrics(mlflow_client, run_id: str, metrics: dict[str, float], step: int, timestamp_ms: int) -> None:
    from mlflow.entities import Metric
    mlflow_client.log_batch(run_id, metrics=[Metric(k, v, timestamp_ms, step) for k, v in metrics.items()])


def set_status(mlflow_client, run_id: str, status: str) -> None:
    mlflow_client.set_tag(run_id, STATUS_TAG, status)
    mlflow_client.set_terminated(run_id, RUN_STATUS.get(status, "FINISHED"))


class TrialTracker:
    """Logs one trial; every call is safe to make whether or not the server is reachable."""

    def __init__(self, target: TrackingTarget, trial_id: str, params: dict):
        self.target, self.trial_id, self.params = target, trial_id, params
        self.spool = Path(target.spool_dir) / f"{trial_id}.jsonl"
        self.run_id: str | None = None
        self.client = None
        if target.parent_run_id is None:
            self._go_offline("the search started without a reachable tracking server")
            return
        try:
            self.client = client(target.uri)
            self.run_id = find_or_create_child(self.client, target, trial_id, params)
        except Exception as error:  # any failure to reach the store: spool instead
            self._go_offline(error)

    @property
    def offline(self) -> bool:
        return self.run_id is None

    def _go_offline(self, why) -> None:
        if self.offline and self.spool.exists():
            return
        if self.target.uri not in _warned:  # say so once per process and server
            _warned.add(self.target.uri)
            print(f"softprompt: tracking server {self.target.uri} unreachable ({one_line(why)}); "
                  f"trial records go to {self.spool.parent} until `softprompt mlflow sync` replays them",
                  file=sys.stderr, flush=True)
        self.run_id = None
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        if not self.spool.exists():
            self._write({"kind": "start", "params": {k: str(v) for k, v in self.params.items()}})

    def _write(self, record: dict) -> None:
        with open(self.spool, "a") as handle:
            handle.write(json.dumps({"trial_id": self.trial_id, **record}) + "\n")

    def _attempt(self, online, record: Callable[[], dict]) -> None:
        """`online()`, or where the server cannot be reached the spool record `record()` makes."""
        if not self.offline:
            try:
                online()
                return
            except Exception as error:
                self._go_offline(error)
        self._write(record())

    def log(self, metrics: dict, prompt_folder: Path | None = None) -> None:
        """One report: its numeric metrics at its step, and the best prompt so far."""
        values, step, now = numeric_metrics(metrics), int(metrics.get("step", 0)), int(time.time() * 1000)
        self._attempt(lambda: log_metrics(self.client, self.run_id, values, step, now),
                      lambda: {"kind": "metrics", "metrics": values, "step": step, "timestamp": now})
        if prompt_folder is not None and Path(prompt_folder).is_dir():
            self.log_prompt(Path(prompt_folder))

    def log_prompt(self, folder: Path) -> None:
        def spooled() -> dict:
            copy = self.spool.parent / self.trial_id / "prompt"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(folder, copy)
            return {"kind": "prompt", "folder": str(copy)}
        self._attempt(lambda: self.client.log_artifacts(self.run_id, str(folder), "prompt"), spooled)

    def finish(self, status: str) -> None:
        self._attempt(lambda: set_status(self.client, self.run_id, status),
                      lambda: {"kind": "status", "status": status})


def replay_spool(mlflow_client, target: TrackingTarget, spool: Path) -> int:
    """Log a spooled trial's records; the spool is renamed `.synced` afterwards. Returns records replayed."""
    records = [json.loads(line) for line in spool.read_text().splitlines() if line.strip()]
    if not records:
        return 0
    trial_id = records[0]["trial_id"]
    params = next((r["params"] for r in records if r["kind"] == "start"), {})
    run_id = find_or_create_child(mlflow_client, target, trial_id, params)
    for record in records:
        if record["kind"] == "metrics":
            log_metrics(mlflow_client, run_id, record["metrics"], record["step"], record["timestamp"])
        elif record["kind"] == "prompt" and Path(record["folder"]).is_dir():
            mlflow_client.log_artifacts(run_id, record["folder"], "prompt")
        elif record["kind"] == "status":
            set_status(mlflow_client, run_id, record["status"])
    spool.rename(spool.with_suffix(".synced"))
    return len(records)
