"""Many soft prompts on one frozen backbone, in one batched forward pass: each row carries its own prompt,
which gives prompt ensembling (paper section 6) and mixed-task batches, as PEFT's one-active-prompt forward
cannot. Rows are scored by models/prompt.py:class_scores, so each member scores as it does alone.
"""
from __future__ import annotations

import itertools
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from softprompt.models.backbone import Backbone, load_backbone
from softprompt.models.checkpoint import load_bundle_prompts, load_bundle_record
from softprompt.models.data import verbalizer_ids
from softprompt.models.prompt import Prefix, class_scores

COMBINE = ("vote", "mean_logprob")
log = logging.getLogger(__name__)


@dataclass
class TaskPrompts:
    verbalizers: list[str]
    target_ids: list[list[int]]        # per class: the verbalizer's tokens (+EOS for seq2seq)
    prompts: list[torch.Tensor]        # the members, each [length, width]


# A pass holds at least this many real tokens before a length group may close: a CPU is busy with a
# few hundred; on an H200 a SmolLM2-135M pass took 20 ms from 64 up to 8,192 tokens and reached 94%
# of its best tokens/s at 16,384 (bench/results/gpu.md).
MIN_PASS_TOKENS = {"cpu": 256, "cuda": 16384}


def length_groups(lengths: list[int], members: list[int], min_tokens: int, waste: float = 0.25) -> list[list[int]]:
    """Request indices, shortest first, in groups that each run as one pass: request i brings
    `members[i]` rows of `lengths[i]` tokens, every row is padded to its group's longest, and a group
    closes before padding would exceed `waste` of its real tokens (once it holds `min_tokens`)."""
    groups: list[list[int]] = []
    group, rows, tokens = [], 0, 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        grown_rows, grown_tokens = rows + members[i], tokens + members[i] * lengths[i]
        if group and tokens >= min_tokens and lengths[i] * grown_rows > (1 + waste) * grown_tokens:
            groups.append(group)
            group, grown_rows, grown_tokens = [], members[i], members[i] * lengths[i]
        group.append(i)
        rows, tokens = grown_rows, grown_tokens
    return groups + [group] if group else groups


def combine(member_scores: torch.Tensor, how: str) -> tuple[int, torch.Tensor]:
    """[k, C] member log-likelihoods -> (label, mean log-likelihood per class). A vote's tie goes
    to the tied class with the higher mean log-likelihood."""
    mean = member_scores.mean(0)
    if how == "mean_logprob":
        return int(mean.argmax()), mean
    votes = Counter(member_scores.argmax(-1).tolist())
    top = max(votes.values())
    return max((c for c, n in votes.items() if n == top), key=lambda c: mean[c].item()), mean


class PromptEnsemble:
    """Prompts for one or more tasks on one backbone; `predict` routes each example to its task's
    prompts and scores it with all of them in one batched pass, shared with the batch's other
    examples of similar length."""

    def __init__(self, backbone: Backbone, tasks: dict[str, TaskPrompts], how: str = "vote"):
        self.backbone, self.tasks, self.how = backbone, tasks, how
        self.prefixes = self._prefixes() if not backbone.is_encoder_decoder else None

    @torch.no_grad()
    def _prefixes(self) -> dict[str, Prefix] | None:
        """Each task's member prompts as keys and values, if this architecture scores the same with
        them as without (checked here on two probe inputs of different lengths, so padding is
        exercised); otherwise every request recomputes its prompt, as PEFT does."""
        if any(kind != "full_attention" for kind in getattr(self.backbone.model.config, "layer_types", None) or ()):
            log.warning("%s has layers other than full attention: prompts are recomputed per request",
                        self.backbone.name)
            return None
        prefixes = {name: Prefix.of(self.backbone, task.prompts) for name, task in self.tasks.items()}
        if any(p is None for p in prefixes.values()):
            log.warning("%s keeps no plain key/value cache: prompts are recomputed per request", self.backbone.name)
            return None
        name, task = next(iter(self.tasks.items()))
        short, long = (self.backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
                       for text in ("a probe", "a longer probe input, of a few more tokens"))
        probe = [short if i % 2 else long for i in range(2 * len(task.prompts))]
        prompts, targets = task.prompts * 2, [task.target_ids] * len(probe)
        cached = class_scores(self.backbone, prefixes[name].select(list(range(len(task.prompts))) * 2), probe, targets)
        plain = class_scores(self.backbone, prompts, probe, targets)
        if not all(torch.allclose(a, b, atol=1e-3, rtol=1e-3) for a, b in zip(cached, plain)):
            log.warning("%s scores differently from a key/value cache: prompts are recomputed per request",
                        self.backbone.name)
            return None
        return prefixes

    def member_scores(self, task_names: list[str], inputs: list[list[int]]) -> list[torch.Tensor]:
        """Per example: [k, C] log-likelihoods, one row per member prompt of its task. Requests of
        similar length share a pass (each request with all its members), so padding stays small."""
        members = [len(self.tasks[t].prompts) for t in task_names]
        min_tokens = MIN_PASS_TOKENS.get(self.backbone.device.type, MIN_PASS_TOKENS["cpu"])
        out: list[torch.Tensor | None] = [None] * len(inputs)
        for group in length_groups([len(x) for x in inputs], members, min_tokens):
            scores = self._member_scores([task_names[i] for i in group], [inputs[i] for i in group])
            for i, s in zip(group, scores):
                out[i] = s
        return out

    def _member_scores(self, task_names: list[str], inputs: list[list[int]]) -> list[torch.Tensor]:
        rows = [(self.tasks[t], p, x) for t, x in zip(task_names, inputs) for p in self.tasks[t].prompts]
        # an empty input has no token of its own to score from: such a batch runs without the cache
        cached = self.prefixes and all(inputs)
        prompts = Prefix.cat([self.prefixes[t] for t in task_names]) if cached else [p for _, p, _ in rows]
        scores = class_scores(self.backbone, prompts, [x for _, _, x in rows], [task.target_ids for task, _, _ in rows])
        bounds = list(itertools.accumulate([len(self.tasks[t].prompts) for t in task_names], initial=0))
        return [torch.stack(scores[start:end]) for start, end in zip(bounds, bounds[1:])]

    def predict(self, task_names: list[str], inputs: list[list[int]]) -> list[tuple[int, torch.Tensor]]:
        """Per example: (label, mean log-likelihood per class)."""
        return [combine(s, self.how) for s in self.member_scores(task_names, inputs)]


def load_bundle(folder: Path, backbone: Backbone | None = None) -> tuple[PromptEnsemble, dict]:
    """The bundle's ensemble on its backbone (loaded if not given); a backbone other than the one
    the prompts were trained on is refused with a message that names both fingerprints."""
    record = load_bundle_record(folder)
    backbone = backbone or load_backbone(record["backbone"], "float32")
    prompts = load_bundle_prompts(folder, record, backbone.fingerprint, backbone.width)
    tasks = {name: TaskPrompts(task["verbalizers"],
                               verbalizer_ids(backbone.tokenizer, task["verbalizers"], backbone.is_encoder_decoder,
                                              task.get("sentinel", False)),
                               prompts[name]) for name, task in record["tasks"].items()}
    return PromptEnsemble(backbone, tasks, record["combine"]), record
