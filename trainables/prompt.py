"""The soft prompt: a plain [length, width] float32 parameter in front of the input embeddings.

For causal LMs the prompt precedes the text and position ids are counted over real tokens only,
so an example scores the same alone or inside a padded batch. For encoder-decoders (T5) the
prompt goes on the encoder input only; the decoder is untouched (as in the paper; PEFT's seq2seq
default prefixes the decoder too).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from trainables.backbone import Backbone
from trainables.data import IGNORE, Batch, EncodedTask, pad_rows, input_batch, make_batch


class SoftPrompt(nn.Module):
    def __init__(self, values: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(values.detach().float().clone())

    @property
    def length(self) -> int:
        return self.weight.shape[0]


@dataclass(frozen=True)
class InputDropout:
    """Dropout on the embedded input, prompt included, while training (the paper's fine-tuning
    config: 0.1). Its masks come from `generator`, so they are fixed by (seed, step) as the batch
    is (TrainOrder), and a resumed run drops what it would have dropped."""
    rate: float
    generator: torch.Generator

    @classmethod
    def for_step(cls, rate: float, seed: int, step: int, device: torch.device) -> "InputDropout | None":
        if rate == 0:
            return None
        mixed = int(np.random.SeedSequence([seed, step]).generate_state(1)[0])  # nearby steps, unrelated masks
        return cls(rate, torch.Generator(device).manual_seed(mixed))

    def __call__(self, embeds: torch.Tensor) -> torch.Tensor:
        keep = torch.rand(embeds.shape, generator=self.generator, device=embeds.device) >= self.rate
        return embeds * keep.to(embeds.dtype) / (1 - self.rate)


class PromptedModel:
    """A frozen backbone with one soft prompt in front of every input."""

    def __init__(self, backbone: Backbone, prompt: SoftPrompt):
        self.backbone = backbone
        self.model = backbone.model
        self.prompt = prompt

    def _prompted_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         dropout: InputDropout | None = None):
        embeds = self.model.get_input_embeddings()(input_ids)
        batch = embeds.shape[0]
        prompt = self.prompt.weight.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        ones = attention_mask.new_ones(batch, self.prompt.length)
        embeds = torch.cat([prompt, embeds], 1)
        return embeds if dropout is None else dropout(embeds), torch.cat([ones, attention_mask], 1)

    def _causal_logits(self, batch: Batch, keep: int, dropout: InputDropout | None = None) -> torch.Tensor:
        """Logits of the last `keep` positions only: the full-vocabulary projection of every
        position would cost a fifth of the forward pass for nothing."""
        embeds, mask = self._prompted_inputs(batch.input_ids, batch.attention_mask, dropout)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                         logits_to_keep=keep, use_cache=False)
        return out.logits.float()

    def target_logprobs(self, batch: Batch, dropout: InputDropout | None = None) -> torch.Tensor:
        """[B, L] log-probability of each target token (0 where the target is padding); `dropout`
        only in training."""
        if self.backbone.is_encoder_decoder:
            embeds, mask = self._prompted_inputs(batch.input_ids, batch.attention_mask, dropout)
            decoder_ids = self.model.prepare_decoder_input_ids_from_labels(labels=batch.labels)
            logits = self.model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids,
                                use_cache=False).logits.float()
        else:
            logits = self._causal_logits(batch, batch.labels.shape[1] + 1, dropout)[:, :-1]
        return _gather_targets(logits, batch.labels)

    def loss(self, batch: Batch, dropout: InputDropout | None = None) -> torch.Tensor:
        """Mean negative log-likelihood per target token (the training loss)."""
        logp = self.target_logprobs(batch, dropout)
        return -logp.sum() / (batch.labels != IGNORE).sum()

    @torch.no_grad()
    def class_scores(self, data: EncodedTask, inputs: list[list[int]]) -> torch.Tensor:
        """[B, C] log-likelihood of every class's verbalizer, in one batched pass."""
        device = self.backbone.device
        n_classes = len(data.target_ids)
        if not self.backbone.is_encoder_decoder and data.single_token_targets:
            batch = input_batch(data, inputs).to(device)
            logp = self._causal_logits(batch, 1)[:, -1].log_softmax(-1)
            return logp[:, [ids[0] for ids in data.target_ids]]
        if self.backbone.is_encoder_decoder:  # encode once, decode every class
            batch = input_batch(data, inputs).to(device)
            embeds, mask = self._prompted_inputs(batch.input_ids, batch.attention_mask)
            encoded = self.model.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            labels = pad_rows(data.target_ids, IGNORE, left=False).to(device).repeat(len(inputs), 1)
            logits = self.model(encoder_outputs=(encoded.repeat_interleave(n_classes, 0),),
                                attention_mask=mask.repeat_interleave(n_classes, 0),
                                decoder_input_ids=self.model.prepare_decoder_input_ids_from_labels(labels=labels),
                                use_cache=False).logits.float()
            return _gather_targets(logits, labels).sum(-1).view(len(inputs), n_classes)
        rows = [x for x in inputs for _ in range(n_classes)]
        batch = make_batch(data, rows, list(range(n_classes)) * len(inputs)).to(device)
        return self.target_logprobs(batch).sum(-1).view(len(inputs), n_classes)

    @torch.no_grad()
    def generate(self, data: EncodedTask, inputs: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations (new tokens only), for exact-match evaluation."""
        batch = input_batch(data, inputs).to(self.backbone.device)
        embeds, mask = self._prompted_inputs(batch.input_ids, batch.attention_mask)
        tokenizer = self.backbone.tokenizer
        out = self.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=tokenizer.pad_token_id)
        if self.backbone.is_encoder_decoder:
            out = out[:, 1:]  # the decoder start token
        return out.tolist()


def _gather_targets(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(labels == IGNORE, 0.0)
