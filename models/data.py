"""Tokenise a task once, then cut it into small-padding batches by index.

Causal LMs see `[input; verbalizer]` left-padded, so every target sits at the right edge and
only the last few positions need logits. Encoder-decoders see the input right-padded on the
encoder and the verbalizer (plus EOS) as decoder labels.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from softprompt.errors import ConfigError
from softprompt.models.hub import load_tokenizer, resolve_model

if TYPE_CHECKING:  # a served model formats and tokenises without `datasets`, which tasks import
    from softprompt.models.tasks import Task

IGNORE = -100
SENTINEL = "<extra_id_0>"  # T5's first sentinel: span corruption's targets start with it
VOCAB_SAMPLE_SIZE = 5000  # the paper samples prompt inits from the 5,000 most common tokens
BUCKET_BATCHES = 50  # batches per length-sorted chunk: small padding, still a shuffled order


def common_token_ids(tokenized_texts: Iterable[list[int]], vocab_size: int, special_ids: set[int],
                     frequency_ordered: bool) -> list[int]:
    """Most common tokens first. SentencePiece vocabularies (T5) are already frequency-ordered,
    so their ids are taken in order; BPE vocabularies are not, so token frequency is measured
    on the task's training text, topped up with the lowest ids if that text is small."""
    if frequency_ordered:
        counted: list[int] = []
    else:
        counts = Counter(token for ids in tokenized_texts for token in ids)
        counted = [token for token, _ in counts.most_common() if token not in special_ids]
    seen = set(counted)
    top_up = (i for i in range(vocab_size) if i not in special_ids and i not in seen)
    while len(counted) < VOCAB_SAMPLE_SIZE and len(counted) < vocab_size - len(special_ids):
        counted.append(next(top_up))
    return counted[:VOCAB_SAMPLE_SIZE]


@dataclass
class EncodedSplit:
    input_ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class EncodedTask:
    name: str
    verbalizers: list[str]
    target_ids: list[list[int]]         # per class: the verbalizer's tokens (+EOS for seq2seq)
    splits: dict[str, EncodedSplit]
    common_token_ids: list[int]         # for sampled-vocab inits, most common first
    is_encoder_decoder: bool
    pad_id: int
    template: str = "{text}"            # the task's raw columns -> its input (models.templates.format_input)
    sentinel: bool = False              # every target starts with SENTINEL (TrainConfig.sentinel)
    labels: list[str] | None = None     # per class: the task's own label value (None: the verbalizers)

    @property
    def single_token_targets(self) -> bool:
        return all(len(ids) == 1 for ids in self.target_ids)


@dataclass
class Batch:
    input_ids: torch.Tensor        # [B, T]
    attention_mask: torch.Tensor   # [B, T]
    labels: torch.Tensor           # [B, L] target tokens, IGNORE where padded
    classes: torch.Tensor          # [B] the class each row's target belongs to

    def to(self, device) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels, self.classes)))


def verbalizer_ids(tokenizer, verbalizers: list[str], is_encoder_decoder: bool,
                   sentinel: bool = False) -> list[list[int]]:
    """Target tokens per class: the verbalizer plus EOS for encoder-decoders (after SENTINEL with
    `sentinel`); for causal LMs the verbalizer after a space, as it follows the input's cue."""
    if is_encoder_decoder:
        prefix = [sentinel_id(tokenizer)] if sentinel else []
        return [prefix + tokenizer(v, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                for v in verbalizers]
    if sentinel:
        raise ConfigError("sentinel", True, "an encoder-decoder (T5) model; a causal LM's targets follow its input "
                                            "directly")
    return [tokenizer(" " + v, add_special_tokens=False)["input_ids"] for v in verbalizers]


def check_sentinel(model: str) -> None:
    """Refuse sentinel targets for a model that cannot take them, before any trial starts."""
    source, config, _ = resolve_model(model)
    verbalizer_ids(load_tokenizer(source), ["x"], config.is_encoder_decoder, sentinel=True)


def sentinel_id(tokenizer) -> int:
    """The id of T5's first sentinel, which starts every span-corruption target."""
    token_id = tokenizer.convert_tokens_to_ids(SENTINEL)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ConfigError("sentinel", True, f"a model whose tokenizer has T5's {SENTINEL} token (a T5 checkpoint); "
                                            f"this one has none")
    return token_id


def encode_task(task: Task, tokenizer, is_encoder_decoder: bool, vocab_is_frequency_ordered: bool,
                max_length: int, max_train: int | None = None, max_eval: int | None = None,
                confirm: int = 0, max_test: int | None = None, sentinel: bool = False) -> EncodedTask:
    """Tokenise every split once; truncation keeps the end of causal inputs (where the cue is)
    and the start of encoder inputs. The test split is whole unless `max_test` caps it: its score
    is compared with published ones. `confirm` > 0 adds a "confirm" split: up to that many dev
    examples after the first `max_eval` (none when every dev example is already in "dev")."""
    def encode(split: str, limit: int | None, skip: int = 0) -> EncodedSplit:
        rows = task.splits[split]
        end = len(rows) if limit is None else min(len(rows), skip + limit)
        if skip >= end:
            return EncodedSplit([], [])
        if (skip, end) != (0, len(rows)):
            rows = rows.select(range(skip, end))
        ids = tokenizer(list(rows["input"]), add_special_tokens=True)["input_ids"]
        ids = [x[:max_length] if is_encoder_decoder else x[-max_length:] for x in ids]
        return EncodedSplit(ids, list(rows["label"]))

    splits = {"train": encode("train", max_train), "dev": encode("dev", max_eval), "test": encode("test", max_test)}
    if confirm:
        splits["confirm"] = encode("dev", confirm, skip=len(task.splits["dev"]) if max_eval is None else max_eval)
    targets = verbalizer_ids(tokenizer, task.verbalizers, is_encoder_decoder, sentinel)
    common = common_token_ids(splits["train"].input_ids, len(tokenizer), set(tokenizer.all_special_ids),
                              vocab_is_frequency_ordered)
    return EncodedTask(task.name, task.verbalizers, targets, splits, common, is_encoder_decoder,
                       tokenizer.pad_token_id, task.template, sentinel, task.labels)


def pad_rows(rows: list[list[int]], value: int, left: bool) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([[value] * (width - len(r)) + r if left else r + [value] * (width - len(r)) for r in rows],
                        dtype=torch.long)


def make_batch(data: EncodedTask, inputs: list[list[int]], classes: list[int]) -> Batch:
    """A batch whose targets are the verbalizers of `classes` (the gold ones when training)."""
    return target_batch(inputs, [data.target_ids[c] for c in classes], data.pad_id, data.is_encoder_decoder, classes)


def target_batch(inputs: list[list[int]], targets: list[list[int]], pad_id: int, is_encoder_decoder: bool,
                 classes: list[int] | None = None) -> Batch:
    """A batch that scores `targets[r]` after `inputs[r]`."""
    if is_encoder_decoder:
        input_ids = pad_rows(inputs, pad_id, left=False)
        mask = pad_rows([[1] * len(x) for x in inputs], 0, left=False)
        labels = pad_rows(targets, IGNORE, left=False)
    else:
        input_ids = pad_rows([x + t for x, t in zip(inputs, targets)], pad_id, left=True)
        mask = pad_rows([[1] * (len(x) + len(t)) for x, t in zip(inputs, targets)], 0, left=True)
        labels = pad_rows(targets, IGNORE, left=True)  # right-aligned with the sequence's end
    return Batch(input_ids, mask, labels, torch.tensor(classes or [0] * len(inputs)))


def unpad(batch: Batch, is_encoder_decoder: bool) -> tuple[list[list[int]], list[list[int]]]:
    """The inputs and targets a target_batch was built from (a shared backbone re-pads trials' rows together)."""
    inputs, targets = [], []
    for ids, mask, labels in zip(batch.input_ids.tolist(), batch.attention_mask.tolist(), batch.labels.tolist()):
        real, target = [i for i, m in zip(ids, mask) if m], [t for t in labels if t != IGNORE]
        inputs.append(real if is_encoder_decoder else real[:len(real) - len(target)])
        targets.append(target)
    return inputs, targets


def input_batch(inputs: list[list[int]], pad_id: int, is_encoder_decoder: bool) -> Batch:
    """Inputs alone, left-padded for causal LMs (scoring the next token, generating)."""
    return target_batch(inputs, [[]] * len(inputs), pad_id, is_encoder_decoder)


class TrainOrder:
    """Which training examples form batch `step`: a pure function of (seed, step), so a resumed
    run sees exactly the batches it would have seen. Each epoch shuffles, sorts chunks of
    BUCKET_BATCHES batches by length (little padding) and shuffles the batches."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self._epoch, self._batches = -1, []

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        chunk = self.batch_size * BUCKET_BATCHES
        batches = []
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches += [part[i:i + self.batch_size] for i in range(0, len(part), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def batches_per_epoch(self) -> int:
        chunk = self.batch_size * BUCKET_BATCHES
        full, rest = divmod(len(self.lengths), chunk)
        return full * BUCKET_BATCHES + -(-rest // self.batch_size)

    def indices(self, step: int) -> np.ndarray:
        epoch, position = divmod(step, self.batches_per_epoch())
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._epoch_batches(epoch)
        return self._batches[position]


def train_batch(data: EncodedTask, order: TrainOrder, step: int) -> Batch:
    split = data.splits["train"]
    idx = order.indices(step)
    return make_batch(data, [split.input_ids[i] for i in idx], [split.labels[i] for i in idx])


def pass_chunks(lengths: list[int], budget: int) -> list[list[int]]:
    """Row indices, in order, in chunks of at most `budget` tokens each (a longer row alone)."""
    chunks, chunk, tokens = [], [], 0
    for i, n in enumerate(lengths):
        if chunk and tokens + n > budget:
            chunks.append(chunk)
            chunk, tokens = [], 0
        chunk.append(i)
        tokens += n
    return chunks + [chunk] if chunk else chunks


def eval_chunks(split: EncodedSplit, batch_size: int) -> list[np.ndarray]:
    """Evaluation batches of similar length; the caller restores the original order."""
    order = np.argsort([len(x) for x in split.input_ids], kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
