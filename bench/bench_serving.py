"""Serving throughput of a k-prompt ensemble: one batched pass with per-example prompts
(serving/ensemble.py) against k separate passes, one per prompt (what PEFT's one-active-prompt
forward allows). The served ensemble keeps its prompts as cached keys and values (computed once at
load) and lets requests of similar length share a pass (less padding). To separate the effects the
table also shows the k passes with the same length grouping, and the ensemble recomputing its
prompts. Writes bench/results/serving.md.

    python bench/bench_serving.py [--model smollm2-135m] [--k 5] [--prompt-lengths 20,100] [--repeats 3]

A cached prompt saves the prompt's share of every request, so the gain grows with the prompt's
length against the input's: 20 tokens is this project's demo, 100 the paper's default.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections import Counter
from functools import partial
from pathlib import Path

import torch

from bench_gpu import random_weights
from softprompt.models.backbone import load_backbone
from softprompt.models.data import encode_task
from softprompt.models.prompt import PromptedModel, SoftPrompt
from softprompt.models.tasks import load_task
from softprompt.serving.ensemble import MIN_PASS_TOKENS, PromptEnsemble, TaskPrompts, length_groups


def timed(calls: dict, repeats: int, min_seconds: float = 10.0) -> dict[str, float]:
    """Median seconds per call of each of `calls`, run in turn (round after round, so a slower
    moment of the machine hits them all), over at least `repeats` rounds and `min_seconds` of calls
    each: a single request takes well under a second, and a few calls would leave its median to chance."""
    for call in calls.values():  # warm-up
        call()
    times = {name: [] for name in calls}
    while min(map(len, times.values())) < repeats or min(map(sum, times.values())) < min_seconds:
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def separate_passes(data, members: list, min_pass_tokens: int, inputs: list, grouped: bool = False) -> list[int]:
    """The majority vote of one pass per prompt (`members`), each over every input or, `grouped`,
    over requests of similar length as the served ensemble groups them."""
    groups = (length_groups([len(x) for x in inputs], [1] * len(inputs), min_pass_tokens)
              if grouped else [list(range(len(inputs)))])
    votes = torch.empty(len(members), len(inputs), dtype=torch.long)
    for g in groups:
        votes[:, g] = torch.stack([m.class_scores(data, [inputs[i] for i in g]).argmax(-1).cpu() for m in members])
    return [Counter(column.tolist()).most_common(1)[0][0] for column in votes.T]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--prompt-lengths", default="20,100", help="prompt lengths, one table row group each")
    parser.add_argument("--batches", default="1,8,32", help="request batch sizes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=10.0, help="of calls timed, each way and size")
    parser.add_argument("--random-weights", action="store_true",
                        help="untrained weights in the architecture of --model, a folder with its config and tokenizer")
    parser.add_argument("--dtype", default="auto",
                        help="auto: bfloat16 on a GPU and on a CPU that runs it natively, else float32")
    parser.add_argument("--out", default="bench/results/serving.md")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    model = random_weights(args.model) if args.random_weights else args.model
    backbone = load_backbone(model, args.dtype)
    device = backbone.device
    exact = backbone.dtype == torch.float32  # in float32 every way must give the same labels
    where = (f"{torch.cuda.get_device_name(device)}, {backbone.dtype}".replace("torch.", "") if device.type == "cuda"
             else f"{torch.get_num_threads()} CPU threads, {platform.processor() or platform.machine()}")
    data = encode_task(load_task("rotten_tomatoes"), backbone.tokenizer, backbone.is_encoder_decoder,
                       backbone.vocab_is_frequency_ordered, 256, 64, 64)
    lengths = [int(n) for n in args.prompt_lengths.split(",")]
    inputs_all = data.splits["test"].input_ids
    weights = ", random weights: same architecture and arithmetic" if args.random_weights else ""
    checked = ("every row checked: the ensemble's labels equal the majority vote of the k separate passes." if exact
               else "agreement of the ensemble's labels with the majority vote of the k separate passes is counted "
                    "below (in bfloat16, padding and pass shape change the last bits, and untrained weights score "
                    "classes nearly alike).")
    lines = [f"# Ensemble serving: {args.k} prompts, one batched pass vs {args.k} passes", "",
             f"Model `{args.model}` ({backbone.model.config.model_type}{weights}), rotten_tomatoes test inputs "
             f"(mean {sum(map(len, inputs_all)) / len(inputs_all):.0f} tokens), {where}; the four measured in turn, "
             f"median of at least {args.repeats} rounds and {args.min_seconds:g} s each; " + checked,
             "",
             "| prompt length | requests per batch | k passes (ex/s) | k passes, grouped by length (ex/s) | "
             "ensemble, prompts recomputed (ex/s) | served ensemble: cached prompts (ex/s) | "
             "served ensemble vs k passes | vs k grouped passes |" + ("" if exact else " labels agree |"),
             "|---:|---:|---:|---:|---:|---:|---:|---:|" + ("" if exact else "---:|")]
    for length in lengths:
        generator = torch.Generator().manual_seed(length)
        prompts = [torch.rand(length, backbone.width, generator=generator) - 0.5 for _ in range(args.k)]
        ensemble = PromptEnsemble(backbone, {"rt": TaskPrompts(data.verbalizers, data.target_ids, prompts)})
        if ensemble.prefixes is None:
            lines[2:2] = [f"Prompt length {length}: the cached prompts did not score as the recomputed ones "
                          "(see the log), so the served ensemble recomputed them.", ""]
        uncached = PromptEnsemble(backbone, {"rt": TaskPrompts(data.verbalizers, data.target_ids, prompts)})
        uncached.prefixes = None
        members = [PromptedModel(backbone, SoftPrompt(p).to(device)) for p in prompts]
        separate = partial(separate_passes, data, members, MIN_PASS_TOKENS[device.type])

        for size in (int(b) for b in args.batches.split(",")):
            inputs = inputs_all[:size]
            served, voted = [label for label, _ in ensemble.predict(["rt"] * size, inputs)], separate(inputs)
            assert not exact or served == voted == separate(inputs, grouped=True)
            agree = sum(a == b for a, b in zip(served, voted)) / size
            seconds = timed({"many": partial(separate, inputs), "grouped": partial(separate, inputs, grouped=True),
                             "plain": partial(uncached.predict, ["rt"] * size, inputs),
                             "one": partial(ensemble.predict, ["rt"] * size, inputs)}, args.repeats, args.min_seconds)
            many, grouped, plain, one = (seconds[name] for name in ("many", "grouped", "plain", "one"))
            lines.append(f"| {length} | {size} | {size / many:.1f} | {size / grouped:.1f} | {size / plain:.1f} | "
                         f"{size / one:.1f} | {many / one:.2f}x | {grouped / one:.2f}x |"
                         + ("" if exact else f" {agree:.0%} |"))
            print(lines[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
