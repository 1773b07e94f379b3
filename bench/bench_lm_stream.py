"""LM adaptation, the corpus streamed against the corpus in the driver: the real `softprompt lm-adapt`
job twice in one run on this machine, same model, corpus and settings. "driver" is the job as it was
before streaming (commit BEFORE, read from git): the driver reads and tokenises the whole corpus and
ships one token array to every worker through the object store. "streamed" is today's: each worker
reads the corpus through Ray Data and tokenises its own rows as it trains (adaptation/corpus.py).

tokens/s is the job's own figure (its MLflow curve, median over the log windows, the first left out:
it holds start-up); the wall time runs from the call to the job's end, so it holds what the driver
does up front. Writes bench/results/lm_stream.md and lm_stream.json.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_lm_adapt import t5_small
from softprompt.adaptation.config import AdaptConfig
from softprompt.adaptation.lm_adapt import run_adaptation
from softprompt.models.tasks import OFFLINE_TASKS

RESULTS = Path(__file__).parent / "results"
BEFORE = "1338754"  # the last commit whose lm-adapt tokenised the corpus in the driver


def tree_before(tmp: Path) -> Path:
    """Commit BEFORE's packages, unpacked from git. They were top-level then (adaptation, search,
    trainables, ...), so they import beside the installed `softprompt`; Ray's workers find them through
    PYTHONPATH, set before Ray starts."""
    folder = tmp / "before"
    folder.mkdir()
    archive = subprocess.run(["git", "archive", BEFORE, "adaptation", "search", "serving", "spaces", "trainables"],
                             capture_output=True, check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def job_before(folder: Path):
    """The AdaptConfig and run_adaptation of commit BEFORE."""
    sys.path.insert(0, str(folder))
    module = importlib.import_module("adaptation.lm_adapt")
    return module.AdaptConfig, module.run_adaptation

def arm(name: str, job, model: Path, corpus: Path, args, tmp: Path) -> dict:
    from mlflow.tracking import MlflowClient

    config, run = job
    uri = f"sqlite:///{tmp / f'mlflow-{name}.db'}"
    start = time.perf_counter()
    run(config(model=str(model), corpus=str(corpus), steps=(args.steps,), out=str(tmp / f"out-{name}"),
               workers=args.workers, batch_size=args.batch, seq_len=args.seq_len, log_every=5,
               checkpoint_every=args.steps, tracking_uri=uri))
    wall = time.perf_counter() - start
    client = MlflowClient(uri)
    run_id = client.search_runs([client.get_experiment_by_name("softprompt").experiment_id])[0].info.run_id
    curve = [m.value for m in sorted(client.get_metric_history(run_id, "tokens_per_s"), key=lambda m: m.step)]
    return {"arm": name, "tokens_per_s": float(np.median(curve[1:])), "curve": curve, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # tiny by default: what streaming adds is per token, so the less a step computes, the larger its share
    parser.add_argument("--size", choices=["tiny", "small", "base"], default="tiny")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="sequences per worker and step")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--copies", type=int, default=10, help="the Rotten Tomatoes snippets this many times over")
    args = parser.parse_args()
    import ray

    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        before = tree_before(tmp)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(before), os.environ.get("PYTHONPATH")]))
        ray.init(include_dashboard=True, configure_logging=False, logging_level="WARNING")
        model = t5_small(tmp / "t5", args.size)
        corpus = tmp / "corpus.txt"
        corpus.write_text("\n".join(list(OFFLINE_TASKS["rotten_tomatoes"]().splits["train"]["input"]) * args.copies))
        megabytes = corpus.stat().st_size / 2**20
        arms = [arm("driver", job_before(before), model, corpus, args, tmp),
                arm("streamed", (AdaptConfig, run_adaptation), model, corpus, args, tmp)]
    ratio = arms[1]["tokens_per_s"] / arms[0]["tokens_per_s"]
    cores = int(ray.cluster_resources().get("CPU", 0))
    device = f"{torch.cuda.get_device_name()}" if torch.cuda.is_available() else f"CPU, {cores} cores"
    result = {"size": args.size, "steps": args.steps, "workers": args.workers, "batch_per_worker": args.batch,
              "seq_len": args.seq_len, "corpus_mb": round(megabytes, 1), "device": device,
              "machine": platform.processor() or platform.machine(), "before_commit": BEFORE, "arms": arms,
              "streamed_over_driver": ratio}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lm_stream.json").write_text(json.dumps(result, indent=2))
    rows = "\n".join(f"| {a['arm']} | {a['tokens_per_s']:,.0f} | {a['wall_s']:.0f} |" for a in arms)
    (RESULTS / "lm_stream.md").write_text(
        f"# LM adaptation, corpus streamed vs in the driver (bench/bench_lm_stream.py)\n\n"
        f"T5 1.1 {args.size} architecture (t5_small in bench_lm_adapt.py), random weights, {device}; "
        f"{args.workers} workers, {args.steps} steps per "
        f"arm, {args.batch} sequences of {args.seq_len} tokens per worker and step; corpus: the Rotten Tomatoes "
        f"snippets {args.copies} times over ({megabytes:.0f} MB of text). driver: commit {BEFORE} (the corpus "
        f"tokenised in the driver, one array to every worker); streamed: Ray Data into each worker, tokenised there.\n"
        f"tokens/s counts input and target tokens, all workers together (median over the job's log windows, the "
        f"first left out); wall: the whole job, what the driver does first included.\n\n"
        f"| arm | tokens/s | wall (s) |\n|---|---|---|\n{rows}\n\n"
        f"Streamed over driver: **{ratio:.2f}x** tokens/s.\n")
    print((RESULTS / "lm_stream.md").read_text())


if __name__ == "__main__":
    main()
