"""Shared-backbone benchmark (issue 17): trials training through one frozen copy (backbone_server/server.py)
against today's trials that each hold their own, on this machine's CPU cores, in one run.

Part 1, throughput and memory. SmolLM2-135M, rotten_tomatoes, batch 8, a 20-token class-label
prompt, AdamW. Arms, one after the other, each its trials started together (a barrier):
  - unshared: 2 trials at once, one core each, each with its own copy of the model (today's setting);
  - shared: 4 trials at once through one server that uses every core;
  - shared: 8 trials at once, to measure what one more shared trial costs.
Each trial runs STEPS training steps. Aggregate examples/s is every trial's examples over the
longest trial's time inside training steps. Memory is the machine's (MemTotal - MemAvailable),
sampled every 0.2 s: the arm's peak minus what was in use just before it started, divided by its
trials, so the server counts against the shared trials.

Part 2, what a search is worth at equal compute. Every arm gets the same wall-clock budget on the
same cores (time_limit_s; loads and evaluations included), 5 seeds each, and every arm's winner is
scored on the whole test split:
  (a) the quick space's default point, trained alone with the whole budget (both cores);
  (b) random search, no early stopping, 2 trials at a time;
  (c) TPE + ASHA, unshared, 2 trials at a time (the demo's setting);
  (d) TPE + ASHA, shared, 4 trials at a time.
TPE's start-up trials are scaled to the trials a budget holds. Writes bench/results/shared.md and
shared.json; `--part throughput|worth` runs one part and keeps the other's saved figures.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
import ray
import torch

from softprompt.backbone_server.client import connect
from softprompt.models.backbone import cached_backbone, load_backbone
from softprompt.models.checkpoint import load_checkpoint
from softprompt.models.evaluate import evaluate
from softprompt.models.prompt import PromptedModel, SoftPrompt
from softprompt.search.config import search_config
from softprompt.search.record import SearchRecord
from softprompt.search.servers import stop_servers
from softprompt.search.tuner import give_local_workers_env, run_search
from softprompt.spaces import DEFAULT_POINTS
from softprompt.trainables.config import TrainConfig
from softprompt.trainables.loop import prepare_data, train, zero_shot

RESULTS = Path(__file__).parent / "results"
MODEL, TASK = "smollm2-135m", "rotten_tomatoes"
STEPS = 20
TRAIN = TrainConfig(model=MODEL, task=TASK, batch_size=8, prompt_length=20, init="class_label", optimizer="adamw",
                    lr=0.03, max_steps=STEPS, eval_steps=(STEPS,), max_eval_examples=16, max_test_examples=16)


def used_bytes() -> int:
    info = psutil.virtual_memory()
    return info.total - info.available


class PeakMemory:
    """The machine's memory in use, sampled in a thread: the peak above `idle`, what was in use with
    Ray up and no trial running (measured once, so that memory an arm frees late is not counted
    against the next one; each arm starts once usage is back near it)."""

    def __init__(self, idle: int):
        self.idle = idle

    def __enter__(self):
        deadline = time.monotonic() + 60
        while used_bytes() > self.idle + 2**27 and time.monotonic() < deadline:
            time.sleep(0.5)
        self.peak, self.done = 0, False
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done:
            self.peak = max(self.peak, used_bytes())
            time.sleep(0.2)

    def __exit__(self, *exc):
        self.done = True
        self.thread.join()

    @property
    def added(self) -> int:
        return max(0, self.peak - self.idle)


@ray.remote(num_cpus=0)
class Barrier:
    def __init__(self, parties: int):
        self.parties, self.arrived = parties, 0

    def arrive(self) -> None:
        self.arrived += 1

    def open(self) -> bool:
        return self.arrived >= self.parties


def _trial(cfg: TrainConfig, barrier, key: str | None) -> dict:
    backbone = connect(key, cfg.model, cfg.dtype)[0] if key else cached_backbone(cfg.model, cfg.dtype)[0]
    data = prepare_data(cfg, backbone)
    ray.get(barrier.arrive.remote())
    while not ray.get(barrier.open.remote()):
        time.sleep(0.01)
    seen = {}
    train(cfg, backbone, data, report=lambda metrics, save: seen.update(metrics))
    if key:
        backbone.leave()
    return {"train_s": seen["train_s"], "examples": cfg.max_steps * cfg.batch_size,
            "rss": psutil.Process().memory_info().rss}


def run_arm(trials: int, shared: bool, threads: int, idle: int) -> dict:
    """`trials` trials at once; unshared ones each hold a model and `threads` cores."""
    key = f"bench-shared-{trials}" if shared else None
    task = ray.remote(num_cpus=0 if shared else threads, max_calls=1,  # max_calls: the model goes with the worker
                      runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}})(_trial)
    barrier = Barrier.remote(trials)
    with PeakMemory(idle) as memory:
        results = ray.get([task.remote(TRAIN.replace(seed=i), barrier, key) for i in range(trials)])
        server_rss = None
        if shared:
            from softprompt.backbone_server.server import NAMESPACE
            from softprompt.search.servers import servers
            (name,) = servers(key)
            server_pid = ray.get(ray.get_actor(name, namespace=NAMESPACE).describe.remote())["pid"]
            server_rss = psutil.Process(server_pid).memory_info().rss
            statistics_ = ray.get(ray.get_actor(name, namespace=NAMESPACE).statistics.remote())
    if shared:
        stop_servers(key)
    time.sleep(3)  # the workers exit before the next arm's baseline
    wall = max(r["train_s"] for r in results)
    return {"trials": trials, "shared": shared, "examples_per_s": sum(r["examples"] for r in results) / wall,
            "longest_train_s": wall, "memory_added_gib": memory.added / 2**30,
            "memory_per_trial_gib": memory.added / 2**30 / trials,
            "trial_rss_gib": statistics.fmean(r["rss"] for r in results) / 2**30,
            "server_rss_gib": server_rss / 2**30 if server_rss else None,
            "server": statistics_ if shared else None}


def pass_sizes(rows_per_pass=(8, 16, 32), examples: int = 64, repeats: int = 3) -> dict:
    """Training examples/s of one process using every core, as a server runs a pass, at several
    pass sizes over the same examples (length-bucketed batches, as trials draw them); the sizes
    take turns, `repeats` times, and each keeps its median."""
    from softprompt.models.data import TrainOrder, make_batch
    from softprompt.models.prompt import loss

    backbone = load_backbone(MODEL)  # freed on return: the bench process holds no model during the arms
    data = prepare_data(TRAIN, backbone)
    split = data.splits["train"]
    order = TrainOrder([len(x) for x in split.input_ids], 8, 0)
    chosen = [int(i) for step in range(examples // 8) for i in order.indices(step)]
    prompt = torch.randn(TRAIN.prompt_length, backbone.width, requires_grad=True)
    batches = {size: [make_batch(data, [split.input_ids[i] for i in chosen[k:k + size]],
                                 [split.labels[i] for i in chosen[k:k + size]]) for k in range(0, examples, size)]
               for size in rows_per_pass}
    for size in rows_per_pass:  # warm every shape once
        loss(backbone, prompt, batches[size][0]).backward()
    rates = {size: [] for size in rows_per_pass}
    for _ in range(repeats):
        for size in rows_per_pass:
            started = time.perf_counter()
            for batch in batches[size]:
                loss(backbone, prompt, batch).backward()
            rates[size].append(examples / (time.perf_counter() - started))
    return {size: statistics.median(values) for size, values in rates.items()}


def throughput() -> dict:
    cores = len(os.sched_getaffinity(0))
    sizes = pass_sizes()  # it also converts the offline model, once, before any arm
    time.sleep(5)
    idle = used_bytes()
    arms = {"unshared_2": run_arm(2, False, cores // 2, idle), "shared_4": run_arm(4, True, 1, idle),
            "shared_8": run_arm(8, True, 1, idle)}
    base, four, eight = arms["unshared_2"], arms["shared_4"], arms["shared_8"]
    per_extra = (eight["memory_added_gib"] - four["memory_added_gib"]) / 4  # one more shared trial
    if eight["memory_added_gib"] <= base["memory_added_gib"]:
        fit = f"all 8 of the 8-trial arm ({eight['memory_added_gib']:.2f} GiB against {base['memory_added_gib']:.2f})"
    else:
        fit = str(4 + int((base["memory_added_gib"] - four["memory_added_gib"]) // max(per_extra, 1e-9)))
    return {"cores": cores, "steps": STEPS, "arms": arms, "pass_sizes": sizes, "idle_gib": idle / 2**30,
            "examples_per_s_ratio": four["examples_per_s"] / base["examples_per_s"],
            "memory_per_trial_ratio": four["memory_per_trial_gib"] / base["memory_per_trial_gib"],
            "memory_per_trial_ratio_8": eight["memory_per_trial_gib"] / base["memory_per_trial_gib"],
            "one_more_shared_trial_gib": per_extra, "shared_trials_in_unshared_2": fit}


# ---- part 2: the search's worth at equal compute ----

SEARCH_TRAIN = {"model": MODEL, "task": TASK, "batch_size": 8, "max_eval_examples": 100, "confirm_examples": 200}
ARMS = {
    "a_default_alone": {"trials": 1, "points_to_evaluate": [DEFAULT_POINTS["quick"]], "scheduler": "none",
                        "max_steps": 2000, "concurrency": 1, "cpus_per_trial": 2,
                        "train": {**SEARCH_TRAIN, "eval_every": 25, "confirm_examples": 0}},
    "b_random_no_stopping": {"sampler": "random", "scheduler": "none", "trials": 200, "max_steps": 45,
                             "concurrency": 2, "cpus_per_trial": 1, "points_to_evaluate": [],
                             "train": {**SEARCH_TRAIN, "eval_steps": [5, 15, 45]}},  # where (c) and (d) evaluate
    "c_tpe_asha_unshared": {"sampler": "tpe", "startup_trials": 3, "scheduler": "asha", "trials": 200, "max_steps": 45,
                            "grace_period": 5, "asha_metric": "train_loss", "concurrency": 2, "cpus_per_trial": 1},
    "d_tpe_asha_shared": {"sampler": "tpe", "startup_trials": 4, "scheduler": "asha", "trials": 200, "max_steps": 45,
                          "grace_period": 5, "asha_metric": "train_loss", "concurrency": 4, "cpus_per_trial": 0.5,
                          "shared_backbone": True},
}


def worth(budget_s: float, seeds: int, storage: Path, arms: list[str], saved: dict | None = None) -> dict:
    """Runs `arms`; the saved result's other arms are kept (same budget only)."""
    backbone = load_backbone(MODEL)
    data = prepare_data(TrainConfig(model=MODEL, task=TASK, max_test_examples=None), backbone)
    base = {"zero_shot_test_accuracy": zero_shot(TrainConfig(model=MODEL, task=TASK), backbone, data)["accuracy"],
            "test_examples": len(data.splits["test"]), "budget_s": budget_s, "arms": {}}
    if saved and saved.get("budget_s") == budget_s:
        base["arms"] = {arm: result for arm, result in saved["arms"].items() if arm not in arms}
    for arm, settings in ARMS.items():
        if arm not in arms:
            continue
        runs = []
        for seed in range(seeds):
            values = {"name": f"{arm}-{seed}", "space": "quick", "metric": "best_dev_accuracy", "seed": seed,
                      "time_limit_s": budget_s, "storage_path": str(storage), "reduction_factor": 3,
                      **settings, "train": {**settings.get("train", SEARCH_TRAIN), "seed": seed}}
            cfg = search_config(values)
            started = time.perf_counter()
            run_search(cfg)
            wall = time.perf_counter() - started
            record = SearchRecord.load(cfg.storage_path, cfg.name)
            best = record.best()
            prompt = load_checkpoint(best["prompt"]).prompt
            test = evaluate(PromptedModel(backbone, SoftPrompt(prompt)), data, "test")["accuracy"]
            curves = [{"params": t["params"], "status": t["status"], "step": t["step"], "metric": t["metric"]}
                      for t in record.trials]
            runs.append({"seed": seed, "wall_s": wall, "trials": len(record.trials),
                         "trial_steps": sum(t["step"] or 0 for t in record.trials), "winner": best["params"],
                         "winner_dev": best["metric"], "winner_confirmed": best["confirmed"], "test_accuracy": test,
                         "trials_detail": curves})
            print(f"{arm} seed {seed}: {len(record.trials)} trials, {runs[-1]['trial_steps']} trial-steps, "
                  f"winner test {test:.4f} ({wall:.0f} s)", flush=True)
        tests = [r["test_accuracy"] for r in runs]
        base["arms"][arm] = {"seeds": seeds, "runs": runs, "median_test": statistics.median(tests),
                             "min_test": min(tests), "max_test": max(tests),
                             "sd_test": statistics.stdev(tests) if len(tests) > 1 else 0.0,
                             "median_trials": statistics.median(r["trials"] for r in runs),
                             "median_trial_steps": statistics.median(r["trial_steps"] for r in runs)}
    return base


def write(results: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shared.json").write_text(json.dumps(results, indent=2, default=str))
    lines = ["# Shared-backbone benchmark (bench/bench_shared.py)", ""]
    t = results.get("throughput")
    if t:
        arms = t["arms"]
        lines += [f"## Throughput and memory: SmolLM2-135M (fp32), CPU, {t['cores']} cores, batch 8, "
                  f"{t['steps']} steps per trial", "",
                  "| arm | trials at once | aggregate training examples/s | machine memory added | per running trial |",
                  "|---|---|---|---|---|"]
        names = {"unshared_2": "unshared (today)", "shared_4": "shared", "shared_8": "shared"}
        for key, arm in arms.items():
            lines.append(f"| {names[key]} | {arm['trials']} | {arm['examples_per_s']:.2f} | "
                         f"{arm['memory_added_gib']:.2f} GiB | {arm['memory_per_trial_gib']:.2f} GiB |")
        fused = arms["shared_4"]["server"]
        unshared_gib = arms["unshared_2"]["memory_per_trial_gib"]
        server_gib = arms["shared_4"]["memory_added_gib"] - 4 * t["one_more_shared_trial_gib"]
        per = t["one_more_shared_trial_gib"]
        break_even = math.floor(server_gib / (unshared_gib - per)) + 1 if unshared_gib > per else "no"
        rates = {int(k): v for k, v in t["pass_sizes"].items()}
        first_rate, best_rate = rates[min(rates)], max(rates.values())
        lines += ["", f"- 4 shared against 2 unshared: **{t['examples_per_s_ratio']:.2f}x** aggregate examples/s "
                      f"(goal >= 1.0x), **{t['memory_per_trial_ratio']:.2f}x** memory per running trial "
                      "(goal <= 0.5x).",
                  f"- 8 shared trials: **{t['memory_per_trial_ratio_8']:.2f}x** the memory per running trial. One more "
                  f"shared trial adds {t['one_more_shared_trial_gib']:.2f} GiB (8 against 4); the server itself, with "
                  f"the model and one pass's activations, about {server_gib:.2f} GiB. So n shared trials take about "
                  f"{server_gib:.2f} + {t['one_more_shared_trial_gib']:.2f} n GiB against "
                  f"{unshared_gib:.2f} n unshared: sharing saves memory from {break_even} trials at once. "
                  "In the memory today's 2 unshared trials "
                  f"take ({arms['unshared_2']['memory_added_gib']:.2f} GiB), shared trials fit: "
                  f"{t['shared_trials_in_unshared_2']} (the server alone takes most of it).",
                  f"- Resident memory: an unshared trial's process {arms['unshared_2']['trial_rss_gib']:.2f} GiB, a "
                  f"shared trial's {arms['shared_4']['trial_rss_gib']:.2f} GiB, the server "
                  f"{arms['shared_4']['server_rss_gib']:.2f} GiB (RSS counts shared library pages in each process; "
                  f"the table's machine-level figures do not).",
                  "- Pass size on this CPU (one process on every core, loss and backward, the same 64 examples in "
                  "turns): " + ", ".join(f"{v:.2f} examples/s at {k} rows" for k, v in t["pass_sizes"].items())
                  + f" per pass. A bigger pass is no faster per example here (best {best_rate:.2f} against "
                  f"{first_rate:.2f} at 8 rows), so a CPU server runs each trial's batch as its own pass, one "
                  f"trial's activations at a time; on a GPU a small pass is launch-bound, and the server fuses.",
                  f"- The 4-trial server took its {fused['requests']} requests in {fused['rounds']} rounds and ran "
                  f"{fused['passes']} passes (at most {fused['max_fused']} trial per round: no fusion on a CPU).",
                  f"- Why sharing is slower here: two unshared trials are two processes of one thread each, the "
                  f"fastest way to use 2 cores; the server is one process of 2 threads "
                  f"({first_rate:.2f} examples/s at 8 rows alone, above), and the shared trials' own processes "
                  f"(optimizer steps, reports, Ray calls) take CPU from it.", ""]
    w = results.get("worth")
    if w:
        lines += [f"## The search's worth at equal compute: {w['budget_s']:.0f} s of the whole machine per arm, "
                  f"{', '.join(sorted({str(a.get('seeds', len(a['runs']))) for a in w['arms'].values()}))} seeds", "",
                  f"Every arm's winner scored on the whole test split ({w['test_examples']} examples); zero-shot: "
                  f"{w['zero_shot_test_accuracy']:.4f}.", "",
                  "| arm | seeds | median test accuracy | min - max | sd | median trials | median trial-steps |",
                  "|---|---|---|---|---|---|---|"]
        for arm, a in sorted(w["arms"].items()):
            lines.append(f"| {arm} | {len(a['runs'])} | {a['median_test']:.4f} | "
                         f"{a['min_test']:.4f} - {a['max_test']:.4f} | "
                         f"{a['sd_test']:.4f} | {a['median_trials']:g} | {a['median_trial_steps']:g} |")
        lines += [""]
    if results.get("reading"):
        lines += ["## Reading", "", results["reading"], ""]
    (RESULTS / "shared.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["throughput", "worth", "both"], default="both")
    parser.add_argument("--budget-s", type=float, default=150.0, help="wall-clock seconds per arm and seed (part 2)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--arms", default=",".join(ARMS), help="part 2's arms to run (the saved others are kept)")
    args = parser.parse_args()
    saved = RESULTS / "shared.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    give_local_workers_env()
    ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, configure_logging=False,
             logging_level="WARNING")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    if args.part in ("throughput", "both"):
        results["throughput"] = throughput()
        write(results)
    if args.part in ("worth", "both"):
        storage = Path(tempfile.mkdtemp(prefix="bench-shared-"))
        try:
            results["worth"] = worth(args.budget_s, args.seeds, storage, args.arms.split(","), results.get("worth"))
        finally:
            shutil.rmtree(storage, ignore_errors=True)
        write(results)
    print((RESULTS / "shared.md").read_text())


if __name__ == "__main__":
    main()
