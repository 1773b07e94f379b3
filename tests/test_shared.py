"""Shared backbone (issue 17): trials train through one frozen copy held by a Ray actor, which fuses
their passes. A fused trial ends where it would alone, no gradient crosses trials, a killed server
fails only its trials (retried from their checkpoints), and a shared search resumes."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import subprocess
import sys
import threading
import time

import optuna
import psutil
import pytest
import ray
import torch
import yaml

from softprompt.backbone_server.client import connect
from softprompt.backbone_server.server import NAMESPACE, BackboneServer, TrainRequest
from softprompt.models.data import make_batch
from softprompt.models.prompt import InputDropout, PromptedModel, SoftPrompt
from softprompt.search.config import ConfigError, search_config
from softprompt.search.record import SearchRecord
from softprompt.search.servers import server_key, servers
from softprompt.search.storage import SearchStorage
from softprompt.search.tuner import run_search
from softprompt.trainables.config import TrainConfig
from softprompt.trainables.loop import prepare_data, train

optuna.logging.set_verbosity(optuna.logging.WARNING)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this module by name


def small_cfg(model_dir, **changes) -> TrainConfig:
    return TrainConfig(model=str(model_dir), task="rotten_tomatoes", batch_size=4, prompt_length=3, max_steps=20,
                       eval_steps=(10,), max_train_examples=64, max_eval_examples=16, max_test_examples=16,
                       optimizer="adamw", lr=0.01, init="sampled_vocab",
                       dtype="float32").replace(**changes)  # compared with float32 passes to 1e-5


@ray.remote(num_cpus=0)
class Arrivals:
    """How many trials are ready: each says so once, then waits until all have."""

    def __init__(self):
        self.count = 0

    def arrive(self, only_ask: bool = False) -> int:
        self.count += 0 if only_ask else 1
        return self.count


@ray.remote(num_cpus=0.25)
def train_shared(key: str, cfg: TrainConfig, arrivals=None, parties: int = 0) -> tuple[torch.Tensor, dict]:
    # on a CPU too: one pass per round, and a gather window that a loaded 2-core machine still meets
    backbone, _ = connect(key, cfg.model, cfg.dtype, pass_tokens=1 << 20, min_gather_s=0.05)
    data = prepare_data(cfg, backbone)
    if arrivals is not None:  # start training together, so that the trials' steps overlap
        ray.get(arrivals.arrive.remote())
        while ray.get(arrivals.arrive.remote(only_ask=True)) < parties:
            time.sleep(0.01)
    try:
        result = train(cfg, backbone, data)
    finally:
        backbone.leave()
    return result["prompt"], {k: v for k, v in result.items() if k != "prompt"}


def server_statistics(key: str) -> dict:
    (name,) = servers(key)
    return ray.get(ray.get_actor(name, namespace=NAMESPACE).statistics.remote())


def test_a_trial_fused_with_three_others_ends_with_the_prompt_it_reaches_alone_on_the_server(
        ray_cluster, tiny_llama_dir, dropout=0.1):
    """Four trials through one server, their passes fused; then the first again, alone. With dropout:
    each trial's masks cover its own rows only, whatever shares the pass (without dropout, the next
    test compares a trial on the server with the same trial in its own process)."""
    cfgs = [small_cfg(tiny_llama_dir, seed=seed, dropout=dropout, lr=lr)
            for seed, lr in ((0, 0.01), (1, 0.03), (2, 0.003), (3, 0.01))]
    arrivals = Arrivals.remote()
    fused = ray.get([train_shared.remote(f"fused-{dropout}", cfg, arrivals, len(cfgs)) for cfg in cfgs])
    statistics = server_statistics(f"fused-{dropout}")
    alone, _ = ray.get(train_shared.remote(f"alone-{dropout}", cfgs[0]))
    assert statistics["max_fused"] >= 3 and statistics["passes"] < statistics["requests"]  # they did share passes
    assert not torch.allclose(fused[0][0], fused[1][0], atol=1e-3)  # the trials did differ
    assert torch.allclose(fused[0][0], alone, atol=1e-5), (fused[0][0] - alone).abs().max()


def test_a_trial_on_the_server_ends_with_the_prompt_it_reaches_in_its_own_process(ray_cluster, tiny_llama,
                                                                                  tiny_llama_dir):
    """The server lays a prompt out per row ([pad; P; X]), a trial's own process once for the batch
    ([P; pad; X]): the same scores within float noise, so the same prompt after 20 steps."""
    cfg = small_cfg(tiny_llama_dir)
    shared, shared_metrics = ray.get(train_shared.remote("own-process", cfg))
    local = train(cfg.replace(model=tiny_llama.name), tiny_llama)
    assert torch.allclose(shared, local["prompt"], atol=1e-5), (shared - local["prompt"]).abs().max()
    assert shared_metrics["best_dev_accuracy"] == local["best_dev_accuracy"]
    assert shared_metrics["test_accuracy"] == local["test_accuracy"]


@pytest.fixture(params=["llama", "t5"])
def tiny(request):
    """A causal LM (left-padded rows, prompt before the text) and an encoder-decoder (right-padded
    encoder inputs, the prompt on the encoder only): (its folder, its backbone)."""
    return request.getfixturevalue(f"tiny_{request.param}_dir"), request.getfixturevalue(f"tiny_{request.param}")


def test_no_gradient_crosses_trials_in_a_fused_pass(tiny):
    """Trial a's loss and gradient are the same with b beside it, whatever b's prompt, even a NaN one."""
    folder, backbone = tiny
    server = BackboneServer(str(folder), "float32", None, pass_tokens=1 << 20)
    data = prepare_data(small_cfg(folder), backbone)
    train_rows = data.splits["train"]
    batch_a = make_batch(data, train_rows.input_ids[:4], train_rows.labels[:4])
    batch_b = make_batch(data, train_rows.input_ids[4:9], train_rows.labels[4:9])
    torch.manual_seed(0)
    prompt_a, prompt_b = torch.randn(3, backbone.width), torch.randn(5, backbone.width)
    a = TrainRequest(prompt_a, batch_a, None)
    (alone,) = server._fused_train_pass([a])
    beside = server._fused_train_pass([a, TrainRequest(prompt_b, batch_b, None)])
    beside_other = server._fused_train_pass([a, TrainRequest(prompt_b * 3, batch_b, None)])
    beside_nan = server._fused_train_pass([a, TrainRequest(torch.full_like(prompt_b, math.nan), batch_b, None)])
    for loss_a, grad_a in (beside[0], beside_other[0], beside_nan[0]):
        assert abs(loss_a - alone[0]) < 1e-5 and torch.allclose(grad_a, alone[1], atol=1e-6)
    assert math.isnan(beside_nan[1][0]) and torch.isnan(beside_nan[1][1]).all()
    assert not torch.allclose(beside[1][1], beside_other[1][1])  # b's own gradient does follow b's prompt
    # and a's loss and gradient are what its own process computes
    prompt = SoftPrompt(prompt_a)
    local = PromptedModel(backbone, prompt).loss_backward(batch_a)
    assert abs(local - alone[0]) < 1e-5 and torch.allclose(prompt.weight.grad, alone[1], atol=1e-6)


def test_group_dropout_drops_each_trial_as_it_would_be_dropped_alone(tiny):
    folder, backbone = tiny
    server = BackboneServer(str(folder), "float32", None, pass_tokens=1 << 20)
    data = prepare_data(small_cfg(folder), backbone)
    rows = data.splits["train"]
    a = TrainRequest(torch.randn(3, backbone.width), make_batch(data, rows.input_ids[:4], rows.labels[:4]),
                     InputDropout(0.3, 0, 5))
    b = TrainRequest(torch.randn(2, backbone.width), make_batch(data, rows.input_ids[10:16], rows.labels[10:16]),
                     InputDropout(0.3, 1, 5))
    (alone,), fused = server._fused_train_pass([a]), server._fused_train_pass([b, a])
    assert abs(fused[1][0] - alone[0]) < 1e-5 and torch.allclose(fused[1][1], alone[1], atol=1e-6)
    (undropped,) = server._fused_train_pass([TrainRequest(a.prompt, a.batch, None)])
    assert abs(undropped[0] - alone[0]) > 1e-4  # the dropout did something


def test_a_request_that_fails_fails_alone_and_the_others_in_its_round_get_their_results(tiny_llama_dir, tiny_llama):
    """A round is split until the request at fault is alone (here: a prompt of the wrong width)."""
    server = BackboneServer(str(tiny_llama_dir), "float32", None, pass_tokens=1 << 20)
    data = prepare_data(small_cfg(tiny_llama_dir), tiny_llama)
    rows = data.splits["train"]
    batch = make_batch(data, rows.input_ids[:4], rows.labels[:4])
    good = [TrainRequest(torch.randn(3, tiny_llama.width), batch, None) for _ in range(3)]
    bad = TrainRequest(torch.randn(3, tiny_llama.width + 1), batch, None)
    results = server._run("train", [good[0], bad, good[1], good[2]])
    assert isinstance(results[1], RuntimeError)
    for request, result in zip(good, [results[0], results[2], results[3]]):
        (expected,) = server._fused_train_pass([request])
        assert abs(result[0] - expected[0]) < 1e-5 and torch.allclose(result[1], expected[1], atol=1e-6)


def test_on_a_cpu_each_trials_batch_is_its_own_pass_through_the_one_copy(tiny_llama_dir, tiny_llama):
    """Bigger passes are slower per example on a CPU (bench/results/shared.md): a round of two trials
    runs as two passes there, with the same results as one fused pass."""
    data = prepare_data(small_cfg(tiny_llama_dir), tiny_llama)
    rows = data.splits["train"]
    requests = [TrainRequest(torch.randn(n, tiny_llama.width),
                             make_batch(data, rows.input_ids[i:i + 4], rows.labels[i:i + 4]),
                             None) for n, i in ((3, 0), (2, 8))]
    cpu = BackboneServer(str(tiny_llama_dir), "float32", None, pass_tokens=0)
    fused = BackboneServer(str(tiny_llama_dir), "float32", None, pass_tokens=1 << 20)
    apart, together = cpu._train_pass(requests), fused._train_pass(requests)
    assert (cpu.statistics()["passes"], fused.statistics()["passes"]) == (2, 1)
    for (loss_a, grad_a), (loss_t, grad_t) in zip(apart, together):
        assert abs(loss_a - loss_t) < 1e-5 and torch.allclose(grad_a, grad_t, atol=1e-6)


def test_the_server_fuses_requests_that_arrive_together_and_answers_each(tiny_llama_dir, tiny_llama):
    server = BackboneServer(str(tiny_llama_dir), "float32", None, pass_tokens=1 << 20)
    data = prepare_data(small_cfg(tiny_llama_dir), tiny_llama)
    inputs = data.splits["dev"].input_ids
    prompts = [torch.randn(n, tiny_llama.width) for n in (1, 2, 4)]

    async def together():
        return await asyncio.gather(*[server.scores(f"c{i}", p, inputs[4 * i:4 * i + 4], [data.target_ids] * 4)
                                      for i, p in enumerate(prompts)])

    replies = asyncio.run(together())
    assert server.statistics()["rounds"] == server.statistics()["passes"] == 1 and server.statistics()["max_fused"] == 3
    for i, (prompt, reply) in enumerate(zip(prompts, replies)):
        expected = PromptedModel(tiny_llama, SoftPrompt(prompt)).class_scores(data, inputs[4 * i:4 * i + 4])
        assert reply.shape == (4, 2) and torch.allclose(reply, expected, atol=1e-5)


def shared_search(model_dir, tmp_path, **overrides):
    values = {"name": "shared", "trials": 4, "max_steps": 24, "concurrency": 4, "scheduler": "none",
              "cpus_per_trial": 0.5, "shared_backbone": True, "storage_path": str(tmp_path / "runs"), "seed": 0,
              "train": {"model": str(model_dir), "task": "rotten_tomatoes", "batch_size": 4, "prompt_length": 2,
                        "max_eval_examples": 16, "max_train_examples": 64, "max_test_examples": 16,
                        "confirm_examples": 0, "eval_steps": [4, 8, 12, 16, 20]}}
    return search_config({**values, **overrides})


def checkpointed_trials(cfg) -> int:
    folder = SearchStorage(cfg.storage_path, cfg.name).folder
    return sum(1 for trial in folder.glob("trial_*") if any(trial.glob("checkpoint_*")))


def reports(cfg, trial_id: str) -> list[dict]:
    path = SearchStorage(cfg.storage_path, cfg.name).folder / f"trial_{trial_id}" / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_killing_the_server_fails_only_its_trials_which_resume_from_their_checkpoints(
        ray_cluster, tiny_llama_dir, tmp_path):
    cfg = shared_search(tiny_llama_dir, tmp_path, max_failures=2)
    key = server_key(cfg.name, cfg.storage_path)
    search = threading.Thread(target=run_search, args=(cfg,))
    search.start()
    deadline = time.monotonic() + 300
    while checkpointed_trials(cfg) < 4 and time.monotonic() < deadline and search.is_alive():
        time.sleep(0.2)
    (name,) = servers(key)
    ray.kill(ray.get_actor(name, namespace=NAMESPACE))
    folder = SearchStorage(cfg.storage_path, cfg.name).folder
    finished = {path.parent.name.removeprefix("trial_") for path in folder.glob("trial_*/result.json")
                if '"test_accuracy"' in (path.read_text().splitlines() or [""])[-1]}
    search.join(timeout=600)
    assert not search.is_alive()
    record = SearchRecord.load(cfg.storage_path, cfg.name)
    assert [t["status"] for t in record.trials] == ["completed"] * 4
    assert len(finished) < 4  # the kill hit running trials
    picked_up = [max(r.get("resumed_from_step", 0) for r in reports(cfg, t["trial_id"]))
                 for t in record.trials if t["trial_id"] not in finished]
    assert all(step >= 4 for step in picked_up), picked_up  # each was retried from its checkpoint, not step 0
    for trial in record.trials:  # and each step was reported once, in order, the retried ones included
        steps = [r["step"] for r in reports(cfg, trial["trial_id"])]
        assert steps[-1] == 24 and steps == sorted(steps)
    assert servers(key) == []  # the search stopped its new server when it ended


def test_a_shared_search_whose_driver_was_killed_resumes_to_its_end_on_the_server_it_left(
        ray_cluster, tiny_llama_dir, tmp_path):
    cfg = shared_search(tiny_llama_dir, tmp_path, name="shared-resume", trials=3, concurrency=3)
    config = tmp_path / "search.yaml"
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k in ("name", "trials", "concurrency", "scheduler",
                                                                         "cpus_per_trial", "shared_backbone",
                                                                         "storage_path", "seed")}
    train_fields = dataclasses.asdict(cfg.train)
    values.update(max_steps=24, train={k: train_fields[k] for k in ("model", "task", "batch_size", "prompt_length",
                                                                      "max_eval_examples", "max_train_examples",
                                                                      "max_test_examples", "confirm_examples")}
                  | {"eval_steps": [4, 8, 12, 16, 20]})
    config.write_text(yaml.safe_dump(values))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    softprompt = [sys.executable, "-m", "softprompt"]
    driver = subprocess.Popen([*softprompt, "search", "run", str(config), "--tracking-uri", "none"], env=env,
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while checkpointed_trials(cfg) < 3 and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.2)
    driver.kill()  # SIGKILL: nothing stops the (detached) server
    driver.wait()
    key = server_key(cfg.name, cfg.storage_path)
    (left,) = servers(key)
    pid = ray.get(ray.get_actor(left, namespace=NAMESPACE).describe.remote())["pid"]
    resumed = subprocess.run([*softprompt, "search", "resume", cfg.name, "--storage-path", cfg.storage_path],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = SearchRecord.load(cfg.storage_path, cfg.name)
    assert [t["status"] for t in record.trials] == ["completed"] * 3
    for trial in record.trials:
        last = reports(cfg, trial["trial_id"])[-1]
        assert last["step"] == 24 and last["backbone_reused"] is True  # through the server the killed run left
    assert servers(key) == []
    deadline = time.monotonic() + 30
    while (psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
           and time.monotonic() < deadline):
        time.sleep(0.2)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_shared_backbone_is_refused_with_more_than_one_gpu_per_trial(tiny_llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="gpus_per_trial.*at most 1 with shared_backbone"):
        shared_search(tiny_llama_dir, tmp_path, gpus_per_trial=2)
    with pytest.raises(ConfigError, match="shared_backbone.*true or false"):
        shared_search(tiny_llama_dir, tmp_path, shared_backbone="yes")


def test_the_shared_example_config_is_valid_and_shares():
    from pathlib import Path

    from softprompt.search.config import load_search_config

    cfg = load_search_config(Path(__file__).parents[1] / "examples" / "shared.yaml")
    assert (cfg.shared_backbone, cfg.concurrency, cfg.cpus_per_trial, cfg.startup_trials) == (True, 4, 0.5, 5)
