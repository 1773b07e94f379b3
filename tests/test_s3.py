"""Searches on S3 (issue 15), against a real S3 server this module starts: moto's server mode on
127.0.0.1 with a bucket of its own. Every check that says "another machine" first deletes the
search's local mirror, which is all such a machine would lack.

The session's Ray workers were started before this module set any AWS variable: they reach the
server because the storage filesystem travels to them with its endpoint, as it does on a cluster
(where the nodes' own role or environment supplies credentials).
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import boto3
import numpy as np
import optuna
import pytest
import ray
import yaml
from conftest import SOFTPROMPT, STOP_FILE, free_port, on_session_ray, run_stopped
from mlflow.tracking import MlflowClient
from moto.server import ThreadedMotoServer

from softprompt.cli.main import main
from softprompt.models.checkpoint import META, TENSORS, load_checkpoint
from softprompt.models.hub import cache_dir
from softprompt.search.config import search_config
from softprompt.search.record import SearchRecord, rank_rows
from softprompt.search.storage import CONFIG_FILE, RUN_FILE, STUDY_FILE, SUMMARY_FILE, SearchStorage
from softprompt.search.tracking import SEARCH_TAG
from softprompt.search.tuner import run_search
from softprompt.trainables.tracking import PARENT_TAG, STATUS_TAG, TRIAL_TAG

optuna.logging.set_verbosity(optuna.logging.WARNING)
SECRET = "sk-softprompt-s3-secret-7d2e01"  # the secret access key the drivers run with
REGION = "us-east-1"


@pytest.fixture(scope="module")
def s3():
    """A running S3 server with an empty bucket; its mirrors under SOFTPROMPT_CACHE go at the end."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint, bucket = f"http://127.0.0.1:{port}", f"softprompt-test-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION,
                          aws_access_key_id="AKIATESTSOFTPROMPT", aws_secret_access_key=SECRET)
    client.create_bucket(Bucket=bucket)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "AKIATESTSOFTPROMPT", "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}
    yield {"endpoint": endpoint, "bucket": bucket, "client": client, "env": env}
    server.stop()
    shutil.rmtree(cache_dir() / "searches" / "s3" / bucket, ignore_errors=True)


@contextlib.contextmanager
def environment(values: dict):
    with pytest.MonkeyPatch.context() as patch:
        for key, value in values.items():
            patch.setenv(key, value)
        yield


def s3_keys(s3, prefix: str) -> list[str]:
    pages = s3["client"].get_paginator("list_objects_v2").paginate(Bucket=s3["bucket"], Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def s3_bytes(s3, key: str) -> bytes:
    return s3["client"].get_object(Bucket=s3["bucket"], Key=key)["Body"].read()


def study_on_s3(s3, key: str, name: str, folder: Path) -> list[tuple]:
    """The Optuna study as the S3 copy holds it: (number, state, params, value) per trial."""
    local = folder / f"study-{uuid.uuid4().hex[:6]}.db"
    local.write_bytes(s3_bytes(s3, key))
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{local}")
    return [(t.number, t.state.name, t.params, t.value) for t in study.trials]


def pairs(items) -> list[str]:
    """(parameters, metric) pairs, comparable as a sorted list."""
    return sorted(json.dumps(item, sort_keys=True) for item in items)


def forget_this_machine(storage_path: str, name: str) -> None:
    """What another machine lacks: the search's local mirror (its files, the study's working copy)."""
    shutil.rmtree(SearchStorage(storage_path, name).folder)


def until_its_trial_actors_are_gone(started_ms: int) -> None:
    """A killed driver's trial actors die with it once the cluster notices; Ray's record marks them
    DEAD before their processes end, and one still running may write a checkpoint. Wait for both
    (Ray's public state API needs the dashboard, which the session's cluster does not run)."""
    def running(actor) -> bool:
        try:
            return Path(f"/proc/{actor['Pid']}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            return False

    mine, deadline = ray.get_runtime_context().get_job_id(), time.monotonic() + 120
    while time.monotonic() < deadline and any(
            running(actor) for actor in ray._private.state.actors().values()
            if actor["JobID"] != mine and actor["StartTime"] >= started_ms):
        time.sleep(0.2)


def search_values(model_dir, storage_path: str, name: str, folder: Path, **overrides) -> dict:
    return {"name": name, "trials": 2, "max_steps": 8, "concurrency": 1, "scheduler": "none",
            "metric": "best_dev_accuracy", "storage_path": storage_path, "seed": 0,
            "train": {"model": str(model_dir), "task": "rotten_tomatoes", "batch_size": 4, "eval_every": 4,
                      "max_eval_examples": 16, "max_train_examples": 64, "confirm_examples": 8,
                      "max_test_examples": 16, "output_dir": str(folder)}, **overrides}


# ---- a search on S3, read back from another machine ----

@pytest.fixture(scope="module")
def finished_on_s3(s3, ray_cluster, tiny_llama_dir, tmp_path_factory):
    """A tracked two-trial search with storage_path s3://BUCKET/searches, the endpoint given in the
    URI (no AWS_ENDPOINT_URL anywhere)."""
    tmp = tmp_path_factory.mktemp("on-s3")
    storage_path = f"s3://{s3['bucket']}/searches?endpoint_override={s3['endpoint']}"
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = search_config(search_values(tiny_llama_dir, storage_path, "on-s3", tmp))
    env = {k: v for k, v in s3["env"].items() if k != "AWS_ENDPOINT_URL"}
    with environment(env):
        run_search(cfg, tracking_uri=uri)
    return {"cfg": cfg, "uri": uri, "tmp": tmp, "env": env}


def test_a_search_on_s3_keeps_tune_state_checkpoints_and_its_own_files_there(s3, finished_on_s3):
    cfg = finished_on_s3["cfg"]
    keys = s3_keys(s3, "searches/on-s3/")
    for own in (CONFIG_FILE, STUDY_FILE, RUN_FILE, "tuner.pkl"):
        assert f"searches/on-s3/{own}" in keys
    assert any(k.startswith("searches/on-s3/experiment_state-") for k in keys)
    with environment(finished_on_s3["env"]):
        rows = SearchRecord.load(cfg.storage_path, cfg.name).trials
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows)
    for row in rows:  # each trial's prompt is on S3, where the row says
        assert row["prompt"].startswith(f"s3://{s3['bucket']}/searches/on-s3/trial_{row['trial_id']}/checkpoint_")
        assert row["prompt"].split("://", 1)[1].split("/", 1)[1] + f"/{TENSORS}" in keys
    # the study on S3 is the search's: one COMPLETE trial per Tune trial, with its parameters and metric
    optuna_trials = study_on_s3(s3, f"searches/on-s3/{STUDY_FILE}", cfg.name, finished_on_s3["tmp"])
    assert pairs((t[2], t[3]) for t in optuna_trials) == pairs((r["params"], r["metric"]) for r in rows)
    assert {t[1] for t in optuna_trials} == {"COMPLETE"}
    assert yaml.safe_load(s3_bytes(s3, f"searches/on-s3/{CONFIG_FILE}"))["name"] == "on-s3"


def test_status_best_export_and_mlflow_sync_read_a_search_from_s3_alone(s3, finished_on_s3, capsys):
    cfg, tmp = finished_on_s3["cfg"], finished_on_s3["tmp"]
    with environment(finished_on_s3["env"]):
        forget_this_machine(cfg.storage_path, cfg.name)
        assert main(["search", "status", cfg.name, "--storage-path", cfg.storage_path]) == 0
        status = capsys.readouterr().out.splitlines()
        rows = SearchRecord.load(cfg.storage_path, cfg.name).trials
        for row in rows:
            assert [line.split()[1] for line in status if line.startswith(row["trial_id"])] == ["completed"]
        assert f"{cfg.name}: 2 of 2 trials started (2 completed)" in status

        forget_this_machine(cfg.storage_path, cfg.name)
        assert main(["search", "best", cfg.name, "--storage-path", cfg.storage_path, "--json"]) == 0
        best = json.loads(capsys.readouterr().out)
        winner = rank_rows(rows, cfg.mode)[0]
        assert best["trial_id"] == winner["trial_id"]
        prompt = Path(best["prompt"])  # a copy on this machine, byte for byte what S3 holds
        assert prompt.is_relative_to(SearchStorage(cfg.storage_path, cfg.name).folder)
        key = winner["prompt"].split("://", 1)[1].split("/", 1)[1]
        assert (prompt / TENSORS).read_bytes() == s3_bytes(s3, f"{key}/{TENSORS}")

        forget_this_machine(cfg.storage_path, cfg.name)
        out = tmp / "export" / "winner.npy"
        assert main(["export", cfg.name, "--storage-path", cfg.storage_path, "--format", "npy", "--out", str(out),
                     "--tracking-uri", "none"]) == 0
        assert np.array_equal(np.load(out), load_checkpoint(prompt).prompt.numpy())

        forget_this_machine(cfg.storage_path, cfg.name)
        assert main(["mlflow", "sync", cfg.name, "--storage-path", cfg.storage_path]) == 0
    assert "synced to" in capsys.readouterr().out
    client = MlflowClient(finished_on_s3["uri"])
    parents = client.search_runs([client.get_experiment_by_name("softprompt").experiment_id],
                                 f"tags.`{SEARCH_TAG}` = '{cfg.name}'")
    assert len(parents) == 1 and parents[0].data.tags["softprompt.best_trial"] == winner["trial_id"]
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id)} >= {"winning_prompt", "optuna"}


def test_a_missing_search_or_bucket_and_an_unreachable_server_are_one_line_errors(s3, tiny_llama_dir, tmp_path, capsys,
                                                                                  monkeypatch):
    for key, value in s3["env"].items():
        monkeypatch.setenv(key, value)
    assert main(["search", "status", "ghost", "--storage-path", f"s3://{s3['bucket']}/searches"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"softprompt: error: search name = 'ghost' is not allowed: a search under s3://{s3['bucket']}/searches "
        f"(no {CONFIG_FILE} there)"]

    config = tmp_path / "search.yaml"
    nowhere = search_values(tiny_llama_dir, "s3://softprompt-no-such-bucket/x", "nowhere", tmp_path)
    config.write_text(yaml.safe_dump(nowhere))
    assert main(["search", "run", str(config), "--tracking-uri", "none"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "storage_path = 's3://softprompt-no-such-bucket/x' is not allowed" in lines[0]
    assert "bucket 'softprompt-no-such-bucket' does not exist there" in lines[0]

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert main(["search", "best", "on-s3", "--storage-path", f"s3://{s3['bucket']}/searches"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "that this machine can reach" in lines[0], lines


# ---- a driver killed mid-search, resumed on "another machine" ----

@pytest.fixture(scope="module")
def killed_on_s3_and_resumed(s3, ray_cluster, tiny_llama_dir, tmp_path_factory):
    """A search on S3 of 3 trials, one at a time, whose driver process is SIGKILLed by its second trial once
    that trial's step-4 checkpoint is registered and named in Tune's state on S3, the first trial finished; it
    is tracked in MLflow and runs with the cloud key and tracking tokens in its environment.
    The local mirror is deleted, and the gap a kill may land in is made (Tune deletes a trial's previous
    checkpoint when it registers the next one, and uploads the state that names the next one only
    afterwards): the running trial's named checkpoint is half deleted, a newer one beside it. Then
    `softprompt search resume` continues the search. Returns what S3 held before and after."""
    tmp = tmp_path_factory.mktemp("killed-on-s3")
    storage_path, name, prefix = f"s3://{s3['bucket']}/killed", "killed", "killed/killed/"
    config = tmp / "search.yaml"
    config.write_text(yaml.safe_dump(search_values(tiny_llama_dir, storage_path, name, tmp, trials=3, concurrency=1,
                                                   max_steps=24)))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = {**on_session_ray(), **s3["env"], "MLFLOW_TRACKING_PASSWORD": SECRET, "MLFLOW_TRACKING_TOKEN": SECRET}
    started_ms = int(time.time() * 1000)
    killed = run_stopped(config, "SIGKILL", 2, 4, "--tracking-uri", uri, env=env, log=tmp / "run.log",
                         storage_env=s3["env"])
    assert killed.returncode == -signal.SIGKILL, (tmp / "run.log").read_text()[-3000:]
    until_its_trial_actors_are_gone(started_ms)

    def snapshot(folder: Path) -> dict:
        with environment(s3["env"]):
            rows = {r["trial_id"]: r for r in SearchRecord.load(storage_path, name).trials}
        keys = s3_keys(s3, prefix)
        results = {tid: s3_bytes(s3, f"{prefix}trial_{tid}/result.json") for tid in rows
                   if f"{prefix}trial_{tid}/result.json" in keys}
        client = MlflowClient(uri)
        parents = client.search_runs([client.get_experiment_by_name("softprompt").experiment_id],
                                     f"tags.`{SEARCH_TAG}` = '{name}'")
        children = client.search_runs([parents[0].info.experiment_id],
                                      f"tags.`{PARENT_TAG}` = '{parents[0].info.run_id}'")
        return {"rows": rows, "results": results, "keys": keys, "parents": parents,
                "children": {c.data.tags[TRIAL_TAG]: c for c in children},
                "optuna": study_on_s3(s3, f"{prefix}{STUDY_FILE}", name, folder)}

    before = snapshot(tmp)
    running = next(r for r in before["rows"].values() if r["status"] == "unfinished" and r["prompt"])
    named = running["prompt"].split("://", 1)[1].split("/", 1)[1].removesuffix("/best")
    newer = f"{named[:-6]}{int(named[-6:]) + 1:06d}"
    for key in s3_keys(s3, f"{named}/"):
        s3["client"].copy_object(Bucket=s3["bucket"], Key=newer + key[len(named):],
                                 CopySource={"Bucket": s3["bucket"], "Key": key})
    s3["client"].delete_object(Bucket=s3["bucket"], Key=f"{named}/current/{META}")
    newest = max(k for k in s3_keys(s3, named.rsplit("/", 1)[0]) if k.endswith(f"/current/{META}"))
    running = {**running, "newest_step": json.loads(s3_bytes(s3, newest))["step"]}
    forget_this_machine(storage_path, name)  # a new machine: no mirror, no working copy of the study
    with open(tmp / "resume.log", "w") as log:
        resumed = subprocess.run([*SOFTPROMPT, "search", "resume", name, "--storage-path", storage_path],
                                 env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, timeout=500)
    return {"before": before, "after": snapshot(tmp), "resume_code": resumed.returncode, "prefix": prefix,
            "running": running, "logs": (tmp / "run.log").read_text() + (tmp / "resume.log").read_text(),
            "folders": [tmp, SearchStorage(storage_path, name).folder]}


def test_a_driver_killed_mid_search_on_s3_resumes_elsewhere_with_nothing_lost(s3, killed_on_s3_and_resumed):
    before, after = killed_on_s3_and_resumed["before"], killed_on_s3_and_resumed["after"]
    running, logs = killed_on_s3_and_resumed["running"], killed_on_s3_and_resumed["logs"]
    states = (("before", before), ("after", after))
    seen = "\n".join([f"{when}: trials {[(tid, r['status'], r['step']) for tid, r in state['rows'].items()]}, "
                       f"Optuna {[t[:2] for t in state['optuna']]}" for when, state in states]
                      + [f"running {running}", logs[-4000:]])
    assert killed_on_s3_and_resumed["resume_code"] == 0, seen
    finished = {tid for tid, r in before["rows"].items() if r["status"] == "completed"}
    assert len(finished) == 1 and running["step"] == 4, seen
    # every trial there, and a finished trial not run again: its results on S3 unchanged
    assert [r["status"] for r in after["rows"].values()] == ["completed"] * 3, seen
    for tid in finished:
        assert after["results"][tid] == before["results"][tid], seen
    # the trial whose named checkpoint was half gone went on from the newer one beside it (a copy of it)
    resumed = [json.loads(line) for line in after["results"][running["trial_id"]].decode().splitlines()]
    assert {r["resumed_from_step"] for r in resumed if "resumed_from_step" in r} == {4}, seen
    assert running["newest_step"] == 4, seen
    # the study on S3 keeps the trials it had told before the kill, and ends with every trial COMPLETE
    told_before = [t for t in before["optuna"] if t[1] == "COMPLETE"]
    assert len(told_before) >= len(finished) and all(t in after["optuna"] for t in told_before), seen
    assert [t[1] for t in after["optuna"]] == ["COMPLETE"] * 3, seen
    assert pairs((t[2], t[3]) for t in after["optuna"]) == pairs(
        (r["params"], r["metric"]) for r in after["rows"].values()), seen
    print(f"FIGURE driver on S3 SIGKILLed with {len(finished)} of 3 trials finished (Optuna had told "
          f"{len(told_before)}), local mirror deleted, the running trial's checkpoint half deleted: after resume "
          f"{len(after['rows'])} trials, {sum(r['status'] == 'completed' for r in after['rows'].values())} completed, "
          f"0 re-run, the running one resumed from step {running['newest_step']}; Optuna on S3 "
          f"{len(after['optuna'])} trials COMPLETE")
    # MLflow: the same parent run, continued and finished; one child per trial, the earlier ones kept
    assert len(before["parents"]) == 1 and [p.info.run_id for p in after["parents"]] == [
        before["parents"][0].info.run_id] and after["parents"][0].info.status == "FINISHED", seen
    assert sorted(after["children"]) == sorted(after["rows"]), seen
    assert all(after["children"][tid].info.run_id == child.info.run_id for tid, child in before["children"].items())
    assert {child.data.tags[STATUS_TAG] for child in after["children"].values()} == {"completed"}, seen
    # the resumed driver's summary went to S3 too, naming the winner it printed
    summary = json.loads(s3_bytes(s3, f"{killed_on_s3_and_resumed['prefix']}{SUMMARY_FILE}"))
    assert summary["best_trial"] in after["rows"] and f"best trial {summary['best_trial']}" in logs, seen


def test_secrets_in_the_environment_reach_no_object_file_log_or_mlflow_record(s3, killed_on_s3_and_resumed):
    """The killed and resumed search ran with the cloud key and MLflow tokens in its environment. Tune
    pickles the storage filesystem into its state; credentials from the environment stay out of it, and
    out of the logs, the MLflow database and artifacts, and every local file."""
    keys = s3_keys(s3, "")  # the whole bucket: every search this module ran
    assert "killed/killed/tuner.pkl" in keys
    assert [k for k in keys if SECRET.encode() in s3_bytes(s3, k)] == []
    state = killed_on_s3_and_resumed
    assert SECRET not in state["logs"]
    runs = [*state["after"]["parents"], *state["after"]["children"].values()]
    assert len(runs) == 4 and [r for r in runs if SECRET in json.dumps([r.data.params, r.data.tags])] == []
    # what the search wrote here; not the test's own note to the trainable that stops the driver (STOP_FILE), which
    # hands it the credentials it reads the search's state on S3 with
    files = [path for folder in state["folders"] for path in folder.rglob("*") if path.is_file()
             and path.name != STOP_FILE]
    assert any(path.name == "mlflow.db" for path in files)
    assert [path for path in files if SECRET.encode() in path.read_bytes()] == []
    print(f"FIGURE secrets: the cloud key and 2 MLflow tokens in the environment, found in 0 of {len(keys)} S3 "
          f"objects, 0 of {len(files)} local files (logs, MLflow database and artifacts, the study) and 0 of "
          f"{len(runs)} MLflow runs' params and tags")


def test_search_report_on_a_search_on_s3_lands_in_the_bucket_beside_the_search(s3, finished_on_s3, capsys):
    cfg = finished_on_s3["cfg"]
    with environment(finished_on_s3["env"]):
        forget_this_machine(cfg.storage_path, cfg.name)
        assert main(["search", "report", cfg.name, "--storage-path", cfg.storage_path]) == 0
    capsys.readouterr()
    folder = SearchStorage(cfg.storage_path, cfg.name).folder
    for name in ("report.md", "report.png"):
        assert s3_bytes(s3, f"searches/on-s3/{name}") == (folder / name).read_bytes()
