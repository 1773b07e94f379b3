"""The soft prompt: a plain [length, width] float32 parameter in front of the input embeddings, and the one
scoring path that places prompts (a prompt per row, if need be), for training and serving alike. Causal LMs
count position ids over real tokens only; T5 gets the prompt on the encoder only (docs/architecture.md).
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from softprompt.models.backbone import Backbone
from softprompt.models.data import IGNORE, Batch, EncodedTask, input_batch, pad_rows, target_batch


class SoftPrompt(nn.Module):
    def __init__(self, values: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(values.detach().float().clone())


@dataclass(frozen=True)
class InputDropout:
    """Dropout on the embedded input, prompt included, while training (the paper's fine-tuning
    config: 0.1). Its masks are fixed by (seed, step) as the batch is (TrainOrder), so a resumed run
    drops what it would have dropped. Plain numbers: it travels to a shared backbone (backbone_server/server.py)."""
    rate: float
    seed: int
    step: int

    @classmethod
    def for_step(cls, rate: float, seed: int, step: int) -> InputDropout | None:
        return None if rate == 0 else cls(rate, seed, step)

    def __call__(self, embeds: torch.Tensor) -> torch.Tensor:
        # nearby steps, unrelated masks
        mixed = int(np.random.SeedSequence([self.seed, self.step]).generate_state(1)[0])
        generator = torch.Generator(embeds.device).manual_seed(mixed)
        keep = torch.rand(embeds.shape, generator=generator, device=embeds.device) >= self.rate
        return embeds * keep.to(embeds.dtype) / (1 - self.rate)


@dataclass(frozen=True)
class GroupDropout:
    """Each group of rows (one trial's batch in a fused pass) dropped by its own InputDropout, over
    its own rows and its own longest [prompt; input] only: its masks are the same whichever other
    rows share the pass. `groups`: (dropout or None, first row, rows, length); `left`: real tokens
    are right-aligned (causal LMs) rather than left-aligned (encoder inputs)."""
    groups: tuple[tuple[InputDropout | None, int, int, int], ...]
    left: bool

    def __call__(self, embeds: torch.Tensor) -> torch.Tensor:
        out = embeds.clone()
        for dropout, first, rows, length in self.groups:
            if dropout is not None:
                window = slice(embeds.shape[1] - length, None) if self.left else slice(0, length)
                out[first:first + rows, window] = dropout(embeds[first:first + rows, window])
        return out


@dataclass
class Prefix:
    """Soft prompts as a causal LM's keys and values, one row per prompt, left-padded to one length.

    A prompt comes first and attention is causal, so its keys and values in every layer depend on
    the prompt alone: a served model computes them once at load time, and a request then costs
    only its own tokens (PEFT's forward recomputes the prompt in every request)."""
    layers: list[tuple[torch.Tensor, torch.Tensor]]   # per layer: keys, values [rows, heads, length, dim]
    mask: torch.Tensor                                # [rows, length]: 1 where a prompt vector is

    @classmethod
    def of(cls, backbone: Backbone, prompts: list[torch.Tensor]) -> Prefix | None:
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
    def cat(cls, parts: list[Prefix]) -> Prefix:
        length = max(p.mask.shape[1] for p in parts)
        parts = [p.pad_to(length) for p in parts]
        layers = [(torch.cat([p.layers[i][0] for p in parts]), torch.cat([p.layers[i][1] for p in parts]))
                  for i in range(len(parts[0].layers))]
        return cls(layers, torch.cat([p.mask for p in parts]))

    def pad_to(self, length: int) -> Prefix:
        extra = length - self.mask.shape[1]
        if extra == 0:
            return self

        def pad(t):  # left, along the length axis
            return torch.nn.functional.pad(t, (0, 0, extra, 0))

        return Prefix([(pad(k), pad(v)) for k, v in self.layers], torch.nn.functional.pad(self.mask, (extra, 0)))

    def select(self, rows: list[int]) -> Prefix:
        return Prefix([(k[rows], v[rows]) for k, v in self.layers], self.mask[rows])


# One [p, e] prompt for every row, one per row (lengths may differ), or a Prefix (causal LMs only).
Prompts = torch.Tensor | list[torch.Tensor] | Prefix


@functools.cache
def cache_kwarg(model_class: type) -> str:
    """transformers 5.24 renamed forward's `past_key_values` to `cache`; 5.40 drops the old name."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def returned_cache(output):
    """The key/value cache a forward returned, under its name before or after transformers 5.24."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def prompted_inputs(backbone: Backbone, prompts: torch.Tensor | list[torch.Tensor], input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, dropout: InputDropout | GroupDropout | None = None):
    """Each row's [prompt; input] embeddings and their attention mask; gradients reach every prompt."""
    embeds = backbone.model.get_input_embeddings()(input_ids)
    if torch.is_tensor(prompts):  # one prompt: one cat in front of the padded batch, no per-row work
        rows = embeds.shape[0]
        ones = attention_mask.new_ones(rows, prompts.shape[0])
        embeds = torch.cat([prompts.to(embeds.dtype).unsqueeze(0).expand(rows, -1, -1), embeds], 1)
        mask = torch.cat([ones, attention_mask], 1)
    else:  # each row's real tokens packed behind its own prompt, padded on the batch's side
        side = "right" if backbone.is_encoder_decoder else "left"
        packed = [torch.cat([p.to(e.device, e.dtype), e[m.bool()]]) for p, e, m in zip(prompts, embeds, attention_mask)]
        embeds = pad_sequence(packed, batch_first=True, padding_side=side)
        mask = pad_rows([[1] * len(p) for p in packed], 0, side == "left").to(attention_mask.device)
    return embeds if dropout is None else dropout(embeds), mask


def _causal_logits(backbone: Backbone, prompts: Prompts, batch: Batch, keep: int,
                   dropout: InputDropout | GroupDropout | None = None) -> torch.Tensor:
    """Logits of the last `keep` positions only: the full-vocabulary projection of every
    position would cost a fifth of the forward pass for nothing."""
    if isinstance(prompts, Prefix):  # the prompts are in the cache already: rows hold their own tokens
        embeds, mask = backbone.model.get_input_embeddings()(batch.input_ids), batch.attention_mask
        start, full_mask = prompts.mask.sum(-1, keepdim=True), torch.cat([prompts.mask, mask], 1)
        cache = {"use_cache": True, cache_kwarg(type(backbone.model)): DynamicCache(ddp_cache_data=prompts.layers)}
    else:
        embeds, mask = prompted_inputs(backbone, prompts, batch.input_ids, batch.attention_mask, dropout)
        start, full_mask, cache = 0, mask, {"use_cache": False}
    positions = start + (mask.cumsum(-1) - 1).clamp(min=0)
    return backbone(inputs_embeds=embeds, attention_mask=full_mask, position_ids=positions,
                    logits_to_keep=keep, **cache).logits.float()


def target_logprobs(backbone: Backbone, prompts: Prompts, batch: Batch,
                    dropout: InputDropout | GroupDropout | None = None) -> torch.Tensor:
    """[B, L] log-probability of each target token (0 where the target is padding); `dropout` only in training."""
    if backbone.is_encoder_decoder:
        embeds, mask = prompted_inputs(backbone, prompts, batch.input_ids, batch.attention_mask, dropout)
        decoder_ids = backbone.model.prepare_decoder_input_ids_from_labels(labels=batch.labels)
        logits = backbone(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids,
                          use_cache=False).logits.float()
    else:
        logits = _causal_logits(backbone, prompts, batch, batch.labels.shape[1] + 1, dropout)[:, :-1]
    return _gather_targets(logits, batch.labels)


def loss(backbone: Backbone, prompts: Prompts, batch: Batch, dropout: InputDropout | GroupDropout | None = None,
         groups: list[int] | None = None) -> torch.Tensor:
    """Mean negative log-likelihood per target token (the training loss); with `groups` (row r's
    group id), [G] one per group, each over its own rows only (several trials in one pass)."""
    logp, counted = target_logprobs(backbone, prompts, batch, dropout), batch.labels != IGNORE
    if groups is None:
        return -logp.sum() / counted.sum()
    ids = torch.as_tensor(groups, device=logp.device)

    def per_group(values):
        return values.new_zeros(int(ids.max()) + 1).index_add(0, ids, values)

    return -per_group(logp.sum(-1)) / per_group(counted.sum(-1).to(logp.dtype))


@torch.no_grad()
def class_scores(backbone: Backbone, prompts: Prompts, inputs: list[list[int]],
                 targets: list[list[list[int]]]) -> list[torch.Tensor]:
    """Row r: the log-likelihood of each of its classes' tokens `targets[r]` given `[prompt; inputs[r]]`."""
    pad, seq2seq, sizes = backbone.tokenizer.pad_token_id, backbone.is_encoder_decoder, [len(t) for t in targets]
    owner = [r for r, size in enumerate(sizes) for _ in range(size)]
    labels = [t for classes in targets for t in classes]
    if seq2seq:  # encode each row once, decode each of its classes
        batch = input_batch(inputs, pad, seq2seq).to(backbone.device)
        embeds, mask = prompted_inputs(backbone, prompts, batch.input_ids, batch.attention_mask)
        encoded = backbone.model.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        padded = pad_rows(labels, IGNORE, left=False).to(backbone.device)
        logits = backbone(encoder_outputs=(encoded[owner],), attention_mask=mask[owner],
                          decoder_input_ids=backbone.model.prepare_decoder_input_ids_from_labels(labels=padded),
                          use_cache=False).logits.float()
        return list(_gather_targets(logits, padded).sum(-1).split(sizes))
    if all(len(t) == 1 for t in labels):  # one pass, one position per row
        batch = input_batch(inputs, pad, seq2seq).to(backbone.device)
        logp = _causal_logits(backbone, prompts, batch, 1)[:, -1].log_softmax(-1)
        return [logp[r, [t[0] for t in classes]] for r, classes in enumerate(targets)]
    # a row per (example, class): [input; verbalizer], targets at the right edge
    batch = target_batch([inputs[r] for r in owner], labels, pad, seq2seq).to(backbone.device)
    rows = (prompts if torch.is_tensor(prompts) else prompts.select(owner) if isinstance(prompts, Prefix)
            else [prompts[r] for r in owner])
    return list(target_logprobs(backbone, rows, batch).sum(-1).split(sizes))


class PromptedModel:
    """A frozen backbone with one soft prompt in front of every input."""

    def __init__(self, backbone: Backbone, prompt: SoftPrompt):
        self.backbone = backbone
        self.model = backbone.model
        self.prompt = prompt

    def target_logprobs(self, batch: Batch, dropout: InputDropout | GroupDropout | None = None) -> torch.Tensor:
        return target_logprobs(self.backbone, self.prompt.weight, batch, dropout)

    def loss(self, batch: Batch, dropout: InputDropout | GroupDropout | None = None) -> torch.Tensor:
        return loss(self.backbone, self.prompt.weight, batch, dropout)

    def loss_backward(self, batch: Batch, dropout: InputDropout | None = None) -> float:
        """One training pass: the loss, its gradient left in `prompt.weight.grad`."""
        value = self.loss(batch, dropout)
        value.backward()
        return value.item()

    def class_scores(self, data: EncodedTask, inputs: list[list[int]]) -> torch.Tensor:
        """[B, C] log-likelihood of every class's verbalizer, in one batched pass."""
        return torch.stack(class_scores(self.backbone, self.prompt.weight, inputs, [data.target_ids] * len(inputs)))

    def class_scores_batches(self, data: EncodedTask, batches: list[list[list[int]]]) -> list[torch.Tensor]:
        """class_scores of each batch of inputs (a shared backbone takes them all at once)."""
        return [self.class_scores(data, inputs) for inputs in batches]

    def generate(self, data: EncodedTask, inputs: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations (new tokens only), for exact-match evaluation."""
        return generate(self.backbone, self.prompt.weight, inputs, max_new_tokens)


@torch.no_grad()
def generate(backbone: Backbone, prompt: torch.Tensor, inputs: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of `[prompt; inputs[r]]` (new tokens only)."""
    tokenizer = backbone.tokenizer
    batch = input_batch(inputs, tokenizer.pad_token_id, backbone.is_encoder_decoder).to(backbone.device)
    embeds, mask = prompted_inputs(backbone, prompt, batch.input_ids, batch.attention_mask)
    out = backbone.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=tokenizer.pad_token_id)
    if backbone.is_encoder_decoder:
        out = out[:, 1:]  # the decoder start token
    return out.tolist()


def _gather_targets(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(labels == IGNORE, 0.0)
