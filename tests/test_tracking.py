"""MLflow tracking: one parent run per search, one child per trial with its metrics, steps,
status and prompt; the winner's artifacts on the parent; a stopped server loses nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import requests
from conftest import free_port
from conftest import tiny_search as shared_tiny_search
from mlflow.tracking import MlflowClient

from softprompt.cli.main import main
from softprompt.search.record import SearchRecord, save_config
from softprompt.search.storage import SearchStorage
from softprompt.search.tracking import (
    SEARCH_TAG,
    finish_search_run,
    nearest_tokens_table,
    softprompt_experiment,
    start_search_run,
)
from softprompt.search.tuner import build_tuner, ensure_ray, run_search
from softprompt.trainables.tracking import PARENT_TAG, STATUS_TAG, TRIAL_TAG

optuna.logging.set_verbosity(optuna.logging.WARNING)


def tiny_search(model_dir, tmp_path, **overrides):
    """The shared test-sized search (conftest): 5 trials of 8 steps under ASHA by training loss, one of whose
    points diverges (1e39 overflows float32: the prompt is infinite and the loss NaN at step 1)."""
    values = {"name": "tracked", "trials": 5, "max_steps": 8, "scheduler": "asha", "grace_period": 2,
              "reduction_factor": 2, "metric": "train_loss",
              "startup_trials": 10,  # 5 random points: the diverging init_scale stays one trial of several
              "space": {"init_scale": {"choices": [0.5, 1.0e39]}, "prompt_length": {"choices": [2, 4]},
                        "lr": {"low": 0.01, "high": 0.3, "log": True}},
              "points_to_evaluate": [{"init_scale": 1.0e39, "prompt_length": 2, "lr": 0.1}],
              "train": {"init": "random_uniform"}, **overrides}
    return shared_tiny_search(model_dir, tmp_path, **values)


def children_by_trial(client, parent):
    runs = client.search_runs([parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    return {run.data.tags[TRIAL_TAG]: run for run in runs}


def the_parent(client, name):
    runs = client.search_runs([client.get_experiment_by_name("softprompt").experiment_id],
                              f"tags.`{SEARCH_TAG}` = '{name}'")
    assert len(runs) == 1
    return runs[0]


def assert_every_trial_fully_logged(client, parent, cfg):
    children = children_by_trial(client, parent)
    rows = SearchRecord.load(cfg.storage_path, cfg.name).trials
    assert set(children) == {r["trial_id"] for r in rows}  # exactly one child per trial
    for row in rows:
        child = children[row["trial_id"]]
        assert child.data.tags[STATUS_TAG] == row["status"]
        assert child.data.params["prompt_length"] == str(row["params"]["prompt_length"])
        history = client.get_metric_history(child.info.run_id, "train_loss")
        if row["status"] == "diverged":
            assert child.info.status == "FAILED"
            assert [m.step for m in history] == [cfg.train.max_steps] and history[0].value == 1e9
            continue
        assert child.info.status == "FINISHED"
        assert sorted(m.step for m in history) == list(range(2, row["step"] + 1, 2))  # every report, with its step
        assert "prompt" in {a.path for a in client.list_artifacts(child.info.run_id)}
    return rows


@pytest.fixture(scope="module")
def tracked_search(ray_cluster, tiny_llama_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tracked")
    cfg = tiny_search(tiny_llama_dir, tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_search(cfg, tracking_uri=uri)
    return cfg, uri


def test_a_tracked_search_has_one_parent_with_one_child_per_trial_and_right_statuses(tracked_search, tmp_path):
    cfg, uri = tracked_search
    client = MlflowClient(uri, registry_uri=uri)
    parent = the_parent(client, cfg.name)
    rows = assert_every_trial_fully_logged(client, parent, cfg)
    statuses = {r["status"] for r in rows}
    assert {"diverged", "stopped early", "completed"} <= statuses

    assert parent.info.status == "FINISHED"
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.data.params["trials"] == "5" and parent.data.params["metric"] == "train_loss"
    assert parent.data.tags["softprompt.best_trial"] in {r["trial_id"] for r in rows}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"winning_prompt", "optuna", "nearest_tokens.json", "softprompt-search.yaml"} <= artifacts
    plots = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "optuna")}
    assert {"plot_optimization_history.png", "plot_param_importances.png", "plot_parallel_coordinate.png"} <= plots
    table_file = client.download_artifacts(parent.info.run_id, "nearest_tokens.json", str(tmp_path))
    table = json.loads(Path(table_file).read_text())
    best = json.loads(parent.data.tags["softprompt.best_params"])
    assert len(table["data"]) == 5 * best["prompt_length"]  # 5 nearest tokens per prompt vector
    assert {"position", "token", "cosine"} <= set(table["columns"])


def test_export_takes_a_search_a_trial_or_a_run_and_the_top_k_as_one_registered_model(tracked_search, tmp_path):
    import numpy as np

    cfg, uri = tracked_search
    client = MlflowClient(uri, registry_uri=uri)
    parent = the_parent(client, cfg.name)
    best = parent.data.tags["softprompt.best_trial"]
    common = ["--storage-path", cfg.storage_path, "--tracking-uri", uri]
    assert main(["export", cfg.name, "--format", "npy", "--out", str(tmp_path / "best"), *common]) == 0
    child = children_by_trial(client, parent)[best]
    assert main(["export", "--run", child.info.run_id, "--format", "npy", "--out", str(tmp_path / "run"), *common]) == 0
    assert np.array_equal(np.load(tmp_path / "best.npy"), np.load(tmp_path / "run.npy"))  # the same winner
    peft = ["--format", "peft", "--out", str(tmp_path / "peft")]
    assert main(["export", cfg.name, "--trial", best, *peft, *common]) == 0
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    assert main(["export", cfg.name, "--top", "3", "--format", "mlflow", "--name", "tiny-top3",
                 "--out", str(tmp_path / "bundle"), *common]) == 0
    assert int(client.get_model_version_by_alias("tiny-top3", "production").version) == 1
    bundle = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert len(bundle["tasks"]["rotten_tomatoes"]["members"]) == 3
    assert main(["export", cfg.name, "--top", "3", "--format", "peft", *common]) == 2  # one line, exit 2


def start_tracking_server(folder: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server`; its output goes to folder/server.log, quoted if it exits or never answers."""
    log = open(folder / "server.log", "ab")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
         "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job-runner processes
    log.close()
    # a guard against a hang, never a measured time: beside 3 other test processes on 2 cores one start took
    # over 60 s
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                return server
        except requests.RequestException:  # not up yet
            pass
        time.sleep(0.3)
    if server.poll() is None:
        stop(server)
    raise RuntimeError(f"mlflow server on port {port} did not answer (exit code {server.poll()}): "
                       + (folder / "server.log").read_text()[-2000:])


def stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, 9)  # its own session: the server and its workers, nothing else
    server.wait(timeout=10)


def test_a_tracking_server_stopped_during_a_search_loses_nothing(ray_cluster, tiny_llama_dir, tmp_path, capfd):
    cfg = tiny_search(tiny_llama_dir, tmp_path, name="outage", trials=3)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_tracking_server(tmp_path, port)
    try:
        ensure_ray(cfg)
        save_config(cfg)
        target = start_search_run(cfg, uri)  # the parent exists on the server...
        stop(server)                         # ...which then goes away while the trials run
        build_tuner(cfg, tracking=target).fit()
        assert finish_search_run(SearchRecord.load(cfg.storage_path, cfg.name)) is None
        err = capfd.readouterr().err
        assert "unreachable" in err and "softprompt mlflow sync" in err
        spools = list((SearchStorage(cfg.storage_path, cfg.name).folder / "mlflow-spool").glob("*.jsonl"))
        assert len(spools) == 3

        server = start_tracking_server(tmp_path, port)
        assert main(["mlflow", "sync", cfg.name, "--storage-path", cfg.storage_path]) == 0
        client = MlflowClient(uri, registry_uri=uri)
        assert_every_trial_fully_logged(client, the_parent(client, cfg.name), cfg)
        assert not list((SearchStorage(cfg.storage_path, cfg.name).folder / "mlflow-spool").glob("*.jsonl"))
    finally:
        if server.poll() is None:
            stop(server)


def test_an_experiment_made_before_it_had_a_kind_opens_on_the_runs_table_too(tmp_path):
    """MLflow 3's UI opens an experiment without a kind on its GenAI overview."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    older = client.create_experiment("softprompt")
    assert "mlflow.experimentKind" not in client.get_experiment(older).tags
    assert softprompt_experiment(client, uri) == older
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.fixture
def no_whole_model(monkeypatch):
    """Loading a whole model fails: what is read must be the embedding matrix alone."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the whole model was loaded")
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForSeq2SeqLM):
        monkeypatch.setattr(auto, "from_pretrained", refuse)


def sharded_copy(folder: Path, out: Path) -> Path:
    """`folder`'s model saved in ~1 MB shards, then every shard deleted but the embeddings': a
    reader that opens any other tensor fails."""
    import transformers

    model = transformers.AutoModel.from_pretrained(folder)
    model.save_pretrained(out, max_shard_size="1MB")
    transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    keep = {shard for key, shard in weight_map.items() if key.endswith("embed_tokens.weight")}
    assert len(set(weight_map.values())) > len(keep) == 1
    for shard in set(weight_map.values()) - keep:
        (out / shard).unlink()
    return out


def zip_checkpoint_copy(folder: Path, out: Path) -> Path:
    """`folder`'s model as one pytorch_model.bin (how older hub checkpoints, T5's among them, ship)."""
    import torch
    import transformers

    transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    config = transformers.AutoConfig.from_pretrained(folder)
    config.save_pretrained(out)
    auto = transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder else transformers.AutoModelForCausalLM
    torch.save(auto.from_pretrained(folder).state_dict(), out / "pytorch_model.bin")
    return out


@pytest.mark.parametrize("backbone_fixture,layout", [("tiny_llama", "as saved"), ("tiny_t5", "as saved"),
                                                     ("tiny_llama", "sharded"), ("tiny_t5", "one .bin file")])
def test_the_nearest_token_table_reads_only_the_embedding_matrix_and_finds_each_tokens_own_row(
        request, backbone_fixture, layout, tmp_path):
    import torch

    from softprompt.models.tensors import input_embeddings

    backbone = request.getfixturevalue(backbone_fixture)
    folder = {"as saved": lambda: backbone.name, "sharded": lambda: str(sharded_copy(Path(backbone.name), tmp_path)),
              "one .bin file": lambda: str(zip_checkpoint_copy(Path(backbone.name), tmp_path))}[layout]()
    full = backbone.model.get_input_embeddings().weight
    request.getfixturevalue("no_whole_model")
    embeddings, _ = input_embeddings(folder)
    assert torch.equal(embeddings, full)
    tokens = [1000, 2000, 3000]
    table = nearest_tokens_table(full[tokens] * 25.3, folder)  # a global scale (Gemma's sqrt(d)) changes nothing
    firsts = [i for i, rank in enumerate(table["rank"]) if rank == 1]
    assert [table["token"][i] for i in firsts] == [backbone.tokenizer.decode([t]) for t in tokens]
    assert [table["cosine"][i] for i in firsts] == [1.0, 1.0, 1.0]
