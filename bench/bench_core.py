"""Core benchmark: does prompt tuning learn, and how fast is our loop against PEFT's?

On SmolLM2-135M and rotten_tomatoes, 2 CPU cores:
1. learning: held-out accuracy zero-shot, with the untrained class-label prompt, and trained;
2. speed: training examples/s of our loop vs PEFT prompt tuning on the same model, data and batch
   size, in this same run, blocks interleaved so machine noise hits both sides alike:
   (a) identical fixed batches, (b) real varied-length data (ours length-bucketed, PEFT shuffled);
3. peak RSS.
Writes bench/results/core.md (the README quotes it) and core.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch
from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

from trainables.backbone import load_backbone
from trainables.config import TrainConfig
from trainables.data import IGNORE, TrainOrder, make_batch, pad_rows, train_batch
from trainables.loop import initial_prompt, prepare_data, train, zero_shot
from trainables.evaluate import evaluate
from trainables.prompt import PromptedModel, SoftPrompt

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

    peft_bb = load_backbone(cfg.model, dtype)
    peft_model = get_peft_model(peft_bb.model, PromptTuningConfig(
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
    shuffled = [rng.permutation(len(split))[i:i + cfg.batch_size] for i in range(0, steps * cfg.batch_size, cfg.batch_size)]
    order = TrainOrder([len(x) for x in split.input_ids], cfg.batch_size, cfg.seed)

    fixed_ours = [make_batch(data, [split.input_ids[i] for i in idx], [split.labels[i] for i in idx]) for idx in shuffled]
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
    padded = lambda batches: sum(b.input_ids.numel() for b in batches)
    return {"examples_per_s": rate,
            "fixed_batches_ratio": rate["fixed_ours"] / rate["fixed_peft"],
            "epoch_ratio": rate["epoch_ours"] / rate["epoch_peft"],
            "padded_tokens_epoch": {"ours_bucketed": padded(epoch_ours), "shuffled": padded(fixed_ours)},
            "steps": steps, "batch_size": cfg.batch_size}


def learning(cfg: TrainConfig) -> dict:
    backbone = load_backbone(cfg.model, "float32")
    data = prepare_data(cfg, backbone)
    untrained = SoftPrompt(initial_prompt(cfg, backbone, data))
    started = time.perf_counter()
    result = train(cfg, backbone, data, progress=True)
    return {"zero_shot_test_accuracy": zero_shot(cfg, backbone, data)["accuracy"],
            "untrained_prompt_test_accuracy": evaluate(PromptedModel(backbone, untrained), data, "test")["accuracy"],
            "trained_prompt_test_accuracy": result["test_accuracy"],
            "trained_prompt_best_dev_accuracy": result["best_dev_accuracy"], "best_step": result["best_step"],
            "train_seconds": time.perf_counter() - started,
            "test_examples": len(data.splits["test"]), "config": cfg.to_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=250, help="training steps for the learning run")
    parser.add_argument("--speed-steps", type=int, default=60, help="steps per system in the speed run")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = TrainConfig(prompt_length=20, init="class_label", optimizer="adamw", lr=0.03, batch_size=8,
                      max_steps=args.steps, eval_every=50, max_eval_examples=400)
    report = {"learning": learning(cfg), "speed": speed(cfg, args.speed_steps, block=10),
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "torch_threads": torch.get_num_threads()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "core.json").write_text(json.dumps(report, indent=2))
    (RESULTS / "core.md").write_text(render(report))
    print(render(report))


def render(r: dict) -> str:
    lr, sp = r["learning"], r["speed"]
    rate = sp["examples_per_s"]
    return f"""# Core benchmark (bench/bench_core.py)

SmolLM2-135M (fp32, CPU, {r['torch_threads']} threads), rotten_tomatoes, batch {sp['batch_size']}.

| held-out test accuracy ({lr['test_examples']} examples) | |
|---|---|
| zero-shot (no prompt) | {lr['zero_shot_test_accuracy']:.4f} |
| 20-token class-label prompt, untrained | {lr['untrained_prompt_test_accuracy']:.4f} |
| same prompt after {lr['config']['max_steps']} AdamW steps (lr {lr['config']['lr']}, best dev step {lr['best_step']}) | {lr['trained_prompt_test_accuracy']:.4f} |

| training speed, examples/s ({sp['steps']} steps each, interleaved) | softprompt | PEFT 0.21 | ratio |
|---|---|---|---|
| identical fixed batches | {rate['fixed_ours']:.2f} | {rate['fixed_peft']:.2f} | {sp['fixed_batches_ratio']:.2f}x |
| real data (ours length-bucketed, PEFT shuffled) | {rate['epoch_ours']:.2f} | {rate['epoch_peft']:.2f} | {sp['epoch_ratio']:.2f}x |

Padded tokens over the same examples: bucketed {sp['padded_tokens_epoch']['ours_bucketed']}, shuffled {sp['padded_tokens_epoch']['shuffled']}.
Peak RSS of the whole benchmark process (three backbones loaded over the run): {r['peak_rss_gib']:.2f} GiB.
"""


if __name__ == "__main__":
    main()
