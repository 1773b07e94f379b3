"""GPU figures a CPU machine cannot give. Writes bench/results/gpu.md (and gpu.json):

1. the training loop, ours against PEFT's, in float32 and bfloat16 (bench_core's interleaved timing);
2. trials sharing one GPU, as Ray's fractional GPUs pack them (`resources: {gpu: 0.25}`): n
   processes at once, each capped to 1/n of the GPU's memory as a trial caps itself
   (models/precision.py cap_gpu_memory); their summed examples/s, each one's peak memory,
   and whether the cap holds;
3. how many tokens one forward pass needs before the GPU is busy (serving/ensemble.py
   MIN_PASS_TOKENS["cuda"], the served ensemble's smallest pass).

    python bench/bench_gpu.py [--model smollm2-135m] [--random-weights]

`--random-weights` builds the model's architecture untrained from a folder holding only its
config and tokenizer (a GPU machine that can neither fetch nor carry the weights): the arithmetic,
hence speed and memory, is the same (../shared/FIELD_NOTES.md section 7); no accuracy is reported.
Serving on the GPU is bench/bench_serving.py, run there with `--out bench/results/serving-gpu.md`;
attention kernels against new sequence widths, bench/bench_gpu_attention.py.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_core import speed
from softprompt.models.backbone import load_backbone
from softprompt.models.precision import cap_gpu_memory
from softprompt.trainables.config import TrainConfig
from softprompt.trainables.loop import prepare_data, train

RESULTS = Path(__file__).parent / "results"


def random_weights(folder: str, seed: int = 0) -> str:
    """A copy of `folder` (config and tokenizer) with freshly initialised weights saved in it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(seed)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    out = Path(tempfile.mkdtemp(prefix="random-weights-"))
    for item in Path(folder).iterdir():
        if item.is_file() and not item.name.endswith((".safetensors", ".bin", ".gguf")):
            shutil.copy(item, out / item.name)
    auto.from_config(config).save_pretrained(out)
    return str(out)


def trial_config(model: str, steps: int, warmup: int) -> TrainConfig:
    """The paper's trial shape: a 100-token prompt, batch 32, Adafactor at 0.3; evaluation only
    at `warmup` (ending the warm-up) and at the end, on few examples."""
    return TrainConfig(model=model, prompt_length=100, batch_size=32, max_steps=warmup + steps,
                       eval_steps=(warmup, warmup + steps), max_eval_examples=64,
                       max_train_examples=(warmup + steps) * 32)


def loop_speeds(model: str, steps: int) -> list[dict]:
    rows = []
    for dtype in ("float32", "bfloat16"):
        cfg = TrainConfig(model=model, prompt_length=100, batch_size=32, init="random_uniform", optimizer="adamw",
                          lr=0.03, max_train_examples=steps * 32)
        torch.cuda.reset_peak_memory_stats()
        result = speed(cfg, steps, block=10, dtype=dtype)
        rows.append({"dtype": dtype, **result, "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    return rows


def worker(args) -> None:
    """One packed trial: load, cap memory, wait for the others, train, then try to break the cap."""
    device = torch.device("cuda")
    cap_gpu_memory(args.fraction, device)
    cfg = trial_config(args.model, args.steps, 5)
    backbone = load_backbone(cfg.model, "auto", device)
    data = prepare_data(cfg, backbone)
    ready = Path(args.ready)
    (ready / str(os.getpid())).touch()
    while len(list(ready.iterdir())) < args.n:
        time.sleep(0.05)
    reports = []
    started = time.time()
    train(cfg, backbone, data, report=lambda metrics, save: reports.append(metrics))
    ended = time.time()
    total = torch.cuda.get_device_properties(device).total_memory
    cap_held = None
    if args.fraction < 1:
        try:  # a trial that outgrows its share must fail alone
            blob = torch.empty(int(total * (args.fraction + 0.05)), dtype=torch.uint8, device=device)
            del blob
            cap_held = False
        except torch.OutOfMemoryError:
            cap_held = True
    print(json.dumps({"started": started, "ended": ended, "examples": cfg.max_steps * cfg.batch_size,
                      "steady_examples_per_s": reports[-1]["examples_per_s"],
                      "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
                      "cap_gib": args.fraction * total / 2**30, "cap_held": cap_held}))


def packing(model: str, counts: list[int], steps: int) -> list[dict]:
    rows = []
    for n in counts:
        with tempfile.TemporaryDirectory() as ready:
            procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--model", model, "--fraction", str(1 / n),
                                       "--n", str(n), "--ready", ready, "--steps", str(steps)],
                                      stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                     for _ in range(n)]
            outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        if any(p.returncode for p in procs):
            raise RuntimeError(f"a packed trial failed: {[p.returncode for p in procs]}")
        window = max(o["ended"] for o in outs) - min(o["started"] for o in outs)
        rows.append({"trials": n, "fraction": 1 / n, "total_examples_per_s": sum(o["examples"] for o in outs) / window,
                     "per_trial_steady_examples_per_s": [o["steady_examples_per_s"] for o in outs],
                     "peak_reserved_gib": max(o["peak_reserved_gib"] for o in outs), "cap_gib": outs[0]["cap_gib"],
                     "cap_held": [o["cap_held"] for o in outs]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


@torch.no_grad()
def pass_sizes(model: str, width: int = 64) -> list[dict]:
    """Forward-pass throughput (tokens/s) against tokens per pass, rows of `width` tokens."""
    backbone = load_backbone(model, "auto")
    generator = torch.Generator(device=backbone.device).manual_seed(0)
    rows = []
    for n_rows in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512):
        ids = torch.randint(0, 1000, (n_rows, width), device=backbone.device, generator=generator)
        backbone.model(input_ids=ids, use_cache=False)
        torch.cuda.synchronize()
        times = []
        for _ in range(7):
            started = time.perf_counter()
            backbone.model(input_ids=ids, use_cache=False)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        seconds = statistics.median(times)
        rows.append({"tokens": n_rows * width, "ms": seconds * 1e3, "tokens_per_s": n_rows * width / seconds})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def render(r: dict) -> str:
    lines = ["# GPU benchmark (bench/bench_gpu.py)", "",
             f"{r['device']}, torch {r['torch']}; model `{r['model']}`"
             f"{' with random weights (same architecture and arithmetic)' if r['random_weights'] else ''}; "
             "rotten_tomatoes inputs; prompt length 100, batch 32 (the paper's).", ""]
    if r.get("loop"):
        lines += ["## Training loop: ours against PEFT prompt tuning (examples/s, interleaved blocks)", "",
                  "| dtype | ours, fixed batches | PEFT, fixed batches | ratio | ours, length-bucketed epoch | "
                  "PEFT, shuffled | ratio | peak GPU memory |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in r["loop"]:
            rate = row["examples_per_s"]
            lines.append(f"| {row['dtype']} | {rate['fixed_ours']:.0f} | {rate['fixed_peft']:.0f} | "
                         f"{row['fixed_batches_ratio']:.2f}x | {rate['epoch_ours']:.0f} | {rate['epoch_peft']:.0f} | "
                         f"{row['epoch_ratio']:.2f}x | {row['peak_gib']:.1f} GiB |")
        lines.append("")
    if r.get("packing"):
        base = r["packing"][0]["total_examples_per_s"]
        lines += ["## Trials sharing one GPU (`resources: {gpu: 1/n}`), bfloat16, all n training at once", "",
                  "| trials per GPU | memory cap each | peak memory of a trial | cap held (a trial asking for more "
                  "gets OutOfMemoryError) | examples/s, all trials | against one trial alone |",
                  "|---:|---:|---:|---|---:|---:|"]
        for row in r["packing"]:
            held = "-" if row["cap_held"][0] is None else ("yes, every trial" if all(row["cap_held"]) else
                                                             f"NO ({row['cap_held']})")
            lines.append(f"| {row['trials']} | {row['cap_gib']:.1f} GiB | {row['peak_reserved_gib']:.2f} GiB | "
                         f"{held} | {row['total_examples_per_s']:.0f} | {row['total_examples_per_s'] / base:.2f}x |")
        lines.append("")
    if r.get("pass_sizes"):
        best = max(row["tokens_per_s"] for row in r["pass_sizes"])
        lines += ["## Forward-pass throughput against pass size (bfloat16, no gradients, rows of 64 tokens)", "",
                  "| tokens per pass | ms per pass | tokens/s | of the best |", "|---:|---:|---:|---:|"]
        lines += [f"| {row['tokens']} | {row['ms']:.1f} | {row['tokens_per_s']:,.0f} | "
                  f"{row['tokens_per_s'] / best:.0%} |" for row in r["pass_sizes"]]
        lines.append("")
    for name, error in r.get("errors", {}).items():
        lines += [f"{name}: failed: {error}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="offline alias, hub id or folder")
    parser.add_argument("--random-weights", action="store_true", help="untrained weights in the folder's architecture")
    parser.add_argument("--steps", type=int, default=60, help="timed training steps per measurement")
    parser.add_argument("--packing", default="1,2,4,8", help="trials per GPU to measure")
    parser.add_argument("--sections", default="loop,packing,pass_sizes",
                        help="which to run; the others' figures are kept from an earlier run's --out .json")
    parser.add_argument("--out", default=str(RESULTS / "gpu.md"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fraction", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--ready", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py measures a GPU, and torch sees none here")
    model = random_weights(args.model) if args.random_weights else args.model
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sections = args.sections.split(",")
    earlier = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    report = {**{k: v for k, v in earlier.items() if k not in sections}, "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "model": args.model, "random_weights": args.random_weights,
              "errors": {k: v for k, v in earlier.get("errors", {}).items() if k not in sections}}
    for name, run in (("loop", lambda: loop_speeds(model, args.steps)),
                      ("packing", lambda: packing(model, [int(n) for n in args.packing.split(",")], 3 * args.steps)),
                      ("pass_sizes", lambda: pass_sizes(model))):
        if name not in sections:
            continue
        try:  # one section failing still leaves the others' figures
            report[name] = run()
        except Exception as error:  # reported in the results file, not lost
            report["errors"][name] = f"{type(error).__name__}: {error}"
            print(f"{name} failed: {report['errors'][name]}", flush=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2))
        out.write_text(render(report))
    print(render(report))


if __name__ == "__main__":
    main()
