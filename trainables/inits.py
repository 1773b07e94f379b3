"""Soft-prompt initialisers, after google-research/prompt-tuning: small named functions of the
frozen input embeddings, chosen by name. Each returns a float32 [length, width] tensor. Token rows are
what the model receives for those tokens, its own scaling included (docs/configuration.md says why)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from softprompt.models.data import VOCAB_SAMPLE_SIZE


@dataclass
class InitContext:
    """What an initialiser may draw on besides the prompt's shape."""
    embed: Callable[[list[int]], torch.Tensor]  # token ids -> float32 [n, width], as the model receives them
    width: int
    common_token_ids: list[int]              # most common tokens first (see common_token_ids)
    class_token_ids: list[list[int]]         # each class's verbalizer sub-tokens
    text_token_ids: list[int]                # the `text` init's tokens
    scale: float
    generator: torch.Generator


def random_uniform(length: int, ctx: InitContext) -> torch.Tensor:
    """Uniform in [-scale, scale] (the paper's [-0.5, 0.5] at the default scale)."""
    return (torch.rand(length, ctx.width, generator=ctx.generator) * 2 - 1) * ctx.scale


def embedding_rms(embed: Callable[[list[int]], torch.Tensor], common_token_ids: list[int]) -> float:
    """The RMS of the most common tokens' embeddings as the model receives them: a backbone's scale."""
    return float(embed(common_token_ids[:VOCAB_SAMPLE_SIZE]).pow(2).mean().sqrt())


def random_uniform_relative(length: int, ctx: InitContext) -> torch.Tensor:
    """Uniform in [-scale, scale] times the RMS of the most common tokens' embeddings: the same
    range on any model, relative to what it receives for real tokens."""
    return random_uniform(length, ctx) * embedding_rms(ctx.embed, ctx.common_token_ids)


def sampled_vocab(length: int, ctx: InitContext) -> torch.Tensor:
    pool = torch.tensor(ctx.common_token_ids[:VOCAB_SAMPLE_SIZE])
    if length > len(pool):
        picks = torch.randint(len(pool), (length,), generator=ctx.generator)
    else:
        picks = torch.randperm(len(pool), generator=ctx.generator)[:length]
    return ctx.embed(pool[picks].tolist())


def class_label(length: int, ctx: InitContext) -> torch.Tensor:
    """Slot i < #classes: mean embedding of class i's verbalizer sub-tokens; the rest sampled vocab."""
    labels = [ctx.embed(ids).mean(0) for ids in ctx.class_token_ids[:length]]
    rest = sampled_vocab(length - len(labels), ctx)
    return torch.cat([torch.stack(labels), rest]) if labels else rest


def text(length: int, ctx: InitContext) -> torch.Tensor:
    """Embeddings of the init text's tokens, repeated to fill the prompt (as PEFT's TEXT init)."""
    ids = (ctx.text_token_ids * (length // len(ctx.text_token_ids) + 1))[:length]
    return ctx.embed(ids)


INITS = {f.__name__: f for f in (random_uniform, random_uniform_relative, sampled_vocab, class_label, text)}
