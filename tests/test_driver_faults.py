"""What the search driver does when the user or the cluster gets in the way: resources no node can
give are refused before the search exists, Ctrl-C stops a search (exit 130) with the way to resume
it, and a winner that does not beat the zero-shot baseline is called out wherever it is shown."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
import yaml
from mlflow.tracking import MlflowClient

from search.cli import main
from search.configfile import ConfigError
from search.resources import check_trial_resources
from search.record import SearchRecord
from search.storage import SUMMARY_FILE, SearchStorage
from trainables.data import encode_task
from trainables.evaluate import rank_classify
from trainables.prompt import PromptedModel, SoftPrompt
from trainables.tasks import file_task

SOFTPROMPT = [sys.executable, "-m", "search.cli"]


def tiny_search_file(folder: Path, model_dir, name: str, **values) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "trials": 2, "max_steps": 4, "scheduler": "none", "storage_path": str(folder / "runs"),
        "train": {"model": str(model_dir), "task": "rotten_tomatoes", "batch_size": 4, "eval_every": 2,
                  "max_eval_examples": 16, "max_train_examples": 64}, **values}))
    return path


def without_ray_address() -> dict:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def softprompt_errors(stderr: str) -> list[str]:
    """softprompt's own lines (a Ray that finds ~/.ray/auth_token adds a warning of its own)."""
    return [line for line in stderr.splitlines() if line.startswith("softprompt:")]


# ---- resources no node can give ----

@pytest.mark.parametrize("setting,line", [
    ("cpus_per_trial=64", "cpus_per_trial = 64 is not allowed: at most {cpus}, the most CPUs one node of this local "
                          "Ray has, and it cannot add nodes (a trial runs on one node)"),
    ("gpus_per_trial=0.5", "gpus_per_trial = 0.5 is not allowed: at most 0, the most GPUs one node of this local "
                           "Ray has, and it cannot add nodes (a trial runs on one node)"),
])
def test_a_local_search_asking_for_more_than_the_machine_has_is_refused_before_it_exists(
        tiny_llama_dir, tmp_path, setting, line):
    config = tiny_search_file(tmp_path, tiny_llama_dir, "too-big")
    refused = subprocess.run([*SOFTPROMPT, "search", "run", str(config), "--set", setting, "--tracking-uri", "none"],
                             cwd=tmp_path, env=without_ray_address(), capture_output=True, text=True,
                             timeout=300)  # a guard only: before the fix this run waited forever
    cpus = ray._private.utils.get_num_cpus()  # what a local Ray declares on this machine
    assert refused.returncode == 2, refused.stderr
    assert softprompt_errors(refused.stderr) == [f"softprompt: error: {line.format(cpus=cpus)}"]
    assert "Traceback" not in refused.stderr
    assert not SearchStorage(str(tmp_path / "runs"), "too-big").folder.exists()  # nothing saved: the name is free


def test_a_search_on_a_cluster_without_an_autoscaler_gets_what_its_nodes_declare(ray_cluster, tiny_llama_dir, tmp_path):
    """The session's cluster declares 2 CPUs and 1 GPU on its one node, and nothing adds nodes."""
    config = tiny_search_file(tmp_path, tiny_llama_dir, "two-gpus")
    refused = subprocess.run([*SOFTPROMPT, "search", "run", str(config), "--set", "gpus_per_trial=2",
                              "--tracking-uri", "none"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address})
    assert refused.returncode == 2, refused.stderr
    assert softprompt_errors(refused.stderr) == [
        "softprompt: error: gpus_per_trial = 2 is not allowed: at most 1, the most GPUs one node of this Ray "
        "cluster has, and it cannot add nodes (a trial runs on one node)"]
    assert not SearchStorage(str(tmp_path / "runs"), "two-gpus").folder.exists()


NODE = {"CPU": 2.0, "GPU": 1.0, "memory": 8e9}


def test_a_trial_must_fit_on_one_node_not_on_the_cluster_as_a_whole():
    assert check_trial_resources(2, 1, [NODE], [], "c") is None
    with pytest.raises(ConfigError) as two_nodes:
        check_trial_resources(1, 2, [NODE, NODE], [], "c")  # 2 GPUs in all, 1 on each node
    assert (two_nodes.value.field, two_nodes.value.value) == ("gpus_per_trial", 2)
    with pytest.raises(ConfigError) as beside_gpu:  # many CPUs, but not on the node with the GPU
        check_trial_resources(4, 1, [NODE, {"CPU": 16.0}], [], "c")
    assert beside_gpu.value.field == "cpus_per_trial"
    assert "at most 2, the most CPUs one node with 1 GPU of c has" in str(beside_gpu.value)


def test_an_autoscaling_cluster_waits_for_a_node_type_that_fits_and_refuses_one_none_fits():
    gpu_type, big_type = {"CPU": 4, "GPU": 1}, {"CPU": 48, "GPU": 4}
    head = {"CPU": 0.0}  # cluster.yaml's head runs no trials
    waiting = check_trial_resources(1, 1, [head], [gpu_type, big_type], "this Ray cluster")
    assert waiting == ("softprompt: no node of this Ray cluster can hold a trial now (1 CPU, 1 GPU): "
                       "the search waits for the autoscaler to add one")
    with pytest.raises(ConfigError) as too_many:
        check_trial_resources(1, 8, [head], [gpu_type, big_type], "this Ray cluster")
    assert str(too_many.value) == ("gpus_per_trial = 8 is not allowed: at most 4, the most GPUs one node of this Ray "
                                   "cluster or of the node types its autoscaler may add has (a trial runs on one node)")
    # an autoscaler that does not say what its nodes hold may add one that fits
    assert check_trial_resources(1, 8, [head], [{}], "this Ray cluster").startswith("softprompt: no node")


# ---- Ctrl-C ----

def test_ctrl_c_stops_a_search_without_scoring_a_winner_and_says_how_to_resume_it(ray_cluster, tiny_llama_dir, tmp_path):
    config = tiny_search_file(tmp_path, tiny_llama_dir, "ctrl-c", trials=4, max_steps=40, concurrency=1,
                              train={"model": str(tiny_llama_dir), "task": "rotten_tomatoes", "batch_size": 4,
                                     "eval_every": 4, "max_eval_examples": 16, "max_train_examples": 64})
    runs = tmp_path / "runs"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen([*SOFTPROMPT, "search", "run", str(config), "--tracking-uri", "none"], env=env,
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and driver.poll() is None:  # until the first trial has reported
        time.sleep(0.2)
        if any(p.stat().st_size for p in runs.glob("ctrl-c/trial_*/result.json")):
            break
    driver.send_signal(signal.SIGINT)
    out, err = driver.communicate(timeout=120)
    assert driver.returncode == 130, err[-3000:]
    assert softprompt_errors(err) == [
        f"softprompt: search ctrl-c stopped; `softprompt search resume ctrl-c --storage-path {runs}` continues it"]
    assert "Traceback" not in err and "best trial" not in out  # no winner was loaded or scored
    assert not (SearchStorage(str(runs), "ctrl-c").folder / SUMMARY_FILE).exists()
    assert any(r["status"] != "completed" for r in SearchRecord.load(str(runs), "ctrl-c").trials)

    resumed = subprocess.run([*SOFTPROMPT, "search", "resume", "ctrl-c", "--storage-path", str(runs)], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "best trial" in resumed.stdout
    assert [r["status"] for r in SearchRecord.load(str(runs), "ctrl-c").trials] == ["completed"] * 4


# ---- a winner below zero-shot ----

def self_labelled_task(backbone, folder: Path) -> Path:
    """A task labelled by what `backbone` itself predicts with no prompt: its zero-shot accuracy is
    1.0 on every split, so no prompt can beat it."""
    texts = [f"review {i}: {'a fine' if i % 3 else 'a dull'} film with {'some' if i % 5 else 'no'} plot" for i in range(200)]
    verbalizers = {"neg": "negative", "pos": "positive"}
    path = folder / "self-labelled.csv"

    def write(labels):
        with open(path, "w", newline="") as handle:
            csv.writer(handle).writerows([("text", "label"), *zip(texts, labels)])

    write(["pos" if i % 2 else "neg" for i in range(len(texts))])
    task = file_task(str(path), verbalizers=verbalizers)
    data = encode_task(task, backbone.tokenizer, backbone.is_encoder_decoder, backbone.vocab_is_frequency_ordered, 256)
    no_prompt = PromptedModel(backbone, SoftPrompt(torch.zeros(0, backbone.width)))
    predicted = {}
    for split in ("train", "dev", "test"):
        classes = rank_classify(no_prompt, data, data.splits[split], 32)
        for formatted, c in zip(task.splits[split]["input"], classes):
            predicted[int(re.search(r"review (\d+):", formatted).group(1))] = list(verbalizers)[c]
    assert set(predicted.values()) == {"neg", "pos"}  # the model does tell the texts apart
    write([predicted[i] for i in range(len(texts))])
    return path


def test_a_winner_that_does_not_beat_zero_shot_is_called_out_in_the_summary_best_and_mlflow(
        ray_cluster, tiny_llama, tiny_llama_dir, tmp_path, capsys):
    task = self_labelled_task(tiny_llama, tmp_path)
    config = tiny_search_file(tmp_path, tiny_llama_dir, "below", concurrency=2, space={"prompt_length": {"choices": [2, 4]}},
                              train={"model": str(tiny_llama_dir), "task": str(task), "batch_size": 4, "eval_every": 2,
                                     "dtype": "float32",  # labelled by the float32 model: ties would flip
                                     "verbalizers": {"neg": "negative", "pos": "positive"}, "max_eval_examples": 20,
                                     "init": "random_uniform", "optimizer": "adamw", "lr": 0.3})
    uri, runs = f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "runs")
    assert main(["search", "run", str(config), "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    summary = json.loads((SearchStorage(runs, "below").folder / SUMMARY_FILE).read_text())
    assert summary["zero_shot_test_accuracy"] == 1.0 and summary["beats_zero_shot"] is False
    verdict = (f"the winner does not beat zero-shot ({summary['test_accuracy']:.4f} vs 1.0000 test accuracy): the "
               f"model does as well without this prompt; a longer or wider search may find one that helps")
    assert f"  {verdict}\n" in out

    assert main(["search", "best", "below", "--storage-path", runs]) == 0
    best = capsys.readouterr().out
    assert "zero-shot accuracy  1.0000  (same model, no prompt)" in best and f"{verdict}\n" in best
    assert main(["search", "best", "below", "--storage-path", runs, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["beats_zero_shot"], shown["zero_shot_test_accuracy"]) == (False, 1.0)

    client = MlflowClient(uri)
    parent = client.search_runs([client.get_experiment_by_name("softprompt").experiment_id],
                                "tags.`softprompt.search` = 'below'")[0]
    assert parent.data.tags["softprompt.beats_zero_shot"] == "false"
    assert parent.data.metrics["zero_shot_test_accuracy"] == 1.0
    assert parent.data.metrics["winner_test_accuracy"] == summary["test_accuracy"]
