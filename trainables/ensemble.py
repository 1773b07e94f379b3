"""Many soft prompts on one frozen backbone, in one batched forward pass: each row of the batch
carries its own prompt. That gives prompt ensembling (paper section 6: k prompts for one task,
combined by majority vote or mean log-probability) and mixed-task batches (each example scored
with its own task's prompts and verbalizers), which PEFT's one-active-prompt forward cannot do.

Rows are laid out as PromptedModel lays them out (prompt before the text, positions counted over
real tokens; encoder-only prompts for T5), so each member scores as it does alone.
"""
from __future__ import annotations

import functools
import inspect
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from trainables.backbone import Backbone, load_backbone
from trainables.checkpoint import CheckpointError, load_checkpoint
from trainables.data import verbalizer_ids

COMBINE = ("vote", "mean_logprob")
# An exported bundle: bundle.json plus one prompt checkpoint per member (search/export.py writes it).
BUNDLE_FORMAT, BUNDLE_FILE = "softprompt-bundle/1", "bundle.json"
log = logging.getLogger(__name__)


@dataclass
class TaskPrompts:
    verbalizers: list[str]
    target_ids: list[list[int]]        # per class: the verbalizer's tokens (+EOS for seq2seq)
    prompts: list[torch.Tensor]        # the members, each [length, width]


def _embed_rows(backbone: Backbone, prompts: list[torch.Tensor], sequences: list[list[int]], left: bool):
    """[prompt_r; embed(sequence_r)] per row, padded (left for causal LMs) to one tensor, with its mask."""
    device, dtype = backbone.device, backbone.dtype
    embed = backbone.model.get_input_embeddings()
    width = max(len(p) + len(s) for p, s in zip(prompts, sequences))
    flat = embed(torch.tensor([t for s in sequences for t in s], dtype=torch.long, device=device))
    embeds = torch.zeros(len(sequences), width, backbone.width, device=device, dtype=dtype)
    mask = torch.zeros(len(sequences), width, dtype=torch.long, device=device)
    start = 0
    for row, (prompt, sequence) in enumerate(zip(prompts, sequences)):
        values = torch.cat([prompt.to(device, dtype), flat[start:start + len(sequence)]])
        start += len(sequence)
        where = slice(width - len(values), width) if left else slice(0, len(values))
        embeds[row, where], mask[row, where] = values, 1
    return embeds, mask


@dataclass
class Prefix:
    """Soft prompts as a causal LM's keys and values, one row per prompt, left-padded to one length.

    A prompt comes first and attention is causal, so its keys and values in every layer depend on
    the prompt alone: a served model computes them once at load time, and a request then costs
    only its own tokens (PEFT's forward recomputes the prompt in every request)."""
    layers: list[tuple[torch.Tensor, torch.Tensor]]   # per layer: keys, values [rows, heads, length, dim]
    mask: torch.Tensor                                # [rows, length]: 1 where a prompt vector is

    @classmethod
    def of(cls, backbone: Backbone, prompts: list[torch.Tensor]) -> "Prefix | None":
        """None where the model's cache is not plain full-attention keys and values in every layer
        (sliding-window, linear-attention or state-space layers keep something else)."""
        parts = []
        for prompt in prompts:  # one at a time: no padding inside the prompt's own pass
            embeds = prompt.to(backbone.device, backbone.dtype).unsqueeze(0)
            try:
                out = backbone.model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
                layers = getattr(returned_cache(out), "layers", None)
                if not layers or any(type(layer) is not DynamicLayer or not torch.is_tensor(layer.keys)
                                     for layer in layers):
                    return None
            except (AttributeError, TypeError, RuntimeError, ValueError):
                return None
            parts.append(cls([(layer.keys, layer.values) for layer in layers],
                             torch.ones(1, len(prompt), dtype=torch.long, device=backbone.device)))
        return cls.cat(parts)

    @classmethod
    def cat(cls, parts: list["Prefix"]) -> "Prefix":
        length = max(p.mask.shape[1] for p in parts)
        parts = [p.pad_to(length) for p in parts]
        layers = [(torch.cat([p.layers[i][0] for p in parts]), torch.cat([p.layers[i][1] for p in parts]))
                  for i in range(len(parts[0].layers))]
        return cls(layers, torch.cat([p.mask for p in parts]))

    def pad_to(self, length: int) -> "Prefix":
        extra = length - self.mask.shape[1]
        if extra == 0:
            return self
        pad = lambda t: torch.nn.functional.pad(t, (0, 0, extra, 0))  # left, along the length axis
        return Prefix([(pad(k), pad(v)) for k, v in self.layers], torch.nn.functional.pad(self.mask, (extra, 0)))

    def select(self, rows: list[int]) -> "Prefix":
        return Prefix([(k[rows], v[rows]) for k, v in self.layers], self.mask[rows])


@functools.cache
def cache_kwarg(model_class: type) -> str:
    """transformers 5.24 renamed forward's `past_key_values` to `cache`; 5.40 drops the old name."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def returned_cache(output):
    """The key/value cache a forward returned, under its name before or after transformers 5.24."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _causal_logits(backbone: Backbone, prompts, sequences, keep: int, prefix: Prefix | None = None) -> torch.Tensor:
    if prefix is None:
        embeds, mask = _embed_rows(backbone, prompts, sequences, left=True)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return backbone.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                              logits_to_keep=keep, use_cache=False).logits.float()
    none = [torch.zeros(0, backbone.width)] * len(sequences)
    embeds, mask = _embed_rows(backbone, none, sequences, left=True)
    positions = prefix.mask.sum(-1, keepdim=True) + (mask.cumsum(-1) - 1).clamp(min=0)
    cache = {cache_kwarg(type(backbone.model)): DynamicCache(ddp_cache_data=prefix.layers)}
    return backbone.model(inputs_embeds=embeds, attention_mask=torch.cat([prefix.mask, mask], 1),
                          position_ids=positions, use_cache=True, logits_to_keep=keep, **cache).logits.float()


def _sum_logprobs(logits: torch.Tensor, targets: list[list[int]], right_aligned: bool) -> torch.Tensor:
    logp = logits.log_softmax(-1)
    out = torch.empty(len(targets), device=logits.device)
    for row, target in enumerate(targets):
        positions = range(logits.shape[1] - len(target), logits.shape[1]) if right_aligned else range(len(target))
        out[row] = sum(logp[row, p, t] for p, t in zip(positions, target))
    return out


@torch.no_grad()
def row_class_scores(backbone: Backbone, prompts: list[torch.Tensor], inputs: list[list[int]],
                     targets: list[list[list[int]]], prefix: Prefix | None = None) -> list[torch.Tensor]:
    """Row r: the log-likelihood of each of its classes `targets[r]` given `[prompts[r]; inputs[r]]`
    (causal LMs: `prefix`, if given, holds the same prompts already run through the model)."""
    if backbone.is_encoder_decoder:  # encode each row once, decode each of its classes
        embeds, mask = _embed_rows(backbone, prompts, inputs, left=False)
        encoded = backbone.model.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        owner = [r for r, classes in enumerate(targets) for _ in classes]
        labels = [t for classes in targets for t in classes]
        width = max(len(t) for t in labels)
        padded = torch.tensor([t + [-100] * (width - len(t)) for t in labels], device=backbone.device)
        logits = backbone.model(encoder_outputs=(encoded[owner],), attention_mask=mask[owner],
                                decoder_input_ids=backbone.model.prepare_decoder_input_ids_from_labels(labels=padded),
                                use_cache=False).logits.float()
        flat = _sum_logprobs(logits, labels, right_aligned=False)
    elif all(len(t) == 1 for classes in targets for t in classes):  # one pass, one position per row
        logp = _causal_logits(backbone, prompts, inputs, 1, prefix)[:, -1].log_softmax(-1)
        return [logp[r, [t[0] for t in classes]] for r, classes in enumerate(targets)]
    else:  # a row per (example, class): [input; verbalizer], targets at the right edge
        owner = [r for r, classes in enumerate(targets) for _ in classes]
        labels = [t for classes in targets for t in classes]
        keep = max(len(t) for t in labels) + 1
        logits = _causal_logits(backbone, [prompts[r] for r in owner], [inputs[r] + t for r, t in zip(owner, labels)],
                                keep, prefix.select(owner) if prefix is not None else None)[:, :-1]
        flat = _sum_logprobs(logits, labels, right_aligned=True)
    sizes = [len(classes) for classes in targets]
    return list(flat.split(sizes))


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
        cached = row_class_scores(self.backbone, prompts, probe, targets, prefixes[name].select(
            list(range(len(task.prompts))) * 2))
        plain = row_class_scores(self.backbone, prompts, probe, targets)
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
        prefix = Prefix.cat([self.prefixes[t] for t in task_names]) if cached else None
        scores = row_class_scores(self.backbone, [p for _, p, _ in rows], [x for _, _, x in rows],
                                  [task.target_ids for task, _, _ in rows], prefix)
        sizes = [len(self.tasks[t].prompts) for t in task_names]
        out, start = [], 0
        for size in sizes:
            out.append(torch.stack(scores[start:start + size]))
            start += size
        return out

    def predict(self, task_names: list[str], inputs: list[list[int]]) -> list[tuple[int, torch.Tensor]]:
        """Per example: (label, mean log-likelihood per class)."""
        return [combine(s, self.how) for s in self.member_scores(task_names, inputs)]


def load_bundle(folder: Path, backbone: Backbone | None = None) -> tuple[PromptEnsemble, dict]:
    """The bundle's ensemble on its backbone (loaded if not given); a backbone other than the one
    the prompts were trained on is refused with a message that names both."""
    folder = Path(folder)
    record = json.loads((folder / BUNDLE_FILE).read_text())
    if record.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(f"{folder / BUNDLE_FILE}: format {record.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    backbone = backbone or load_backbone(record["backbone"], "float32")
    if backbone.fingerprint != record["fingerprint"]:
        raise CheckpointError(f"{folder}: these prompts were trained on backbone {record['backbone']!r} "
                              f"(fingerprint {record['fingerprint']}), not on {backbone.name!r} "
                              f"(fingerprint {backbone.fingerprint})")
    tasks = {}
    for name, task in record["tasks"].items():
        prompts = [load_checkpoint(folder / m, backbone.fingerprint, backbone.width).prompt for m in task["members"]]
        tasks[name] = TaskPrompts(task["verbalizers"],
                                  verbalizer_ids(backbone.tokenizer, task["verbalizers"], backbone.is_encoder_decoder),
                                  prompts)
    return PromptEnsemble(backbone, tasks, record["combine"]), record
