"""What the search driver does when the user or the cluster gets in the way: resources no node can
give are refused before the search exists, Ctrl-C stops a search (exit 130) with the way to resume
it (a seeded one: its resume runs each seed once), and a winner that does not beat the zero-shot
baseline is called out wherever it is shown."""
from __future__ import annotations

import csv
import json
import os
import re
import statistics
import subprocess
from pathlib import Path

import pytest
import ray
import torch
from conftest import SOFTPROMPT, on_session_ray, run_stopped, softprompt, study_trials, tiny_search_file
from mlflow.tracking import MlflowClient

from softprompt.cli.main import main
from softprompt.configfile import ConfigError
from softprompt.models.data import encode_task
from softprompt.models.evaluate import rank_classify
from softprompt.models.prompt import PromptedModel, SoftPrompt
from softprompt.models.tasks import file_task
from softprompt.search.record import SearchRecord
from softprompt.search.resources import check_trial_resources
from softprompt.search.storage import SUMMARY_FILE, SearchStorage


def without_ray_address() -> dict:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def softprompt_errors(stderr: str) -> list[str]:
    """softprompt's own lines (a Ray that finds ~/.ray/auth_token adds a warning of its own)."""
    return [line for line in stderr.splitlines() if line.startswith("softprompt:")]


# ---- resources no node can give ----

# A GPU share on a machine without GPUs: tests/test_bad_input.py, which also checks nothing is announced before.
@pytest.mark.parametrize("setting,line", [
    ("cpus_per_trial=64", "cpus_per_trial = 64 is not allowed: at most {cpus}, the most CPUs one node of this local "
                          "Ray has, and it cannot add nodes (a trial runs on one node)"),
])
def test_a_local_search_asking_for_more_than_the_machine_has_is_refused_before_it_exists(
        tiny_llama_dir, tmp_path, setting, line):
    config = tiny_search_file(tiny_llama_dir, tmp_path, name="too-big")
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
    config = tiny_search_file(tiny_llama_dir, tmp_path, name="two-gpus")
    refused = subprocess.run([*SOFTPROMPT, "search", "run", str(config), "--set", "gpus_per_trial=2",
                              "--tracking-uri", "none"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                             env=on_session_ray())
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

def test_ctrl_c_stops_a_seeded_search_without_scoring_a_winner_and_its_resume_reruns_nothing_and_runs_each_seed_once(
        ray_cluster, tiny_llama_dir, tmp_path):
    """A grid of two points, each run with two seeds (4 trials, one at a time). Ctrl-C while the second trial
    (the first point's second seed) runs, right after its step-8 checkpoint: exit 130 with the way to resume
    it. The resume finishes the search: the finished trial is not run again, the stopped one goes on from
    step 8, any step a trial reports twice (a replay after its checkpoint) is the same run, each point ran
    once per seed, and the study holds each point once, valued at its seeds' mean."""
    config = tiny_search_file(tiny_llama_dir, tmp_path, name="ctrl-c", metric="train_loss", seeds=2, concurrency=1,
                              max_steps=16, sampler="grid", space={"prompt_length": {"choices": [2, 4]}},
                              train={"eval_every": 4})
    runs, env = tmp_path / "runs", on_session_ray()
    stopped = run_stopped(config, "SIGINT", 2, 8, "--tracking-uri", "none", env=env)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert softprompt_errors(stopped.stderr) == [
        f"softprompt: search ctrl-c stopped; `softprompt search resume ctrl-c --storage-path {runs}` continues it"]
    assert "Traceback" not in stopped.stderr and "best trial" not in stopped.stdout  # no winner was loaded or scored
    assert not (SearchStorage(str(runs), "ctrl-c").folder / SUMMARY_FILE).exists()
    before = {r["trial_id"]: r for r in SearchRecord.load(str(runs), "ctrl-c").trials}
    (finished,) = [tid for tid, r in before.items() if r["status"] == "completed"]
    (interrupted,) = [tid for tid, r in before.items() if r["status"] == "unfinished" and r["step"] == 8]

    def results(tid: str) -> str:
        return (runs / "ctrl-c" / f"trial_{tid}" / "result.json").read_text()

    reported = results(finished)

    resumed = softprompt("search", "resume", "ctrl-c", "--storage-path", str(runs), cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "best trial" in resumed.stdout
    (time_line,) = [line for line in resumed.stdout.splitlines() if line.startswith("time: ")]  # where it went
    assert " x 1 slots = " in time_line and "training" in time_line, time_line
    record = SearchRecord.load(str(runs), "ctrl-c")
    after = {r["trial_id"]: r for r in record.trials}
    assert len(after) == 4 and all(r["status"] == "completed" for r in after.values())
    assert results(finished) == reported  # not one more report from the trial that had finished
    rows = {tid: [json.loads(line) for line in results(tid).splitlines()] for tid in after}
    assert [(r["step"], r.get("resumed_from_step")) for r in rows[interrupted]] == [(4, None), (8, None), (12, 8),
                                                                                    (16, 8)]
    for tid, reports in rows.items():
        assert sorted({r["step"] for r in reports}) == [4, 8, 12, 16], tid
        by_step = {}
        for r in reports:
            by_step.setdefault(r["step"], set()).add((r["train_loss"], r["dev_accuracy"], r["best_dev_accuracy"]))
        assert all(len(values) == 1 for values in by_step.values()), (tid, by_step)
    points = {}
    for r in record.trials:
        points.setdefault(r["params"]["prompt_length"], []).append(r)
    assert len(points) == 2 and all(sorted(r["params"]["seed"] for r in p) == [0, 1] for p in points.values())
    trials = study_trials(record.config)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert {t.params["prompt_length"]: t.value for t in trials} == pytest.approx(
        {length: statistics.fmean(r["metric"] for r in p) for length, p in points.items()})
    assert record.best()["point"]["n"] == 2


# ---- a winner below zero-shot ----

def self_labelled_task(backbone, folder: Path) -> Path:
    """A task labelled by what `backbone` itself predicts with no prompt: its zero-shot accuracy is
    1.0 on every split, so no prompt can beat it."""
    texts = [f"review {i}: {'a fine' if i % 3 else 'a dull'} film with {'some' if i % 5 else 'no'} plot"
             for i in range(200)]
    verbalizers = {"neg": "negative", "pos": "positive"}
    path = folder / "self-labelled.csv"

    def write(labels):
        with open(path, "w", newline="") as handle:
            csv.writer(handle).writerows([("text", "label"), *zip(texts, labels, strict=True)])

    write(["pos" if i % 2 else "neg" for i in range(len(texts))])
    task = file_task(str(path), verbalizers=verbalizers)
    data = encode_task(task, backbone.tokenizer, backbone.is_encoder_decoder, backbone.vocab_is_frequency_ordered, 256)
    no_prompt = PromptedModel(backbone, SoftPrompt(torch.zeros(0, backbone.width)))
    predicted = {}
    for split in ("train", "dev", "test"):
        classes = rank_classify(no_prompt, data, data.splits[split], 32)
        for formatted, c in zip(task.splits[split]["input"], classes, strict=True):
            predicted[int(re.search(r"review (\d+):", formatted).group(1))] = list(verbalizers)[c]
    assert set(predicted.values()) == {"neg", "pos"}  # the model does tell the texts apart
    write([predicted[i] for i in range(len(texts))])
    return path


def test_a_winner_that_does_not_beat_zero_shot_is_called_out_in_the_summary_best_and_mlflow(
        ray_cluster, tiny_llama, tiny_llama_dir, tmp_path, capsys):
    task = self_labelled_task(tiny_llama, tmp_path)
    config = tiny_search_file(tiny_llama_dir, tmp_path, name="below", space={"prompt_length": {"choices": [2, 4]}},
                              train={"task": str(task),
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
