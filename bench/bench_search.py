"""Search benchmark: ASHA + TPE against random search with no early stopping, at the same trial
budget, on the demo setting (examples/demo.yaml), one after the other in this run.

Reports total trial-steps, wall time, the best dev accuracy each reached, and the fraction of
search wall time spent inside training steps (model reuse, no idle workers). The search without
early stopping evaluates every trial at ASHA's rungs, so the report also shows each trial's dev
accuracy there, where ASHA stopped it, and how well each rung's ranking predicts the final one
(Spearman): whether early stopping can be trusted at this budget.

A trial's best dev accuracy is the largest of its scores on 100 examples, so it is biased upwards.
Trials that run to the end are also scored on 500 further dev examples (`confirm_examples`), and each
search's winner is the best of those. The bench then scores both winners on the whole test split,
which neither search saw: what each winner is really worth. Writes bench/results/search.md (the
README quotes it) and search.json.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import ray
import torch

from softprompt.models.backbone import load_backbone
from softprompt.models.checkpoint import load_checkpoint
from softprompt.models.evaluate import evaluate
from softprompt.models.prompt import PromptedModel, SoftPrompt
from softprompt.search.config import asha_rungs, load_search_config
from softprompt.search.record import SearchRecord
from softprompt.search.tuner import run_search
from softprompt.trainables.loop import prepare_data

RESULTS = Path(__file__).parent / "results"


def measure(cfg) -> dict:
    started = time.perf_counter()
    grid = run_search(cfg)
    wall = time.perf_counter() - started
    rows = SearchRecord.load(cfg.storage_path, cfg.name).trials
    last = [r.metrics for r in grid]
    train_seconds = sum(m.get("train_s", 0.0) for m in last)
    eval_seconds = sum(m.get(key, 0.0) for m in last for key in ("rung_eval_s", "confirm_s", "test_s"))
    loads = [m for m in last if "backbone_reused" in m]
    curves = [{"params": r.config, "status": r.metrics.get("status"), "test_accuracy": r.metrics.get("test_accuracy"),
               "confirmed": r.metrics.get("confirmed_dev_accuracy"),
               "dev_accuracy": {int(step): float(acc) for step, acc in
                                zip(r.metrics_dataframe["step"], r.metrics_dataframe["dev_accuracy"]) if acc == acc}}
              for r in grid if r.metrics_dataframe is not None and "dev_accuracy" in r.metrics_dataframe]
    winner = SearchRecord.load(cfg.storage_path, cfg.name).best()
    return {"trials": len(rows), "trial_steps": sum(r["step"] or 0 for r in rows),
            "statuses": {s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}},
            "best_dev_accuracy": max(r["metric"] for r in rows if r["metric"] is not None),
            "wall_s": wall, "train_s": train_seconds,
            "train_fraction": train_seconds / (wall * cfg.concurrency),
            "eval_s": eval_seconds, "loop_fraction": (train_seconds + eval_seconds) / (wall * cfg.concurrency),
            "backbone_loads": sum(not m["backbone_reused"] for m in loads),
            "backbone_load_s_saved": sum(m["backbone_load_s"] for m in loads if m["backbone_reused"]),
            "winner": {"trial_id": winner["trial_id"], "params": winner["params"], "prompt": winner["prompt"],
                       "best_dev_accuracy": winner["metric"], "confirmed_dev_accuracy": winner["confirmed"]},
            "curves": curves}


def test_accuracy(cfg, prompt_folders: dict[str, str]) -> tuple[dict[str, float], int]:
    """Each prompt's accuracy on the whole test split: no search selected on it."""
    backbone = load_backbone(cfg.train.model, cfg.train.dtype)
    data = prepare_data(cfg.train.replace(max_eval_examples=None, confirm_examples=0), backbone)
    scores = {}
    for name, folder in prompt_folders.items():
        prompt = load_checkpoint(folder, backbone.fingerprint, backbone.width).prompt
        pm = PromptedModel(backbone, SoftPrompt(prompt).to(backbone.device))
        with torch.no_grad():
            scores[name] = evaluate(pm, data, "test", cfg.train.eval_mode, cfg.train.eval_batch_size)["accuracy"]
    return scores, len(data.splits["test"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(Path(__file__).parents[1] / "examples" / "demo.yaml"))
    parser.add_argument("--seed", type=int, help="the searches' seed (default: the config's)")
    parser.add_argument("--out", default="search", help="results file name, without .md/.json")
    parser.add_argument("--confirm", type=int, default=500,
                        help="train.confirm_examples for both searches (the results in bench/results used 500; "
                             "the demo's 200 keeps it under 10 minutes)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a search config override for both searches, e.g. asha_metric=train_loss")
    args = parser.parse_args()
    storage = tempfile.mkdtemp(prefix="softprompt-bench-")
    overrides = [f"storage_path={storage}", f"train.confirm_examples={args.confirm}",
                 *([f"seed={args.seed}"] if args.seed is not None else []), *args.set]
    asha = load_search_config(args.config, [*overrides, "name=asha-tpe"])
    # The same trials' budget and the same dev evaluations (at ASHA's rungs), no early stopping.
    random = load_search_config(args.config, [*overrides, "name=random-full", "scheduler=none", "sampler=random",
                                              f"train.eval_steps={list(asha.train.eval_steps)}"])
    report = {"config": args.config, "asha_tpe": measure(asha), "random_no_stopping": measure(random)}
    ray.shutdown()
    a, r = report["asha_tpe"], report["random_no_stopping"]
    report["step_ratio"] = a["trial_steps"] / r["trial_steps"]
    report["accuracy_gap_points"] = 100 * (r["best_dev_accuracy"] - a["best_dev_accuracy"])
    report["rung_rank_correlation"] = rung_correlations(r["curves"], asha.train.max_steps)
    winners = {"asha_tpe": a["winner"]["prompt"], "random_no_stopping": r["winner"]["prompt"]}
    scores, n_test = test_accuracy(asha, winners)
    for name, accuracy in scores.items():
        report[name]["winner"]["test_accuracy"] = accuracy
    report["test_examples"] = n_test
    report["confirmed_gap_points"] = 100 * (r["winner"]["confirmed_dev_accuracy"]
                                            - a["winner"]["confirmed_dev_accuracy"])
    report["test_gap_points"] = 100 * (scores["random_no_stopping"] - scores["asha_tpe"])
    report["seed"] = asha.seed
    report["overrides"] = args.set
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"{args.out}.md").write_text(render(report, asha))
    print(render(report, asha))
    shutil.rmtree(storage, ignore_errors=True)


def _key(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def rung_correlations(curves: list[dict], final_step: int) -> dict:
    """Spearman correlation, over the trials that ran to the end, of the dev accuracy at each
    earlier evaluated step with the dev accuracy at the last step."""
    done = [c["dev_accuracy"] for c in curves if final_step in c["dev_accuracy"]]
    steps = sorted({s for c in done for s in c} - {final_step})
    final = pd.Series([c[final_step] for c in done])
    return {step: float(pd.Series([c.get(step) for c in done], dtype=float).corr(final, method="spearman"))
            for step in steps}


def short(params: dict) -> str:
    return ", ".join(f"{k.split('@')[0]}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def curve_table(report: dict, final_step: int) -> str:
    """One row per trial of the search without early stopping, best last result first: its dev
    accuracy at each evaluated step, and how far ASHA + TPE ran the same point (if it sampled it)."""
    stopped_at = {_key(c["params"]): max(c["dev_accuracy"], default=0) for c in report["asha_tpe"]["curves"]}
    curves = sorted(report["random_no_stopping"]["curves"], key=lambda c: -c["dev_accuracy"].get(final_step, 0))
    steps = sorted({s for c in curves for s in c["dev_accuracy"]})
    lines = [f"| parameters | {' | '.join(f'dev acc @ {s}' for s in steps)} | confirmed | test acc (first 100) "
             f"| ASHA + TPE ran it to step |", f"|---|{'---:|' * len(steps)}---:|---:|---:|"]
    for c in curves:
        accuracies = " | ".join(f"{c['dev_accuracy'][s]:.2f}" if s in c["dev_accuracy"] else "-" for s in steps)
        where = stopped_at.get(_key(c["params"]))
        test = f"{c['test_accuracy']:.2f}" if c.get("test_accuracy") is not None else "-"
        confirmed = f"{c['confirmed']:.3f}" if c.get("confirmed") is not None else "-"
        lines.append(f"| {short(c['params'])} | {accuracies} | {confirmed} | {test} "
                     f"| {where if where is not None else 'not sampled'} |")
    return "\n".join(lines)


def render(report: dict, cfg) -> str:
    a, r = report["asha_tpe"], report["random_no_stopping"]
    rungs = ", ".join(map(str, asha_rungs(cfg.grace_period, cfg.reduction_factor, cfg.train.max_steps)))

    def row(name, m):
        return (f"| {name} | {m['trials']} | {m['trial_steps']} | {m['wall_s']:.0f} s | "
                f"{m['best_dev_accuracy']:.4f} | {100 * m['loop_fraction']:.0f}% | "
                f"{100 * m['train_fraction']:.0f}% | {m['backbone_loads']} |")

    n = report["test_examples"]
    se = 100 * max(math.sqrt(m["winner"]["test_accuracy"] * (1 - m["winner"]["test_accuracy"]) / n) for m in (a, r))

    def show(value, digits):
        return f"{value:.{digits}f}" if value is not None else "-"

    def winner_row(name, m):
        return (f"| {name} | {m['winner']['trial_id']} | {short(m['winner']['params'])} | "
                f"{show(m['winner']['best_dev_accuracy'], 2)} | "
                f"{show(m['winner']['confirmed_dev_accuracy'], 4)} | {m['winner']['test_accuracy']:.4f} |")

    overrides = f" (run with {', '.join(f'--set {o}' for o in report['overrides'])})" if report.get("overrides") else ""
    runs_header = ("| search | trials | trial-steps | wall time | best dev accuracy | worker time in the training loop "
                   "| of which optimizer steps | model loads |")
    winner_header = (f"| search | winner | its parameters | best dev accuracy ({cfg.train.max_eval_examples}) "
                     f"| confirmed dev accuracy ({cfg.train.confirm_examples}) "
                     f"| test accuracy ({report['test_examples']}) |")
    return f"""# Search benchmark (bench/bench_search.py, seed {report['seed']})

The demo setting ({report['config'].split('/')[-1]}): SmolLM2-135M, rotten_tomatoes, {cfg.trials} trials of up to
{cfg.train.max_steps} steps, {cfg.concurrency} at a time on 2 CPU cores, dev accuracy on
{cfg.train.max_eval_examples} examples.
ASHA compares trials by `{cfg.asha_metric}` at its rungs{overrides}.

{runs_header}
|---|---|---|---|---|---|---|---|
{row("ASHA + TPE", a)}
{row("random, no early stopping", r)}

ASHA + TPE spent {100 * report['step_ratio']:.0f}% of the random search's trial-steps; its best dev accuracy is
{-report['accuracy_gap_points']:+.1f} points from the random search's. ASHA statuses: {a['statuses']}.

"Best dev accuracy" is the largest of a trial's scores on {cfg.train.max_eval_examples} dev examples, biased upwards
by noise, and more so for the search that makes more evaluations. Each search's winner is
therefore the trial with the best accuracy on {cfg.train.confirm_examples} further dev examples (`confirm_examples`;
only trials that ran to step {cfg.train.max_steps} have one), and both winners are scored on the whole test
split ({report['test_examples']} examples, standard error about {se:.1f} points), which no search saw:

{winner_header}
|---|---|---|---:|---:|---:|
{winner_row("ASHA + TPE", a)}
{winner_row("random, no early stopping", r)}

ASHA + TPE's winner is {-report['confirmed_gap_points']:+.1f} points from the random search's on confirmed dev accuracy
and {-report['test_gap_points']:+.1f} points on the test split.
Model reuse saved {a['backbone_load_s_saved'] + r['backbone_load_s_saved']:.1f} s of backbone loading
over both searches.
Both searches evaluate on dev only at ASHA's rungs (steps {rungs}), so every evaluation
is one ASHA uses and both see the same checkpoints.

Learning curves without early stopping (the same seed samples the same points in both searches:
TPE draws at random until it has seen 10 trials):

{curve_table(report, cfg.train.max_steps)}

How well a rung's ranking predicts the ranking at step {cfg.train.max_steps} (Spearman, over the trials above):
{", ".join(f"step {s}: {c:+.2f}" for s, c in report["rung_rank_correlation"].items())}.
ASHA keeps the best third at each rung, so it can only keep the final winner when this is high.

"Worker time in the training loop" is the trials' time inside training steps and their dev/test
evaluations, divided by wall time x concurrency: the rest (start-up, model loading, Ray's
scheduling, checkpoint upload, workers idle at the end of the search) is overhead.
"Of which optimizer steps" counts forward/backward/update alone: on a CPU a dev evaluation of
{cfg.train.max_eval_examples} examples costs about as much as five training steps.
"""


if __name__ == "__main__":
    main()
