"""LM adaptation throughput: the real `softprompt lm-adapt` job (Ray Train, DDP) with 1 and 2 workers
on this machine, same per-worker batch, tokens/s from the job's own MLflow curve.

The model is T5 1.1 small's architecture (t5-v1_1-small: 8 layers, d_model 512, gated-GELU) with
random weights on SmolLM2's 49k vocabulary: the arithmetic of a real checkpoint without the hub
(FIELD_NOTES 7). The corpus is the Rotten Tomatoes snippets. On a CPU the two arms split the same
cores (1 worker x all threads against 2 workers x half each), so the ratio is what data parallelism
costs or gains on one machine; on a GPU machine each worker has a GPU of its own.
Writes bench/results/lm_adapt.md and lm_adapt.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

from softprompt.adaptation.config import AdaptConfig
from softprompt.adaptation.lm_adapt import run_adaptation
from softprompt.models.hub import OFFLINE_MODELS
from softprompt.models.tasks import OFFLINE_TASKS

RESULTS = Path(__file__).parent / "results"


def t5_small(folder: Path, size: str) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(OFFLINE_MODELS["smollm2-135m"]())
    shapes = {"tiny": dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4),  # bench_lm_stream's harsh case
              "small": dict(d_model=512, d_ff=1024, d_kv=64, num_layers=8, num_heads=6),
              "base": dict(d_model=768, d_ff=2048, d_kv=64, num_layers=12, num_heads=12)}[size]
    config = T5Config(vocab_size=len(tokenizer), feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                      decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, **shapes)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def arm(model: Path, corpus: Path, workers: int, steps: int, batch: int, seq_len: int, tmp: Path) -> dict:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp / f'mlflow-{workers}.db'}"
    run_adaptation(AdaptConfig(model=str(model), corpus=str(corpus), steps=(steps,), out=str(tmp / f"out-{workers}"),
                               workers=workers, batch_size=batch, seq_len=seq_len, log_every=5,
                               checkpoint_every=steps, tracking_uri=uri))
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("softprompt").experiment_id])[0]
    curve = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "tokens_per_s"), key=lambda m: m.step)]
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    return {"workers": workers, "tokens_per_s": float(np.median(curve[1:])), "curve": curve, "loss": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["small", "base"], default="small")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8, help="sequences per worker and step")
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    import ray

    ray.init(include_dashboard=True, configure_logging=False, logging_level="WARNING")
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        model = t5_small(tmp / "t5", args.size)
        corpus = tmp / "corpus.txt"
        corpus.write_text("\n".join(OFFLINE_TASKS["rotten_tomatoes"]().splits["train"]["input"]))
        arms = [arm(model, corpus, w, args.steps, args.batch, args.seq_len, tmp) for w in (1, 2)]
    ratio = arms[1]["tokens_per_s"] / arms[0]["tokens_per_s"]
    cores = int(ray.cluster_resources().get("CPU", 0))
    device = f"{torch.cuda.get_device_name()}" if torch.cuda.is_available() else f"CPU, {cores} cores"
    result = {"size": args.size, "steps": args.steps, "batch_per_worker": args.batch, "seq_len": args.seq_len,
              "device": device, "machine": platform.processor() or platform.machine(), "arms": arms,
              "scaling_2_over_1": ratio}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lm_adapt.json").write_text(json.dumps(result, indent=2))
    rows = "\n".join(f"| {a['workers']} | {a['workers'] * args.batch} | {a['tokens_per_s']:,.0f} | "
                     f"{a['loss'][0]:.2f} -> {a['loss'][-1]:.2f} |" for a in arms)
    (RESULTS / "lm_adapt.md").write_text(
        f"# LM adaptation throughput (bench/bench_lm_adapt.py)\n\n"
        f"T5 1.1 {args.size} architecture, random weights, {device}; {args.steps} steps per arm, "
        f"{args.batch} sequences of {args.seq_len} tokens per worker and step (prefix-LM split), T5X Adafactor.\n"
        f"tokens/s counts input and target tokens, all workers together (median over the job's log windows, "
        f"the first left out: it holds start-up).\n\n"
        f"| workers | sequences/step | tokens/s | loss (first -> last window) |\n|---|---|---|---|\n{rows}\n\n"
        f"Scaling, 2 workers over 1: **{ratio:.2f}x** tokens/s.\n")
    print((RESULTS / "lm_adapt.md").read_text())


if __name__ == "__main__":
    main()
