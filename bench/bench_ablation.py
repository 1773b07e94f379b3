"""The paper's ablations (Figure 3) as one grid search on SmolLM2-135M, offline, on this machine:
prompt length {1, 5, 20, 100} x init {random_uniform, sampled_vocab, class_label} x optimizer
{adafactor (T5X, the paper's), adafactor_hf (transformers')}, each cell 3 seeds, lr 0.3, through the
real `softprompt search run` (sampler: grid, seeds: 3) and `softprompt search report`.

Writes bench/results/ablation.md (the per-parameter table, the paper's findings beside ours) and
ablation.png (the report's plot), and ablation.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml

RESULTS = Path(__file__).parent / "results"
LENGTHS = [1, 5, 20, 100]
INITS = ["random_uniform", "sampled_vocab", "class_label"]
OPTIMIZERS = ["adafactor", "adafactor_hf"]


def search_config(steps: int, seeds: int, dev: int, test: int) -> dict:
    return {"name": "ablation", "sampler": "grid", "seeds": seeds, "scheduler": "none", "max_steps": steps,
            "concurrency": 2, "cpus_per_trial": 1, "metric": "best_dev_accuracy",
            "space": {"prompt_length": {"choices": LENGTHS}, "init": {"choices": INITS},
                      "optimizer": {"choices": OPTIMIZERS}},
            "train": {"model": "smollm2-135m", "task": "rotten_tomatoes", "lr": 0.3, "batch_size": 8,
                      "eval_every": steps, "max_eval_examples": dev, "confirm_examples": 0,
                      "max_test_examples": test, "max_train_examples": steps * 8}}


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f} ({len(values)})"


def table(trials: list[dict], axis: str, values: list, key: str) -> str:
    """Rows: the axis's values; columns: each optimizer; cells: mean ± sd (n) of `key` over seeds and the other axis."""
    cells = defaultdict(list)
    for t in trials:
        if t.get(key) is not None:
            cells[(t["params"][axis], t["params"]["optimizer"])].append(t[key])
    head = f"| {axis} | " + " | ".join(OPTIMIZERS) + " |\n|---|" + "---|" * len(OPTIMIZERS) + "\n"
    return head + "\n".join(f"| {v} | " + " | ".join(mean_sd(cells[(v, o)]) for o in OPTIMIZERS) + " |" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24, help="training steps per trial")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--dev", type=int, default=100, help="dev examples (the kept prompt is the best on them)")
    parser.add_argument("--test", type=int, default=200, help="held-out test examples scored per trial")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        config = tmp / "ablation.yaml"
        config.write_text(yaml.safe_dump({**search_config(args.steps, args.seeds, args.dev, args.test),
                                          "storage_path": str(tmp / "runs")}))
        softprompt = [sys.executable, "-m", "softprompt"]
        started = time.perf_counter()
        subprocess.run([*softprompt, "search", "run", str(config), "--tracking-uri", "none"], check=True)
        minutes = (time.perf_counter() - started) / 60
        subprocess.run([*softprompt, "search", "report", "ablation", "--storage-path", str(tmp / "runs")], check=True)
        from softprompt.search.record import SearchRecord

        record = SearchRecord.load(str(tmp / "runs"), "ablation")
        trials = [{"params": t["params"], "dev": t["metric"], "test": t["test_accuracy"], "status": t["status"]}
                  for t in record.trials]
        RESULTS.mkdir(exist_ok=True)
        report = record.storage.folder / "report.md"
        if (record.storage.folder / "report.png").is_file():
            shutil.copyfile(record.storage.folder / "report.png", RESULTS / "ablation.png")
        report_text = report.read_text() if report.is_file() else "(no report.md)"
    (RESULTS / "ablation.json").write_text(json.dumps({"args": vars(args), "minutes": minutes, "trials": trials},
                                                      indent=2, default=str))
    (RESULTS / "ablation.md").write_text(
        f"# Ablations as a grid search (bench/bench_ablation.py)\n\n"
        f"SmolLM2-135M (fp32, CPU), rotten_tomatoes, lr 0.3, batch 8, {args.steps} steps per trial, "
        f"{len(trials)} trials ({len(LENGTHS)} lengths x {len(INITS)} inits x {len(OPTIMIZERS)} optimizers x "
        f"{args.seeds} seeds), kept prompt = best of one dev evaluation on {args.dev} examples at the last step, "
        f"test accuracy on {args.test} held-out examples. {minutes:.0f} min on this machine (2 cores, 2 trials "
        f"at a time).\n\nCells: mean ± sd (n) over seeds and the other axis.\n\n"
        + "".join(f"## {what} by {axis}\n\n{table(trials, axis, values, key)}\n\n"
                  for what, key in (("Held-out test accuracy", "test"), ("Dev accuracy", "dev"))
                  for axis, values in (("prompt_length", LENGTHS), ("init", INITS))) +
        f"## `softprompt search report ablation` (every parameter, both optimizers pooled)\n\n{report_text}\n\n"
        f"![per-parameter effect](ablation.png)\n")
    print((RESULTS / "ablation.md").read_text())


if __name__ == "__main__":
    main()
