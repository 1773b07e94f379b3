"""Search benchmark: ASHA + TPE against random search with no early stopping, at the same trial
budget, on the demo setting (examples/demo.yaml), one after the other in this run.

Reports total trial-steps, wall time, the best dev accuracy each reached, and the fraction of
search wall time spent inside training steps (model reuse, no idle workers). Writes
bench/results/search.md (the README quotes it) and search.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import ray

from search.config import asha_rungs, load_search_config
from search.tuner import run_search, trial_rows

RESULTS = Path(__file__).parent / "results"


def measure(cfg) -> dict:
    started = time.perf_counter()
    grid = run_search(cfg)
    wall = time.perf_counter() - started
    rows = trial_rows(cfg.storage_path, cfg.name)
    last = [r.metrics for r in grid]
    train_seconds = sum(m.get("train_s", 0.0) for m in last)
    eval_seconds = sum(m.get("eval_s", 0.0) for m in last)
    loads = [m for m in last if "backbone_reused" in m]
    return {"trials": len(rows), "trial_steps": sum(r["step"] or 0 for r in rows),
            "statuses": {s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}},
            "best_dev_accuracy": max(r["metric"] for r in rows if r["metric"] is not None),
            "wall_s": wall, "train_s": train_seconds,
            "train_fraction": train_seconds / (wall * cfg.concurrency),
            "eval_s": eval_seconds, "loop_fraction": (train_seconds + eval_seconds) / (wall * cfg.concurrency),
            "backbone_loads": sum(not m["backbone_reused"] for m in loads),
            "backbone_load_s_saved": sum(m["backbone_load_s"] for m in loads if m["backbone_reused"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(Path(__file__).parents[1] / "examples" / "demo.yaml"))
    args = parser.parse_args()
    storage = tempfile.mkdtemp(prefix="softprompt-bench-")
    overrides = [f"storage_path={storage}"]
    asha = load_search_config(args.config, [*overrides, "name=asha-tpe"])
    # The same trials' budget and the same dev evaluations (at ASHA's rungs), no early stopping.
    random = load_search_config(args.config, [*overrides, "name=random-full", "scheduler=none", "sampler=random",
                                              f"train.eval_steps={list(asha.train.eval_steps)}"])
    report = {"config": args.config, "asha_tpe": measure(asha), "random_no_stopping": measure(random)}
    ray.shutdown()
    a, r = report["asha_tpe"], report["random_no_stopping"]
    report["step_ratio"] = a["trial_steps"] / r["trial_steps"]
    report["accuracy_gap_points"] = 100 * (r["best_dev_accuracy"] - a["best_dev_accuracy"])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "search.json").write_text(json.dumps(report, indent=2))
    (RESULTS / "search.md").write_text(render(report, asha))
    print(render(report, asha))
    shutil.rmtree(storage, ignore_errors=True)


def render(report: dict, cfg) -> str:
    a, r = report["asha_tpe"], report["random_no_stopping"]
    rungs = ", ".join(map(str, asha_rungs(cfg.grace_period, cfg.reduction_factor, cfg.train.max_steps)))
    row = lambda name, m: (f"| {name} | {m['trials']} | {m['trial_steps']} | {m['wall_s']:.0f} s | "
                           f"{m['best_dev_accuracy']:.4f} | {100 * m['loop_fraction']:.0f}% | "
                           f"{100 * m['train_fraction']:.0f}% | {m['backbone_loads']} |")
    return f"""# Search benchmark (bench/bench_search.py)

The demo setting ({report['config'].split('/')[-1]}): SmolLM2-135M, rotten_tomatoes, {cfg.trials} trials of up to
{cfg.train.max_steps} steps, {cfg.concurrency} at a time on 2 CPU cores, dev accuracy on {cfg.train.max_eval_examples} examples.

| search | trials | trial-steps | wall time | best dev accuracy | worker time in the training loop | of which optimizer steps | model loads |
|---|---|---|---|---|---|---|---|
{row("ASHA + TPE", a)}
{row("random, no early stopping", r)}

ASHA + TPE spent {100 * report['step_ratio']:.0f}% of the random search's trial-steps; its best dev accuracy is
{-report['accuracy_gap_points']:+.1f} points from the random search's. ASHA statuses: {a['statuses']}.
Model reuse saved {a['backbone_load_s_saved'] + r['backbone_load_s_saved']:.1f} s of backbone loading over both searches.
Both searches evaluate on dev only at ASHA's rungs (steps {rungs}), so every evaluation
is one ASHA uses and both see the same checkpoints.

"Worker time in the training loop" is the trials' time inside training steps and their dev/test
evaluations, divided by wall time x concurrency: the rest (start-up, model loading, Ray's
scheduling, checkpoint upload, workers idle at the end of the search) is overhead.
"Of which optimizer steps" counts forward/backward/update alone: on a CPU a dev evaluation of
{cfg.train.max_eval_examples} examples costs about as much as five training steps.
"""


if __name__ == "__main__":
    main()
