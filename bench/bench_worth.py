"""Is a search worth its compute? Any search config against its own default point, at equal compute.

The unit of compute is one full run of the config's default trial, as `softprompt train` runs it
(backbone load, tokenising, training, dev scoring, the final test scoring): T1 seconds of the whole
machine. Budgets are 2, 4 and 8 T1 (`--multiples`); one run per arm and seed at the largest budget
gives the smaller ones as its best-so-far. Arms:
- a:  the default point at its own run (what `softprompt train` gives);
- a': the default point trained for the whole budget (its kept prompt at each budget);
- b:  random search without early stopping;
- c:  the config's own search (TPE + ASHA in the shipped configs).
A search's winner at budget k T1 is the best of its trials that ended by then (ranked as the search
ranks them: confirmed dev score first). Every winner is scored on the whole test split, outside the
budget. Writes bench/results/worth.{md,json,png}.

    python bench/bench_worth.py examples/demo.yaml --seeds 3
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import ray
import torch
from ray.tune import ExperimentAnalysis

from softprompt.models.backbone import load_backbone
from softprompt.models.checkpoint import load_checkpoint
from softprompt.models.evaluate import evaluate
from softprompt.models.prompt import PromptedModel, SoftPrompt
from softprompt.search.config import load_search_config
from softprompt.search.record import SearchRecord, rank_rows
from softprompt.search.storage import SearchStorage
from softprompt.search.tuner import _points, give_local_workers_env, run_search
from softprompt.trainables.config import trial_config
from softprompt.trainables.loop import prepare_data, train, zero_shot

RESULTS = Path(__file__).parent / "results"
ARMS = {"a": "default point, its own run", "a'": "default point, whole budget", "b": "random search, no early stopping",
        "c": "the config's search"}


READING = "Reading (written by hand"


class BudgetSpent(Exception):
    pass


def default_run(cfg, point: dict, seed: int, marks: list[float] | None = None, t1: float | None = None):
    """The default point as `softprompt train` runs it. With `marks` (multiples of `t1`), it trains on
    until the last mark and returns its kept prompt at each; else the run's own kept prompt and wall time."""
    started = time.perf_counter()
    train_cfg = trial_config(point, {**cfg.train.to_dict(), "seed": seed})
    if marks:  # as many steps as could fit; the budget, not max_steps, ends it
        train_cfg = train_cfg.replace(max_steps=train_cfg.max_steps * int(max(marks)) * 2, eval_steps=None,
                                      eval_every=min(train_cfg.eval_steps or (train_cfg.eval_every,)))
    backbone = load_backbone(train_cfg.model, train_cfg.dtype)
    data = prepare_data(train_cfg, backbone)
    if not marks:
        result = train(train_cfg, backbone, data)
        return {"wall_s": time.perf_counter() - started, "prompt": result["prompt"]}
    kept, pending = {}, sorted(marks)

    def report(metrics, save):
        with tempfile.TemporaryDirectory() as folder:
            save(Path(folder))
            prompt = load_checkpoint(Path(folder) / "best").prompt
        elapsed = (time.perf_counter() - started) / t1
        while pending and elapsed >= pending[0]:
            kept[pending.pop(0)] = prev["prompt"]  # what it had kept when the mark passed
        prev["prompt"] = prompt
        if not pending:
            raise BudgetSpent

    prev = {"prompt": None}
    try:
        train(train_cfg, backbone, data, report=report, score_test=False)
    except BudgetSpent:
        pass
    for mark in pending:  # max_steps reached first
        kept[mark] = prev["prompt"]
    return {"kept": {m: (p if p is not None else prev["prompt"]) for m, p in kept.items()}}


def search_arm(cfg, arm: str, seed: int, budget_s: float, storage: Path):
    """Arm b or c as a real search of `budget_s`; each trial's end time and the search's start."""
    changes = {"name": f"worth-{arm}-{seed}", "seed": seed, "storage_path": str(storage), "time_limit_s": budget_s,
               "trials": 10_000, "train": cfg.train.replace(seed=seed)}
    if arm == "b":
        changes.update(sampler="random", scheduler="none", startup_trials=None, points_to_evaluate=())
    search = dataclasses.replace(cfg, **changes)
    started = time.time()
    run_search(search)
    record = SearchRecord.load(search.storage_path, search.name)
    ended = {t.trial_id: (t.last_result or {}).get("timestamp", started) - started
             for t in ExperimentAnalysis(SearchStorage(search.storage_path, search.name).tune_path()).trials}
    return record, ended


def winner_by(record: SearchRecord, ended: dict, limit_s: float):
    """The search's winner among the trials that ended within `limit_s`, as the search ranks them."""
    rows = [r for r in record.evaluated() if ended.get(r["trial_id"], float("inf")) <= limit_s]
    return rank_rows(rows, record.config.mode)[0] if rows else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], help="config overrides, as `softprompt search run --set`")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run from this one on")
    parser.add_argument("--append", action="store_true",
                        help="add these seeds' runs to --out's .json (same config, --set and multiples) instead of "
                             "starting a new one")
    parser.add_argument("--multiples", type=float, nargs="+", default=[2, 4, 8])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--out", type=Path, default=RESULTS / "worth.md")
    parser.add_argument("--render", action="store_true", help="only write the .md and .png again from --out's .json")
    args = parser.parse_args()
    if args.render:
        write(json.loads(args.out.with_suffix(".json").read_text()), args.out)
        return
    cfg = load_search_config(args.config, args.set)
    points = _points(cfg)
    if not points:
        raise SystemExit(f"{args.config}: no default point (a named space's, or points_to_evaluate)")
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    give_local_workers_env()
    ray.init(num_cpus=cores, include_dashboard=False, configure_logging=False, logging_level="WARNING")

    judge_cfg = trial_config(points[0], {**cfg.train.to_dict(), "max_test_examples": None})
    backbone = load_backbone(judge_cfg.model, judge_cfg.dtype)
    data = prepare_data(judge_cfg, backbone)

    def score(prompt):
        return evaluate(PromptedModel(backbone, SoftPrompt(prompt)), data, "test", judge_cfg.eval_mode,
                        judge_cfg.eval_batch_size)["accuracy"]

    results = {"config": args.config, "sets": args.set, "multiples": args.multiples,
               "test_examples": len(data.splits["test"]),
               "zero_shot": zero_shot(judge_cfg, backbone, data)["accuracy"], "t1_s": [], "runs": []}
    if args.append:
        earlier = json.loads(args.out.with_suffix(".json").read_text())
        same = ("config", "sets", "multiples", "test_examples")
        if any(earlier[k] != results[k] for k in same):
            raise SystemExit(f"--append: {args.out.with_suffix('.json')} has other {', '.join(same)}")
        done = {r["seed"] for r in earlier["runs"]}
        if done & set(range(args.first_seed, args.first_seed + args.seeds)):
            raise SystemExit(f"--append: seeds {sorted(done)} are already in {args.out.with_suffix('.json')}")
        results = earlier
    storage = Path(tempfile.mkdtemp(prefix="bench-worth-"))
    try:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            own = default_run(cfg, points[0], seed)
            t1 = own["wall_s"]
            results["t1_s"].append(t1)
            own_score = score(own["prompt"])  # its own run ends before the smallest budget: one score for all
            run = {"seed": seed, "t1_s": t1, "arms": {"a": {str(m): own_score for m in args.multiples}}}
            print(f"seed {seed}: T1 {t1:.0f} s, a {run['arms']['a'][str(args.multiples[0])]:.4f}", flush=True)
            if "a'" in args.arms:
                kept = default_run(cfg, points[0], seed, args.multiples, t1)["kept"]
                run["arms"]["a'"] = {str(m): score(p) for m, p in kept.items()}
            for arm in [a for a in ("b", "c") if a in args.arms]:
                record, ended = search_arm(cfg, arm, seed, max(args.multiples) * t1, storage)
                marks = {}
                for m in args.multiples:
                    best = winner_by(record, ended, m * t1)
                    prompt = load_checkpoint(record.storage.local_copy(best["prompt"])).prompt if best else None
                    marks[str(m)] = score(prompt) if prompt is not None else None
                run["arms"][arm] = marks
                run.setdefault("trials", {})[arm] = len(record.trials)
                # each trial: how far it got and what ranked it (the winner pick's inputs), for a later reading
                run.setdefault("trial_rows", {})[arm] = [
                    {"params": r["params"], "status": r["status"], "step": r["step"], "metric": r["metric"],
                     "confirmed": r["confirmed"], "ended_s": ended.get(r["trial_id"])} for r in record.trials]
            print(f"seed {seed}: " + "; ".join(f"{a} {v}" for a, v in run["arms"].items()), flush=True)
            results["runs"].append(run)
            write(results, args.out)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    print(args.out.read_text())


def summary(results: dict) -> dict:
    """Per arm and budget: median, min and max of the winners' test accuracy over seeds."""
    table = {}
    for arm in ARMS:
        for m in results["multiples"]:
            values = [r["arms"][arm][str(m)] for r in results["runs"] if r["arms"].get(arm, {}).get(str(m)) is not None]
            if values:
                table.setdefault(arm, {})[m] = (statistics.median(values), min(values), max(values), len(values))
    return table


def goal_line(table: dict, m: float) -> str:
    """Whether c's median reached a's and b's at budget `m`, with the figures."""
    medians = {arm: table[arm][m][0] for arm in ("a", "b", "c") if m in table.get(arm, {})}
    if len(medians) < 3:
        return f"- {m:g} T1: not measured (arms {sorted(medians)})"
    held = medians["c"] >= medians["a"] and medians["c"] >= medians["b"]
    return (f"- {m:g} T1: **{'held' if held else 'did not hold'}**: c {medians['c']:.4f}, a {medians['a']:.4f} "
            f"({(medians['c'] - medians['a']) * 100:+.2f} points), b {medians['b']:.4f} "
            f"({(medians['c'] - medians['b']) * 100:+.2f})")


def write(results: dict, out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    table = summary(results)
    lines = ["# Is the search worth its compute?", "",
             f"`python bench/bench_worth.py {results['config']}" + "".join(f" --set {s}" for s in results["sets"])
             + f"`: budgets in multiples of T1, one run of the default trial (median T1 "
             f"{statistics.median(results['t1_s']):.0f} s). Winners scored on the whole test split "
             f"({results['test_examples']} examples); zero-shot {results['zero_shot']:.4f}.", "",
             "| arm | " + " | ".join(f"{m:g} T1" for m in results["multiples"]) + " |",
             "|---|" + "---|" * len(results["multiples"])]
    for arm, by in table.items():
        cells = [f"{by[m][0]:.4f} [{by[m][1]:.4f}-{by[m][2]:.4f}] (n={by[m][3]})" if m in by else "-"
                 for m in results["multiples"]]
        lines.append(f"| {arm}: {ARMS[arm]} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed (T1; trials the searches ran in 8 T1):", "",
              "| seed | T1 | " + " | ".join(f"{arm} at {m:g} T1" for arm in ARMS for m in results["multiples"][1:])
              + " | trials b | trials c |", "|---|---|" + "---|" * (len(ARMS) * (len(results["multiples"]) - 1) + 2)]
    for run in results["runs"]:
        cells = [f"{run['arms'][arm][str(m)]:.4f}" if run["arms"].get(arm, {}).get(str(m)) is not None else "-"
                 for arm in ARMS for m in results["multiples"][1:]]
        trials = run.get("trials", {})
        lines.append(f"| {run['seed']} | {run['t1_s']:.0f} s | " + " | ".join(cells)
                     + f" | {trials.get('b', '-')} | {trials.get('c', '-')} |")
    lines += ["", "Goal: the search's (c) median at least the default's (a) and random search's (b) at 4 and 8 T1.", ""]
    lines += [goal_line(table, m) for m in results["multiples"] if m >= 4]
    written = out.read_text() if out.exists() else ""
    reading = written[written.index(READING):] if READING in written else ""  # kept across runs and --render
    out.write_text("\n".join(lines) + "\n" + (f"\n{reading}" if reading else ""))
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for arm, by in table.items():
        xs = sorted(by)
        axis.plot(xs, [by[m][0] for m in xs], marker="o", label=f"{arm}: {ARMS[arm]}")
        axis.fill_between(xs, [by[m][1] for m in xs], [by[m][2] for m in xs], alpha=0.15)
    axis.axhline(results["zero_shot"], color="grey", linestyle=":", label="zero-shot")
    axis.set(xlabel="compute (multiples of one default run, T1)", ylabel="winner's test accuracy (median, range)",
             xscale="log", title="Best so far at equal compute")
    axis.set_xticks(results["multiples"], [f"{m:g}" for m in results["multiples"]])
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
