"""Core benchmark: does prompt tuning learn, how fast is the loop against this machine's limits and
against PEFT, and does bfloat16 cost accuracy?

On SmolLM2-135M and rotten_tomatoes, 2 CPU cores. Parts (`--parts`, each merged into core.json):
- learning: held-out accuracy (400 test examples) zero-shot, with the untrained class-label prompt,
  and after 250 AdamW steps, in float32 and in bfloat16, over 3 seeds;
- speed: training and dev-evaluation examples/s, in one run, blocks interleaved so machine noise hits
  every arm alike: the loop before issue 21 (float32, the model's default attention, the output
  head on a strided slice), float32 now, bfloat16 now (what `dtype: auto` picks on this CPU),
  bfloat16 compiled, and PEFT 0.21 in float32 and bfloat16, all on identical batches; GFLOP/s
  against matmul peaks measured in the same run; compile time;
- search: how often torch.compile compiles during a real 8-trial search (the demo with
  `train.compile: true`), from every trial's reports.
Writes bench/results/core.md (the README quotes it) and core.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
from transformers import AutoModelForCausalLM

from softprompt.models.backbone import Backbone, compiled_graphs, fingerprint, freeze, load_backbone
from softprompt.models.data import IGNORE, TrainOrder, make_batch, pad_rows, train_batch
from softprompt.models.evaluate import evaluate
from softprompt.models.hub import load_tokenizer, resolve_model
from softprompt.models.precision import resolve_dtype
from softprompt.models.prompt import PromptedModel, SoftPrompt
from softprompt.trainables.config import TrainConfig
from softprompt.trainables.loop import initial_prompt, prepare_data, train, zero_shot

RESULTS = Path(__file__).parent / "results"


def peft_batch(data, idx, pad_id):
    """PEFT's usual causal-LM batch: input + target right-padded, labels -100 on the input."""
    split = data.splits["train"]
    rows = [split.input_ids[i] + data.target_ids[split.labels[i]] for i in idx]
    labels = [[IGNORE] * len(split.input_ids[i]) + data.target_ids[split.labels[i]] for i in idx]
    return (pad_rows(rows, pad_id, left=False), pad_rows([[1] * len(r) for r in rows], 0, left=False),
            pad_rows(labels, IGNORE, left=False))


def timed_steps(step_fn, batches) -> tuple[float, int]:
    started, examples = time.perf_counter(), 0
    for batch in batches:
        examples += step_fn(batch)
    if torch.cuda.is_available():  # a GPU runs behind the Python that queues its work
        torch.cuda.synchronize()
    return time.perf_counter() - started, examples


def speed(cfg: TrainConfig, steps: int, block: int, dtype: str = "float32") -> dict:
    """Examples/s of our loop and PEFT's on the default device (bench/bench_gpu.py runs this on a GPU)."""
    ours_bb = load_backbone(cfg.model, dtype)
    device = ours_bb.device
    data = prepare_data(cfg.replace(max_train_examples=steps * cfg.batch_size), ours_bb)
    prompt = SoftPrompt(initial_prompt(cfg.replace(init="random_uniform"), ours_bb, data)).to(device)
    pm = PromptedModel(ours_bb, prompt)
    ours_opt = torch.optim.AdamW([prompt.weight], lr=cfg.lr)

    peft_base = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.model)[0], dtype=resolve_dtype(dtype, device))
    peft_model = get_peft_model(peft_base.to(device), PromptTuningConfig(  # PEFT's usual model: none of our changes
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.prompt_length, prompt_tuning_init=PromptTuningInit.RANDOM))
    peft_opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=cfg.lr)
    pad_id = data.pad_id

    def ours_step(batch):
        loss = pm.loss(batch.to(device))
        loss.backward()
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)
        return len(batch.classes)

    def peft_step(batch):
        ids, mask, labels = (t.to(device) for t in batch)
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        peft_opt.step()
        peft_opt.zero_grad(set_to_none=True)
        return len(ids)

    split = data.splits["train"]
    rng = np.random.default_rng(0)
    shuffled = [rng.permutation(len(split))[i:i + cfg.batch_size]
                for i in range(0, steps * cfg.batch_size, cfg.batch_size)]
    order = TrainOrder([len(x) for x in split.input_ids], cfg.batch_size, cfg.seed)

    fixed_ours = [make_batch(data, [split.input_ids[i] for i in idx], [split.labels[i] for i in idx])
                  for idx in shuffled]
    fixed_peft = [peft_batch(data, idx, pad_id) for idx in shuffled]
    epoch_ours = [train_batch(data, order, s) for s in range(order.batches_per_epoch())]
    epoch_peft = fixed_peft  # PEFT's usual shuffled batches over the same examples

    ours_step(fixed_ours[0]), peft_step(fixed_peft[0])  # warm-up
    totals = {key: [0.0, 0] for key in ("fixed_ours", "fixed_peft", "epoch_ours", "epoch_peft")}
    arms = [("fixed_ours", ours_step, fixed_ours), ("fixed_peft", peft_step, fixed_peft),
            ("epoch_ours", ours_step, epoch_ours), ("epoch_peft", peft_step, epoch_peft)]
    for number, start in enumerate(range(0, steps, block)):
        # every other block in reverse: the side that meets a block's batches first (cold caches; on a
        # GPU, kernel plans for new widths) is not always the same
        for key, fn, batches in arms if number % 2 == 0 else arms[::-1]:
            seconds, n = timed_steps(fn, batches[start:start + block])
            totals[key][0] += seconds
            totals[key][1] += n
    rate = {key: n / seconds for key, (seconds, n) in totals.items()}

    def padded(batches):
        return sum(b.input_ids.numel() for b in batches)

    return {"examples_per_s": rate,
            "fixed_batches_ratio": rate["fixed_ours"] / rate["fixed_peft"],
            "epoch_ratio": rate["epoch_ours"] / rate["epoch_peft"],
            "padded_tokens_epoch": {"ours_bucketed": padded(epoch_ours), "shuffled": padded(fixed_ours)},
            "steps": steps, "batch_size": cfg.batch_size}


PART_ORDER = ("learning", "speed", "search", "probe")


def learning(seeds: int, steps: int, first_seed: int = 0, previous: dict | None = None) -> dict:
    """Test accuracy after `steps` steps, float32 against bfloat16, seed by seed (the seed moves the
    init's sampling, the data order and nothing else); `previous` runs (other seeds) are kept."""
    runs = {d: list(previous["runs"][d]) if previous else [] for d in ("float32", "bfloat16")}
    baselines = ({k: previous[k] for k in ("zero_shot_test_accuracy", "untrained_prompt_test_accuracy")}
                 if previous else None)
    backbones, prompts = {}, {}
    for dtype in ("float32", "bfloat16"):
        backbone = backbones[dtype] = load_backbone("smollm2-135m", dtype)
        base = learning_config(steps)
        data = prepare_data(base, backbone)
        for seed in range(first_seed, first_seed + seeds):
            started = time.perf_counter()
            result = train(base.replace(seed=seed), backbone, data, progress=True)
            prompts[dtype, seed] = result["prompt"]
            runs[dtype].append({"seed": seed, "test_accuracy": result["test_accuracy"],
                                "best_dev_accuracy": result["best_dev_accuracy"], "best_step": result["best_step"],
                                "seconds": time.perf_counter() - started})
            print(dtype, runs[dtype][-1], flush=True)
    # each kept prompt scored in the other dtype too: is a gap made in training or in scoring?
    for (dtype, seed), values in prompts.items():
        other = "bfloat16" if dtype == "float32" else "float32"
        run = next(r for r in runs[dtype] if r["seed"] == seed)
        run[f"test_accuracy_scored_in_{other}"] = evaluate(PromptedModel(backbones[other], SoftPrompt(values)),
                                                           data, "test")["accuracy"]
        print(dtype, seed, "scored in", other, run[f"test_accuracy_scored_in_{other}"], flush=True)
        if dtype == "float32" and baselines is None:
            untrained = SoftPrompt(initial_prompt(base, backbone, data))
            baselines = {"zero_shot_test_accuracy": zero_shot(base, backbone, data)["accuracy"],
                         "untrained_prompt_test_accuracy": evaluate(PromptedModel(backbone, untrained), data,
                                                                    "test")["accuracy"]}
    mean = {d: float(np.mean([r["test_accuracy"] for r in rs])) for d, rs in runs.items()}
    if len({r["seed"] for r in runs["float32"]}) != len(runs["float32"]):
        raise SystemExit("bench_core: a seed was run twice; pick --first-seed past the runs in core.json")
    return {"runs": runs, "mean_test_accuracy": mean, "difference_points": 100 * (mean["bfloat16"] - mean["float32"]),
            "test_examples": len(data.splits["test"]), "config": base.to_dict(), **baselines}


def scoring_probe(seeds: int, steps: int) -> dict:
    """bfloat16-trained prompts (the learning part's runs, same seeds) scored on the test split in
    bfloat16 and in float32: is a gap made in training or in scoring?"""
    backbones = {d: load_backbone("smollm2-135m", d) for d in ("bfloat16", "float32")}
    base = learning_config(steps)
    data = prepare_data(base, backbones["float32"])
    rows = []
    for seed in range(seeds):
        result = train(base.replace(seed=seed), backbones["bfloat16"], data, progress=True)
        in_float32 = PromptedModel(backbones["float32"], SoftPrompt(result["prompt"]))
        rows.append({"seed": seed, "best_step": result["best_step"], "test_accuracy_bfloat16": result["test_accuracy"],
                     "test_accuracy_float32": evaluate(in_float32, data, "test")["accuracy"]})
        print("probe", rows[-1], flush=True)
    return {"runs": rows}


def learning_config(steps: int) -> TrainConfig:
    return TrainConfig(prompt_length=20, init="class_label", optimizer="adamw", lr=0.03, batch_size=8,
                       max_steps=steps, eval_every=50, max_eval_examples=200, max_test_examples=400)


def before_issue_21(name: str) -> Backbone:
    """The loop's backbone as it was: float32, the model's default attention, no contiguous head."""
    source, _, auto = resolve_model(name)
    model = auto.from_pretrained(source, dtype=torch.float32)
    freeze(model)
    return Backbone(name, model, load_tokenizer(source), fingerprint(model), 0.0)


def matmul_peak(dtype: torch.dtype, seconds: float = 2.0) -> float:
    """GFLOP/s of a model-shaped matmul ([600, 576] x [576, 1536], SmolLM2's MLP at a batch of tokens)."""
    a, b = torch.randn(600, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
    for _ in range(5):
        a @ b
    started, n = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        a @ b
        n += 1
    return 2 * 600 * 576 * 1536 * n / (time.perf_counter() - started) / 1e9


def counted_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def speed_arms(steps: int, block: int, eval_examples: int) -> dict:
    """Every arm on the same fixed batches (real varied-length data, shuffled), interleaved."""
    cfg = TrainConfig(max_train_examples=steps * 8, max_eval_examples=eval_examples)
    peaks = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}
    ours = {"float32, before": before_issue_21(cfg.model), "float32": load_backbone(cfg.model, "float32"),
            "bfloat16": load_backbone(cfg.model, "bfloat16"),
            "bfloat16, compiled": load_backbone(cfg.model, "bfloat16")}
    data = prepare_data(cfg, ours["float32"])
    split = data.splits["train"]
    rng = np.random.default_rng(0)
    shuffled = [rng.permutation(len(split))[i:i + 8] for i in range(0, steps * 8, 8)]
    fixed_ours = [make_batch(data, [split.input_ids[i] for i in idx], [split.labels[i] for i in idx])
                  for idx in shuffled]
    fixed_peft = [peft_batch(data, idx, data.pad_id) for idx in shuffled]
    init = initial_prompt(cfg, ours["float32"], data)

    steppers, evaluators = {}, {}
    for name, backbone in ours.items():
        prompt = SoftPrompt(init)
        pm, opt = PromptedModel(backbone, prompt), torch.optim.AdamW([prompt.weight], lr=0.03)

        def step(batch, pm=pm, opt=opt):
            pm.loss_backward(batch)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return len(batch.classes)
        steppers[name] = (step, fixed_ours)
        evaluators[name] = lambda pm=pm: evaluate(pm, data, "dev", "rank", 32)
    for dtype in ("float32", "bfloat16"):
        model = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.model)[0], dtype=getattr(torch, dtype))
        peft_model = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=20,
                                                              prompt_tuning_init=PromptTuningInit.RANDOM))
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=0.03)

        def step(batch, peft_model=peft_model, opt=opt):
            ids, mask, labels = batch
            peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return len(ids)
        steppers[f"PEFT {dtype}"] = (step, fixed_peft)

    compiled = ours["bfloat16, compiled"]
    compiled.compile()
    started = time.perf_counter()
    steppers["bfloat16, compiled"][0](fixed_ours[0])
    compile_train_s = time.perf_counter() - started
    started = time.perf_counter()
    evaluators["bfloat16, compiled"]()
    compile_eval_s = time.perf_counter() - started
    graphs_after_warmup = compiled_graphs()
    for name, (fn, batches) in steppers.items():
        if name != "bfloat16, compiled":
            fn(batches[0])  # warm-up
    counting = PromptedModel(ours["bfloat16"], SoftPrompt(init))  # FLOPs follow shapes, not the dtype
    train_flops = sum(counted_flops(lambda b=b: counting.loss_backward(b)) for b in fixed_ours)
    eval_flops = counted_flops(evaluators["bfloat16"])

    totals = {name: [0.0, 0] for name in steppers}
    arms = list(steppers.items())
    for number, start in enumerate(range(0, steps, block)):
        for name, (fn, batches) in arms if number % 2 == 0 else arms[::-1]:
            seconds, n = timed_steps(fn, batches[start:start + block])
            totals[name][0] += seconds
            totals[name][1] += n
        print(f"speed block {number}: " + ", ".join(f"{k} {n / s:.2f}" for k, (s, n) in totals.items()), flush=True)
    for name, fn in evaluators.items():
        if name != "bfloat16, compiled":  # warmed up (and compiled) above
            fn()
    eval_seconds = {name: 0.0 for name in evaluators}
    for rep in range(2):
        for name, fn in list(evaluators.items())[::(1 if rep == 0 else -1)]:
            started = time.perf_counter()
            fn()
            eval_seconds[name] += time.perf_counter() - started
    train_rate = {name: n / s for name, (s, n) in totals.items()}
    eval_rate = {name: 2 * len(data.splits["dev"]) / s for name, s in eval_seconds.items()}
    train_gflops = {name: train_flops / (totals[name][0] / totals[name][1] * steps * 8) / 1e9
                    for name in ours}  # the same work on every arm of ours: the flops of all the batches
    eval_gflops = {name: eval_flops * 2 / eval_seconds[name] / 1e9 for name in ours}
    return {"train_examples_per_s": train_rate, "eval_examples_per_s": eval_rate,
            "train_gflop_per_s": train_gflops, "eval_gflop_per_s": eval_gflops, "matmul_peak_gflop_per_s": peaks,
            "compile": {"first_training_step_s": compile_train_s, "first_evaluation_s": compile_eval_s,
                        "graphs_after_warmup": graphs_after_warmup, "graphs_after_run": compiled_graphs()},
            "steps": steps, "eval_examples": len(data.splits["dev"]), "batch_size": 8, "evaluators_warmed": True,
            "padded_tokens": sum(b.input_ids.numel() for b in fixed_ours)}


def search_compiles(storage: Path) -> dict:
    """The demo's 8-trial search with `train.compile: true`: every trial's last report says how many
    graphs its worker process had compiled by then."""
    name = f"compile-{int(time.time())}"
    started = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "softprompt"), "search", "run", "examples/demo.yaml",
                    "--set", f"name={name}", "--set", f"storage_path={storage}", "--set", "train.compile=true",
                    "--tracking-uri", "none"],
                   check=True, cwd=Path(__file__).parent.parent)
    seconds = time.perf_counter() - started
    trials = []
    for result in sorted((storage / name).glob("*/result.json")):
        reports = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        last = reports[-1]
        trials.append({"trial": result.parent.name[:40], "steps": last.get("step"),
                       "compiled_graphs": last.get("compiled_graphs"), "setup_s": last.get("setup_s"),
                       "reused": last.get("backbone_reused")})
    return {"trials": trials, "wall_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PART_ORDER),
                        help=f"comma-separated, of {', '.join(PART_ORDER)} (none: only render core.md from core.json)")
    parser.add_argument("--steps", type=int, default=250, help="training steps per learning run")
    parser.add_argument("--seeds", type=int, default=3, help="learning runs per dtype")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="the learning part's first seed; above 0, its runs join those already in core.json")
    parser.add_argument("--speed-steps", type=int, default=40, help="steps per arm in the speed run")
    parser.add_argument("--storage", default="/tmp/softprompt-bench-core", help="the search part's storage path")
    args = parser.parse_args()
    torch.manual_seed(0)
    path = RESULTS / "core.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report = {k: v for k, v in report.items()  # results of older layouts go
              if k in PART_ORDER + ("demo_wall_s", "torch_threads", "peak_rss_gib")}
    for part in args.parts.split(","):
        if part == "none":  # only render core.md from core.json
            continue
        if part == "learning":
            report["learning"] = learning(args.seeds, args.steps, args.first_seed,
                                          report.get("learning") if args.first_seed else None)
        elif part == "speed":
            report["speed"] = speed_arms(args.speed_steps, block=5, eval_examples=200)
        elif part == "probe":
            report["probe"] = scoring_probe(args.seeds, args.steps)
        elif part == "search":
            report["search"] = search_compiles(Path(args.storage))
        else:
            parser.error(f"--parts: {part!r} is not one of {', '.join(PART_ORDER)}")
        report["torch_threads"] = torch.get_num_threads()
        report["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
    (RESULTS / "core.md").write_text(render(report))
    print(render(report))


def render(r: dict) -> str:
    out = ["# Core benchmark (bench/bench_core.py)", "",
           f"SmolLM2-135M, rotten_tomatoes, batch 8, CPU ({r.get('torch_threads')} threads; this CPU has AVX512-BF16). "
           "`dtype: auto` is float32 on a CPU, because of the accuracy below.", ""]
    if "learning" in r:
        lr = r["learning"]
        runs = lr["runs"]
        out += [f"## Accuracy: bfloat16 against float32 ({len(runs['float32'])} seeds, "
                f"{lr['config']['max_steps']} AdamW steps at lr {lr['config']['lr']}, 20-token class-label prompt, "
                f"{lr['test_examples']} test examples)", "",
                "| seed | float32 test accuracy | bfloat16 test accuracy | bfloat16 - float32 | "
                "best dev accuracy, float32 / bfloat16 | float32 s | bfloat16 s |",
                "|---|---|---|---|---|---|---|"]
        for a, b in zip(runs["float32"], runs["bfloat16"]):
            out.append(f"| {a['seed']} | {a['test_accuracy']:.4f} (best dev step {a['best_step']}) | "
                       f"{b['test_accuracy']:.4f} (best dev step {b['best_step']}) | "
                       f"{100 * (b['test_accuracy'] - a['test_accuracy']):+.2f} | "
                       f"{a['best_dev_accuracy']:.3f} / {b['best_dev_accuracy']:.3f} | "
                       f"{a['seconds']:.0f} | {b['seconds']:.0f} |")
        mean = lr["mean_test_accuracy"]
        out += [f"| **mean** | **{mean['float32']:.4f}** | **{mean['bfloat16']:.4f}** | "
                f"**{lr['difference_points']:+.2f}** | | | |", "",
                f"bfloat16 minus float32: **{lr['difference_points']:+.2f} points** (goal: within 1). "
                f"Zero-shot (no prompt, float32): {lr['zero_shot_test_accuracy']:.4f}; the untrained prompt: "
                f"{lr['untrained_prompt_test_accuracy']:.4f}.", ""]
        crossed = [(a, b) for a, b in zip(runs["float32"], runs["bfloat16"])
                   if "test_accuracy_scored_in_bfloat16" in a]
        if crossed:
            out += ["Each kept prompt scored in the other dtype as well (training and scoring told apart):", "",
                    "| seed | float32-trained prompt: scored in float32 / bfloat16 | "
                    "bfloat16-trained prompt: scored in bfloat16 / float32 |", "|---|---|---|"]
            out += [f"| {a['seed']} | {a['test_accuracy']:.4f} / {a['test_accuracy_scored_in_bfloat16']:.4f} | "
                    f"{b['test_accuracy']:.4f} / {b['test_accuracy_scored_in_float32']:.4f} |" for a, b in crossed]
            out.append("")
    if "probe" in r:
        rows = r["probe"]["runs"]
        out += ["Where the gap is made: the bfloat16 runs again (same seeds), each kept prompt scored on the test "
                "split in both dtypes:", "", "| seed | scored in bfloat16 | scored in float32 |", "|---|---|---|"]
        out += [f"| {p['seed']} | {p['test_accuracy_bfloat16']:.4f} | {p['test_accuracy_float32']:.4f} |" for p in rows]
        out += ["", "A prompt scores the same in either dtype, within half a point: the loss is made in training "
                "(bfloat16's prompt gradients differ from float32's by half their norm or more, measured on the "
                "first steps), not in scoring. "
                "So `dtype: auto` stays float32 on a CPU; `dtype: bfloat16` is there for who wants the speed.", ""]
    if "speed" in r:
        sp = r["speed"]
        tr, ev, base = sp["train_examples_per_s"], sp["eval_examples_per_s"], "float32, before"
        peak = sp["matmul_peak_gflop_per_s"]
        out += [f"## Speed (identical batches, {sp['steps']} steps per arm in interleaved blocks; dev evaluation: "
                f"{sp['eval_examples']} examples, batch 32, twice per arm)", "",
                "| | training examples/s | vs before | training GFLOP/s | dev-eval examples/s | vs before | "
                "dev-eval GFLOP/s |",
                "|---|---|---|---|---|---|---|"]
        for name in tr:
            if name in ev:
                out.append(f"| {name} | {tr[name]:.2f} | {tr[name] / tr[base]:.2f}x | "
                           f"{sp['train_gflop_per_s'][name]:.0f} | "
                           f"{ev[name]:.1f} | {ev[name] / ev[base]:.2f}x | {sp['eval_gflop_per_s'][name]:.0f} |")
            else:
                out.append(f"| {name} (its usual model and batches: the model's default attention, right-padded "
                           f"rows, logits at every position) | {tr[name]:.2f} | "
                           f"{tr[name] / tr[base]:.2f}x | | | | |")
        c = sp["compile"]
        out += ["", "Matmul peaks in the same run ([600, 576] x [576, 1536]): "
                f"**{peak['float32']:.0f} GFLOP/s float32, {peak['bfloat16']:.0f} bfloat16**. "
                "GFLOP/s counts every matmul and attention FLOP "
                "(torch's FlopCounterMode) over the padded tokens.", "",
                "- `before`: the loop before issue 21 (float32, torch's fused attention, the output head fed a "
                "strided slice). `float32`, `bfloat16`: now (the head's input made contiguous; bfloat16 with eager "
                "attention).",
                f"- Compiled (`compile: true`): the first training step took **{c['first_training_step_s']:.0f} s** "
                f"(compiling), the first evaluation **{c['first_evaluation_s']:.0f} s**; "
                f"{c['graphs_after_warmup']} graphs then, {c['graphs_after_run']} after every batch and evaluation.",
                *([] if sp.get("evaluators_warmed") else [
                    "- Measured before every evaluator got an untimed first call: the float32 arms' evaluation times "
                    "include their first call's cost, so the evaluation ratios to `before` may be slightly high."]),
                f"- PEFT vs ours, same dtype: float32 {tr['float32'] / tr['PEFT float32']:.2f}x, bfloat16 "
                f"{tr['bfloat16'] / tr['PEFT bfloat16']:.2f}x (ours / PEFT).", ""]
    if "search" in r:
        se = r["search"]
        graphs = [t["compiled_graphs"] for t in se["trials"]]
        out += ["## Compiles during a real search", "",
                f"The demo (8 trials, ASHA, 2 at a time) with `train.compile: true`: {se['wall_s']:.0f} s wall. "
                "Compiled graphs in each trial's worker at its last report (a worker counts every trial it ran): "
                f"{graphs}: one training and one scoring graph per worker, and no recompile over every trial's "
                "batch lengths, prompt lengths and evaluations. In float32 (`auto` on a CPU); the compiling is most "
                "of the wall time at this size (the uncompiled demo: 4 min).", ""]
    if "demo_wall_s" in r:
        d = r["demo_wall_s"]
        out += ["## The demo from a fresh clone", "",
                f"`make demo` after install: before {d['before']}, after {d['after']}.", ""]
    out.append(f"Peak RSS of the last part's process: {r.get('peak_rss_gib', 0):.2f} GiB.")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
