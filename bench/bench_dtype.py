"""float32 against bfloat16 training on this CPU at equal wall time (issue 27): which gives the better
prompt for the same compute? Issue 21 compared them at equal steps (bfloat16 -2.17 points at 250
AdamW steps), but a bfloat16 step is about 3x as fast, and a search is judged per unit of compute.

Per task and seed, a float32 and a bfloat16 run of the demo's default point (20-token class-label
prompt, AdamW 0.03, batch 8) train side by side, one core each, for the same `--budget-s` of wall
time, dev scoring included (every `--eval-every` steps, in the run's own dtype: what picks its kept
prompt). Each kept prompt is then scored on the same test examples in float32. Writes
bench/results/dtype.md and dtype.json.

    python bench/bench_dtype.py --tasks rotten_tomatoes sms_spam --seeds 3 --budget-s 240
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from softprompt.models.backbone import load_backbone
from softprompt.models.checkpoint import load_checkpoint
from softprompt.models.evaluate import evaluate
from softprompt.models.precision import cpu_runs_bf16
from softprompt.models.prompt import PromptedModel, SoftPrompt
from softprompt.trainables.config import TrainConfig
from softprompt.trainables.loop import prepare_data, train

RESULTS = Path(__file__).parent / "results"
POINT = dict(prompt_length=20, init="class_label", optimizer="adamw", lr=0.03, batch_size=8)


class BudgetSpent(Exception):
    pass


def timed_run(job: tuple) -> dict:
    """One run of `budget_s` wall seconds: its kept prompt, steps and dev scores."""
    task, dtype, seed, budget_s, eval_every, dev = job
    torch.set_num_threads(1)
    cfg = TrainConfig(model="smollm2-135m", task=task, dtype=dtype, seed=seed, max_steps=100_000, eval_every=eval_every,
                      max_eval_examples=dev, max_test_examples=1, **POINT)
    backbone = load_backbone(cfg.model, dtype)
    data = prepare_data(cfg, backbone)
    seen = {"steps": 0, "prompt": None}
    started = time.perf_counter()

    def report(metrics, save):
        with tempfile.TemporaryDirectory() as folder:
            save(Path(folder))
            seen.update(steps=metrics["step"], prompt=load_checkpoint(Path(folder) / "best").prompt,
                        best_dev=metrics["best_dev_accuracy"])
        if time.perf_counter() - started >= budget_s:
            raise BudgetSpent

    try:
        train(cfg, backbone, data, report=report, score_test=False)
    except BudgetSpent:
        pass
    return {"task": task, "dtype": dtype, "seed": seed, "steps": seen["steps"], "best_dev": seen["best_dev"],
            "wall_s": time.perf_counter() - started, "prompt": seen["prompt"].tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["rotten_tomatoes", "sms_spam"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=240)
    parser.add_argument("--eval-every", type=int, default=15)
    parser.add_argument("--dev", type=int, default=100)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from the saved .json")
    args = parser.parse_args()
    if args.report_only:
        saved = json.loads((RESULTS / "dtype.json").read_text())
        return write(saved["args"], saved["runs"])
    if not cpu_runs_bf16():
        raise SystemExit("this CPU does not run bfloat16 natively: nothing to compare")
    runs = []
    with ProcessPoolExecutor(2) as pool:  # each float32 run beside its bfloat16 twin: the same machine load
        jobs = [(task, dtype, seed, args.budget_s, args.eval_every, args.dev)
                for task in args.tasks for seed in range(args.seeds) for dtype in ("float32", "bfloat16")]
        for run in pool.map(timed_run, jobs):
            runs.append(run)
            print(f"{run['task']} seed {run['seed']} {run['dtype']}: {run['steps']} steps, "
                  f"best dev {run['best_dev']:.4f}", flush=True)
    torch.set_num_threads(2)
    judge = load_backbone("smollm2-135m", "float32")
    for task in args.tasks:
        data = prepare_data(TrainConfig(model="smollm2-135m", task=task, max_test_examples=args.test), judge)
        for run in (r for r in runs if r["task"] == task):
            prompt = SoftPrompt(torch.tensor(run.pop("prompt")))
            run["test_accuracy"] = evaluate(PromptedModel(judge, prompt), data, "test")["accuracy"]
            run["test_examples"] = len(data.splits["test"])
    (RESULTS / "dtype.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    write(vars(args), runs)


def write(args: dict, runs: list[dict]) -> None:
    lines = ["# float32 against bfloat16 training at equal wall time", "",
             f"`python bench/bench_dtype.py --tasks {' '.join(args['tasks'])} --seeds {args['seeds']} --budget-s "
             f"{args['budget_s']:g}`: SmolLM2-135M, {POINT}, a float32 and a bfloat16 run side by side (one core "
             f"each), dev scoring on {args['dev']} examples every {args['eval_every']} steps inside the budget. A run "
             f"stops at its first evaluation past {args['budget_s']:g} s, so the wall time each took is shown. Kept "
             f"prompts scored in float32 on up to {args['test']} test examples.", "",
             "| task | dtype | steps (mean) | wall s (mean) | test accuracy, per seed | mean |",
             "|---|---|---|---|---|---|"]
    gaps = []
    for task in args["tasks"]:
        means = {}
        for dtype in ("float32", "bfloat16"):
            rows = sorted((r for r in runs if r["task"] == task and r["dtype"] == dtype), key=lambda r: r["seed"])
            means[dtype] = statistics.fmean(r["test_accuracy"] for r in rows)
            scores = ", ".join(f"{r['test_accuracy']:.4f}" for r in rows)
            lines.append(f"| {task} | {dtype} | {statistics.fmean(r['steps'] for r in rows):.0f} | "
                         f"{statistics.fmean(r['wall_s'] for r in rows):.0f} | {scores} | {means[dtype]:.4f} |")
        gaps.append(means["bfloat16"] - means["float32"])
    lines += ["", "bfloat16 minus float32, mean test accuracy: "
              + ", ".join(f"{t} {g * 100:+.2f} points" for t, g in zip(args["tasks"], gaps)) + ".", ""]
    (RESULTS / "dtype.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
