"""Which early signal predicts a trial's final quality? For the search bench's sampled points
(each seed's 8 trials of the demo setting), trains every trial to the end with no early stopping
and records, at ASHA's rungs, several signals computed from the same forward passes on the 100
dev examples: accuracy (the search metric, which ASHA compared before the demo moved to training
loss), the accuracy with the decision threshold re-centred (calibration-free), ROC AUC of the
class-score margin, the dev log-loss, and the training loss. The target is each trial's confirmed dev
accuracy (500 further examples).

Then replays ASHA offline on those curves, once per signal: the demo's rungs (5, 15, 45), factor 3,
two workers, Ray's cutoff rule (a trial reaching a rung stops if it is below the (1 - 1/3)
quantile of the values recorded there before it). Per seed, and over many draws of 8 trials
(the default point first, then 7 of the others at random): the share of steps ASHA spends, and
how often its winner (the best confirmed trial that ran to the end) is within 1 point of the best.

Writes bench/results/rung_signals.json (about 40 min for seeds 0 and 1 on 2 cores) and
rung_signals.md; `--analyse` redoes only the second part from the JSON file.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import optuna
import torch

RESULTS = Path(__file__).parent / "results"
DEMO = Path(__file__).parents[1] / "examples" / "demo.yaml"


def points(seed: int, n: int) -> list[dict]:
    """The points a search with this seed samples first (TPE draws at random for its first 10)."""
    from softprompt.spaces import DEFAULT_POINTS, quick
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    study.enqueue_trial(DEFAULT_POINTS["quick"])
    out = []
    for _ in range(n):
        trial = study.ask()
        quick(trial, ["smollm2-135m"])
        out.append(dict(trial.params))
    return out


def signals(scores: np.ndarray, labels: np.ndarray) -> dict:
    """Rank-classification signals from [N, 2] class log-likelihoods."""
    from softprompt.models.evaluate import auc, log_loss
    s = scores.astype(np.float32)  # as recorded: margins of float32 scores
    margin = s[:, 1] - s[:, 0]
    centred = margin - np.median(margin)
    return {"accuracy": float(np.mean((margin > 0) == (labels == 1))),
            "centred_accuracy": float(np.mean((centred > 0) == (labels == 1))),
            "auc": auc(s, labels), "log_loss": log_loss(s, labels), "margin": margin.tolist()}


def run_trial(job: tuple) -> dict:
    seed, params = job
    torch.set_num_threads(1)
    import softprompt.trainables.loop as loop
    from softprompt.models.backbone import cached_backbone
    from softprompt.models.evaluate import evaluate, split_class_scores
    from softprompt.models.precision import default_device
    from softprompt.search.config import load_search_config
    from softprompt.trainables.config import fields_from_params

    search = load_search_config(str(DEMO), ["train.confirm_examples=500"])
    cfg = search.train.replace(**fields_from_params(params, search.train.max_steps))
    backbone, _ = cached_backbone(cfg.model, cfg.dtype, default_device())
    global _DATA
    if "_DATA" not in globals():
        _DATA = loop.prepare_data(cfg, backbone)
    data = _DATA
    recorded = {}

    def recording_evaluate(pm, data, split="dev", mode="rank", batch_size=32):
        if split != "dev":
            return evaluate(pm, data, split, mode, batch_size)
        rows = data.splits["dev"]
        recorded["last"] = signals(split_class_scores(pm, data, rows, batch_size), np.asarray(rows.labels))
        return {"accuracy": recorded["last"]["accuracy"], "f1": 0.0}

    loop.evaluate = recording_evaluate
    curve = {}

    def report(metrics, save):
        curve[metrics["step"]] = {**recorded["last"], "train_loss": metrics["train_loss"]}

    result = loop.train(cfg, backbone, data, report=report)
    print(f"seed {seed} {params}: confirmed {result.get('confirmed_dev_accuracy')}", flush=True)
    return {"seed": seed, "params": params, "curve": curve, "best_dev_accuracy": result["best_dev_accuracy"],
            "confirmed": result.get("confirmed_dev_accuracy"), "test_accuracy_100": result.get("test_accuracy")}


# ---- the offline replay ----

MAX_STEPS, RUNGS, FACTOR, WORKERS = 45, (5, 15), 3, 2
EVAL_COST, CONFIRM_COST = 5, 25  # in training steps: 100 and 500 dev examples
SIGNALS = {  # larger is better; each is what ASHA would read at a rung
    "best dev accuracy (the search metric)": lambda c, s: max(v["accuracy"] for k, v in c.items() if k <= s),
    "dev accuracy": lambda c, s: c[s]["accuracy"],
    "centred dev accuracy": lambda c, s: c[s]["centred_accuracy"],
    "dev AUC": lambda c, s: c[s]["auc"],
    "dev log-loss (negated)": lambda c, s: -c[s]["log_loss"],
    "train loss (negated)": lambda c, s: -c[s]["train_loss"],
}


def replay_asha(trials: list[dict], signal) -> tuple[int, list[int]]:
    """Trial-steps spent and the trials that reached MAX_STEPS, under async ASHA on WORKERS workers."""
    recorded = {r: [] for r in RUNGS}
    queue, running, steps, finished = list(range(len(trials))), {}, 0, []

    def start(worker: int, now: float) -> None:
        if queue:
            running[worker] = (queue.pop(0), 0, now + RUNGS[0] + EVAL_COST)

    for worker in range(WORKERS):
        start(worker, 0.0)
    milestones = (*RUNGS, MAX_STEPS)
    while running:
        worker = min(running, key=lambda w: running[w][2])
        i, k, now = running.pop(worker)
        step = milestones[k]
        if step == MAX_STEPS:
            steps += step
            finished.append(i)
            start(worker, now + CONFIRM_COST)
            continue
        value, seen = signal(trials[i]["curve"], step), recorded[step]
        cutoff = float(np.nanpercentile(seen, (1 - 1 / FACTOR) * 100)) if seen else None
        seen.append(value)
        if cutoff is not None and value < cutoff:
            steps += step
            start(worker, now)
        else:
            running[worker] = (i, k + 1, now + milestones[k + 1] - step + EVAL_COST)
    return steps, finished


def spearman(a, b) -> float:
    def ranks(x):
        return np.argsort(np.argsort(x))

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def analyse(rows: list[dict], draws: int = 3000) -> str:
    for row in rows:
        row["curve"] = {int(k): v for k, v in row["curve"].items()}
    unique = list({json.dumps(r["params"], sort_keys=True): r for r in rows}.values())
    default = rows[0]
    others = [r for r in unique if r["params"] != default["params"]]
    final = [r["confirmed"] for r in unique]
    lines = ["# Which early signal predicts a trial's final quality? (bench/rung_signals.py)", "",
             f"{len(unique)} trials of the demo setting (seeds {sorted({r['seed'] for r in rows})} of the search "
             f"bench, trained to step {MAX_STEPS} without stopping). Spearman correlation between each signal at "
             f"a rung and the trial's confirmed dev accuracy (500 examples) at the end:", "",
             "| signal | " + " | ".join(f"step {s}" for s in RUNGS) + " |", "|---|" + "---:|" * len(RUNGS)]
    for name, signal in SIGNALS.items():
        lines.append(f"| {name} | " + " | ".join(f"{spearman([signal(r['curve'], s) for r in unique], final):+.2f}"
                                               for s in RUNGS) + " |")
    rng = np.random.default_rng(0)
    samples = [[default, *(others[i] for i in rng.choice(len(others), 7, replace=False))] for _ in range(draws)]
    noise = [{id(r): {s: rng.random() for s in RUNGS} for r in sample} for sample in samples]
    seeds = sorted({r["seed"] for r in rows})
    lines += ["", f"ASHA replayed on those curves (rungs {', '.join(map(str, RUNGS))}, factor {FACTOR}, "
              f"{WORKERS} workers). "
              f"Per seed: the share of the {8 * MAX_STEPS} steps spent and the winner's confirmed accuracy "
              f"against the best trial's. Over {draws} draws of 8 trials (the default point first): the mean share, "
              "how often the winner is within 1 point of the best, and how often both goals hold (at most "
              "40% of the steps and within 1 point). \"random\" stops trials on coin flips: a signal with "
              "no information.", "",
              "| signal | " + " | ".join(f"seed {s}: steps, gap" for s in seeds)
              + " | draws: steps | within 1 point | both |", "|---|" + "---|" * len(seeds) + "---:|---:|---:|"]
    for name, signal in [*SIGNALS.items(), ("random", None)]:
        cells = []
        for seed in seeds:
            trials = [r for r in rows if r["seed"] == seed]
            if signal is None:
                cells.append("")
                continue
            steps, finished = replay_asha(trials, signal)
            gap = 100 * (max(trials[i]["confirmed"] for i in finished) - max(r["confirmed"] for r in trials))
            cells.append(f"{steps / (len(trials) * MAX_STEPS):.0%}, {gap:+.1f}")
        outcomes = []
        for sample, coins in zip(samples, noise):
            read = signal
            if signal is None:  # a coin per trial and rung
                by_curve = {id(r["curve"]): coins[id(r)] for r in sample}

                def read(c, s, by_curve=by_curve):
                    return by_curve[id(c)][s]

            steps, finished = replay_asha(sample, read)
            gap = max(r["confirmed"] for r in sample) - max(sample[i]["confirmed"] for i in finished)
            outcomes.append((steps / (len(sample) * MAX_STEPS), gap <= 0.01 + 1e-9))
        share, within = np.mean(outcomes, axis=0)
        both = np.mean([s <= 0.4 and w for s, w in outcomes])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {share:.0%} | {within:.0%} | {both:.0%} |")
    top = sorted(unique, key=lambda r: -r["confirmed"])
    critical = 2 / math.sqrt(len(unique) - 1)  # about the 5% two-sided level of a rank correlation
    lines += ["", f"Reading: with {len(unique)} trials a rank correlation under about {critical:.2f} in size is "
              f"indistinguishable from none. The best trial ({top[0]['confirmed']:.3f}, {short(top[0]['params'])}) "
              f"stands {100 * (top[0]['confirmed'] - top[1]['confirmed']):.1f} points above the next "
              f"({top[1]['confirmed']:.3f}), so \"within 1 point\" mostly counts the draws where that one trial "
              "is absent or survives."]
    return "\n".join(lines) + "\n"


def short(params: dict) -> str:
    return ", ".join(f"{k.split('@')[0]} {v:.2g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--out", default=str(RESULTS / "rung_signals.json"))
    parser.add_argument("--analyse", action="store_true", help="only replay ASHA on the curves already in --out")
    args = parser.parse_args()
    if not args.analyse:
        measure(args)
    report = analyse(json.loads(Path(args.out).read_text()))
    Path(args.out).with_suffix(".md").write_text(report)
    print(report)


def measure(args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    jobs = [(seed, p) for seed in args.seeds for p in points(seed, args.trials)]
    unique = list({json.dumps(p, sort_keys=True): (seed, p) for seed, p in reversed(jobs)}.values())
    done = {}
    with ProcessPoolExecutor(2) as pool:  # every seed's first point is the same default: train it once
        for future in as_completed([pool.submit(run_trial, job) for job in unique]):
            result = future.result()
            done[json.dumps(result["params"], sort_keys=True)] = result
            # Written after every trial, so a cut-off run keeps what it measured.
            rows = [{**done[key], "seed": seed} for seed, p in jobs
                    if (key := json.dumps(p, sort_keys=True)) in done]
            Path(args.out).write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
