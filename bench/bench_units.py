"""Which unit of learning rate means the same on every backbone (issue 27)?

Backbones differ in scale: SmolLM2-135M's token embeddings have an RMS of about 0.12 as the model
receives them, Gemma 3 270M's about 1.0 (it multiplies them by sqrt(640)), T5 1.1's about 11.6. A
prompt element moves by about lr per step under AdamW and under T5X's Adafactor (its first steps are
sign steps), so an absolute lr is a different share of each model's scale. Candidate units:
- absolute: the lr as given;
- embedding_rms: lr times the backbone's embedding RMS (`lr_unit: embedding_rms`);
- Adafactor's parameter scaling: each step is lr times the prompt's own RMS (`parameter_scaling`).

For each backbone, optimizer and lr on a grid, `--seeds` runs of `--steps` steps (class-label init,
20 tokens, batch 8, float32) score their final prompt on held-out examples. The best lr per
(backbone, optimizer) is the grid point with the highest mean; the unit to adopt is the one in which
that best lr moves least between backbones. Writes bench/results/units.md and units.json.

    python bench/bench_units.py --models smollm2-135m gemma3-270m
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from softprompt.models.backbone import load_backbone
from softprompt.trainables.config import TrainConfig
from softprompt.trainables.inits import embedding_rms
from softprompt.trainables.loop import prepare_data, train, zero_shot

RESULTS = Path(__file__).parent / "results"
# optimizer label -> (optimizer, parameter_scaling, absolute lr grid)
GRIDS = {"adamw": ("adamw", False, [0.003, 0.01, 0.03, 0.1, 0.3, 1.0]),
         "adafactor": ("adafactor", False, [0.003, 0.01, 0.03, 0.1, 0.3, 1.0]),
         "adafactor+scaling": ("adafactor", True, [0.01, 0.03, 0.1, 0.3, 1.0, 3.0])}

_WORKER: dict = {}


def _load(model: str, base: dict) -> None:
    torch.set_num_threads(1)  # two single-thread runs side by side use 2 cores best
    cfg = TrainConfig(**base, model=model)
    backbone = load_backbone(model, "float32")
    _WORKER.update(cfg=cfg, backbone=backbone, data=prepare_data(cfg, backbone))


def _run(job: tuple) -> dict:
    label, lr, seed = job
    optimizer, scaling, _ = GRIDS[label]
    cfg = _WORKER["cfg"].replace(optimizer=optimizer, parameter_scaling=scaling, lr=lr, seed=seed)
    started = time.perf_counter()
    result = train(cfg, _WORKER["backbone"], _WORKER["data"])
    return {"optimizer": label, "lr": lr, "seed": seed, "test_accuracy": result["test_accuracy"],
            "test_log_loss": result["test_log_loss"], "seconds": time.perf_counter() - started}


def measure(model: str, base: dict, labels: list[str], seeds: int, lrs: dict | None) -> dict:
    torch.set_num_threads(2)
    cfg = TrainConfig(**base, model=model)
    backbone = load_backbone(model, "float32")
    data = prepare_data(cfg, backbone)
    rms = embedding_rms(backbone.embed, data.common_token_ids)
    baseline = zero_shot(cfg, backbone, data)["accuracy"]
    del backbone, data
    jobs = [(label, lr, seed) for label in labels for lr in (lrs or {}).get(label, GRIDS[label][2])
            for seed in range(seeds)]
    print(f"{model}: embedding RMS {rms:.4f}, zero-shot {baseline:.4f}, {len(jobs)} runs", flush=True)
    runs = []
    with ProcessPoolExecutor(2, initializer=_load, initargs=(model, base)) as pool:
        for run in pool.map(_run, jobs):
            runs.append(run)
            print(f"  {run['optimizer']:<18} lr {run['lr']:<6} seed {run['seed']}: {run['test_accuracy']:.4f}, "
                  f"log-loss {run['test_log_loss']:.4f} "
                  f"({run['seconds']:.0f} s)", flush=True)
    return {"model": model, "embedding_rms": rms, "zero_shot": baseline, "runs": runs}


def best_lrs(result: dict) -> dict:
    """Per optimizer and lr: mean and sd of held-out log-loss and accuracy over seeds, and the lr with the
    lowest mean log-loss. Log-loss, not accuracy, picks it: at a few dozen steps accuracy on a few hundred
    examples moves by less than its seed-to-seed spread, while the log-loss of the true class moves smoothly."""
    table = {}
    for label in dict.fromkeys(r["optimizer"] for r in result["runs"]):
        by_lr = {}
        for run in sorted(result["runs"], key=lambda r: r["seed"]):  # the same seed order for every lr
            if run["optimizer"] == label:
                by_lr.setdefault(run["lr"], []).append(run)
        stats = {lr: {key: (statistics.fmean(r[key] for r in runs),
                            statistics.stdev(r[key] for r in runs) if len(runs) > 1 else 0.0)
                      for key in ("test_log_loss", "test_accuracy")} | {"n": len(runs)}
                 for lr, runs in sorted(by_lr.items())}
        table[label] = {"by_lr": stats, "best_lr": min(stats, key=lambda lr: stats[lr]["test_log_loss"][0]),
                        "fitted_lr": fitted_best({lr: st["test_log_loss"][0] for lr, st in stats.items()}),
                        "best_share": bootstrap_best({lr: [r["test_log_loss"] for r in runs]
                                                      for lr, runs in by_lr.items()})}
    return table


def fitted_best(mean_loss: dict[float, float]) -> float | None:
    """The vertex of a parabola through mean log-loss against log10(lr): a best lr between grid points.
    None where the curve is not convex or its vertex lies outside the grid."""
    x = np.log10(sorted(mean_loss))
    a, b, _ = np.polyfit(x, [mean_loss[lr] for lr in sorted(mean_loss)], 2)
    vertex = -b / (2 * a) if a > 0 else None
    return float(10 ** vertex) if vertex is not None and x[0] <= vertex <= x[-1] else None


def bootstrap_best(losses: dict[float, list[float]], draws: int = 2000) -> dict[float, float]:
    """How often each lr has the lowest mean log-loss when the seeds are resampled with replacement (the
    same seeds for every lr: a seed fixes the init and the batch order, so lrs are compared paired):
    how firmly the grid's best is the best."""
    rng = np.random.default_rng(0)
    lrs = sorted(losses)
    table = np.array([losses[lr] for lr in lrs])  # [lr, seed], seeds in the same order for every lr
    picks = rng.integers(0, table.shape[1], (draws, table.shape[1]))
    wins = np.bincount(table[:, picks].mean(-1).argmin(0), minlength=len(lrs)) / draws
    return dict(zip(lrs, wins.tolist()))


def report(results: list[dict], args) -> str:
    lines = ["# Learning-rate units across backbones", "",
             f"`python bench/bench_units.py --models {' '.join(r['model'] for r in results)} --seeds {args.seeds} "
             f"--steps {args.steps}`: rotten_tomatoes, {args.steps} steps of batch 8, a 20-token class-label prompt, "
             f"float32; each run's final prompt scored on {args.test} test examples; {args.seeds} seeds per point, two "
             f"single-thread runs at a time on a 2-core CPU. The best lr is the one with the lowest mean held-out "
             f"log-loss (of the true class, renormalised over the classes); \"best in resamples\": how often each "
             f"lr is the best when the seeds are resampled with replacement, the same seeds for every lr "
             f"(2,000 draws).", ""]
    results = sorted(results, key=lambda r: r["embedding_rms"])  # the smaller scale first
    tables = {r["model"]: best_lrs(r) for r in results}
    for result in results:
        lines += [f"## {result['model']}: embedding RMS {result['embedding_rms']:.4f}, zero-shot accuracy "
                  f"{result['zero_shot']:.4f}", "",
                  "| optimizer | lr (absolute) | lr / embedding RMS | log-loss, mean ± sd | accuracy, mean ± sd | n | "
                  "best in resamples |", "|---|---|---|---|---|---|---|"]
        for label, entry in tables[result["model"]].items():
            for lr, st in entry["by_lr"].items():
                mark = " **best**" if lr == entry["best_lr"] else ""
                (ll, ll_sd), (acc, acc_sd) = st["test_log_loss"], st["test_accuracy"]
                lines.append(f"| {label} | {lr:g}{mark} | {lr / result['embedding_rms']:.3g} | "
                             f"{ll:.4f} ± {ll_sd:.4f} | {acc:.4f} ± {acc_sd:.4f} | {st['n']} | "
                             f"{entry['best_share'][lr]:.0%} |")
        lines.append("")
    if len(results) >= 2:
        a, b = results[0], results[1]
        ratio = b["embedding_rms"] / a["embedding_rms"]
        lines += [f"## How far the best lr moves from {a['model']} to {b['model']}", "",
                  f"The embedding RMS is {ratio:.2f}x as large on {b['model']}. A factor of 1 means the same value is "
                  f"best on both backbones in that unit; the grid's step is about 3x.", "",
                  "| optimizer | best absolute lr (grid) | factor, absolute units | factor, embedding-RMS units | "
                  "fitted best (parabola) | factor, absolute | factor, embedding-RMS |",
                  "|---|---|---|---|---|---|---|"]

        def shown(f):
            return f"{max(f, 1 / f):.2g}x" + ("" if abs(f - 1) < 1e-9 else f" ({'higher' if f > 1 else 'lower'})")

        for label in tables[a["model"]]:
            if label not in tables[b["model"]]:
                continue
            scaling = "scaling" in label  # its lr is already relative: a share of the prompt's own RMS
            cells = []
            for key in ("best_lr", "fitted_lr"):
                la, lb = tables[a["model"]][label][key], tables[b["model"]][label][key]
                if la is None or lb is None:
                    cells += ["-", "-", "-"]
                    continue
                cells += [f"{la:.3g} / {lb:.3g}", shown(lb / la),
                          "(already relative)" if scaling else shown(lb / la / ratio)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--optimizers", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--lrs", type=json.loads, default=None,
                        help='JSON: per model, per optimizer, an lr list, e.g. {"gemma3-270m": {"adamw": [0.1, 0.3]}}')
    parser.add_argument("--out", type=Path, default=RESULTS / "units.md")
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from the saved .json")
    args = parser.parse_args()
    base = dict(task="rotten_tomatoes", prompt_length=20, init="class_label", batch_size=8, max_steps=args.steps,
                eval_steps=(args.steps,), max_eval_examples=16, max_test_examples=args.test, dtype="float32")
    saved = args.out.with_suffix(".json")
    results = json.loads(saved.read_text()) if saved.exists() else []  # a model measured before is kept
    for model in [] if args.report_only else args.models:
        fresh = measure(model, base, args.optimizers, args.seeds, (args.lrs or {}).get(model))
        before = next((r for r in results if r["model"] == model), None)
        if before:  # runs measured before for other points are kept; the same point is replaced
            points = {(r["optimizer"], r["lr"], r["seed"]) for r in fresh["runs"]}
            kept = [r for r in before["runs"] if (r["optimizer"], r["lr"], r["seed"]) not in points]
            fresh["runs"] = kept + fresh["runs"]
            results.remove(before)
        results.append(fresh)
        saved.write_text(json.dumps(results, indent=1))
        args.out.write_text(report(results, args))
    args.out.write_text(report(results, args))
    print(args.out.read_text())


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
