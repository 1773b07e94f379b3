"""The LM-adaptation corpus, streamed: read by Ray Data beside each Ray Train worker, tokenised on the
worker, cut into the prefix-LM batches it trains on. Nothing reads the whole corpus: C4 is larger than
any node's memory, and a job of 100k steps reads only the part its steps need.

Determinism. Corpus rows are numbered in the order the source yields them (files in sorted order, a
file's rows in order), which is the same in every run. Worker r of W keeps rows r, r+W, r+2W, ... (each
worker reads the others' rows too, without tokenising them: reading is cheap next to training), ends
each with EOS, and lays them end to end into one token stream, read again from row 0 when the corpus
ends. Its batch at step s is the next `batch_size` windows of `seq_len` tokens of that stream, each
split into prefix and target at points drawn from (seed, s, r). So the batch depends only on the
corpus, the job's settings and (seed, s, r), given where the stream stood after step s-1: a Cursor
(pass over the corpus, row, token within the row), which every saved state records for each worker.
A resumed worker's read starts at its cursor's row: the rows before it are skipped inside the read
(parsed, never tokenised nor sent to the worker).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np

from softprompt.configfile import ConfigError

# Rows per block Ray Data moves to a worker: small blocks keep what a worker holds (and the object store)
# small and let training start on the first rows; bytes per block cap it where rows are long (C4 documents).
ROWS_PER_READ, BYTES_PER_BLOCK = 1024, 1 << 20


def open_corpus(source: str, text_column: str = "text", config: str | None = None):
    """The rows of the corpus, streamed (a `datasets` IterableDataset, nothing read yet): the train split,
    else the first, of what `source` names, read as a task mapping's dataset is (models.tasks.read_dataset)."""
    from softprompt.models.tasks import FILE_SUFFIXES, TaskError, Where, read_dataset

    try:
        data = read_dataset({"dataset": os.path.expanduser(source), "config": config}, Where(source, mapping=False),
                            streaming=True)
    except TaskError as error:
        raise ConfigError("--corpus", source, f"a readable corpus: a save_to_disk folder, text files "
                                              f"({', '.join(FILE_SUFFIXES)}) or a hub data set ({error})") from None
    return data["train"] if "train" in data else next(iter(data.values()))


def is_text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def check_corpus(rows, text_column: str, tokenizer, seq_len: int, source: str) -> None:
    """One-line refusals of a corpus the job could not train on, reading only as many rows as that takes:
    unreadable, without the text column, or not even one sequence long."""
    from softprompt.errors import one_line

    tokens = texts = 0
    try:
        for row in rows:
            if text_column not in row:
                raise ConfigError("--text-column", text_column, f"a column of {source}: {', '.join(row)}")
            if is_text(row[text_column]):
                texts += 1
                tokens += len(tokenizer(row[text_column], add_special_tokens=False)["input_ids"]) + 1  # and EOS
            if tokens > seq_len:
                return
    except ConfigError:
        raise
    except Exception as error:  # datasets raises many types for unreadable files, the reason as the cause
        cause = error.__cause__ or error
        raise ConfigError("--corpus", source,
                          f"a readable corpus ({type(cause).__name__}: {one_line(cause)})") from None
    raise ConfigError("--corpus", source, f"a corpus of more than --seq-len {seq_len} tokens: it has "
                                          f"{tokens} ({texts} non-empty texts)")


def ray_data_texts(corpus: str, text_column: str, config: str | None, start: int) -> Iterator[list]:
    """The corpus's `text_column` from row `start` on, in batches of rows, read by a Ray Data task that
    streams them to this process (reading ahead while it trains) and stops when it stops asking."""
    import ray.data

    # from_huggingface would swap a hub dataset for its parquet files, read from their start: the rows
    # skipped to `start` and the column selected would be lost. Its datasource streams the rows as given.
    from ray.data._internal.datasource.huggingface_datasource import HuggingFaceDatasource

    rows = open_corpus(corpus, text_column, config).select_columns([text_column]).skip(start)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = False  # a bar per worker, in the job's log
    context.target_max_block_size = BYTES_PER_BLOCK
    context.execution_options.preserve_order = True
    # no CPU of its own: on CPU workers the job holds every core, and a read that waits on the training it
    # feeds would never start; reading and parsing text is light next to a training step
    data = ray.data.read_datasource(HuggingFaceDatasource(rows, batch_size=ROWS_PER_READ), num_cpus=0,
                                    override_num_blocks=1)
    for batch in data.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield batch.column(text_column).to_pylist()


@dataclass(frozen=True)
class Cursor:
    """Where a worker's token stream stands: before token `offset` of corpus row `row`, in pass `epoch`."""
    epoch: int = 0
    row: int = 0
    offset: int = 0


class TokenStream:
    """Worker `rank` of `world`'s tokens (see the module's docstring), from `cursor` on. `texts_from(start)`
    yields the corpus's texts from row `start` on, in batches."""

    def __init__(self, texts_from: Callable[[int], Iterator[list]], tokenizer, rank: int, world: int,
                 cursor: Cursor = Cursor()):
        self.texts_from, self.tokenizer, self.rank, self.world = texts_from, tokenizer, rank, world
        self.cursor, self._tokens = cursor, None  # the cursor's row's tokens, once read
        self._rows = self._own_rows()

    def take(self, n: int) -> np.ndarray:
        """The next `n` tokens; the cursor moves past them."""
        pieces = []
        while n > 0:
            if self._tokens is None or self.cursor.offset == len(self._tokens):
                epoch, row, self._tokens = next(self._rows)
                resumed = (epoch, row) == (self.cursor.epoch, self.cursor.row)  # the row a resume stopped in
                self.cursor = Cursor(epoch, row, self.cursor.offset if resumed else 0)
            piece = self._tokens[self.cursor.offset:self.cursor.offset + n]
            pieces.append(piece)
            n -= len(piece)
            self.cursor = replace(self.cursor, offset=self.cursor.offset + len(piece))
        return np.concatenate(pieces)

    def _own_rows(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(pass, row, tokens and EOS) of this worker's non-empty rows, from the cursor's row on, passes
        over the corpus without end."""
        epoch, start = self.cursor.epoch, self.cursor.row
        while True:
            row, found = start, False
            for texts in self.texts_from(start):
                own = [(row + i, text) for i, text in enumerate(texts) if (row + i) % self.world == self.rank
                       and is_text(text)]
                row += len(texts)
                ids = self.tokenizer([text for _, text in own], add_special_tokens=False)["input_ids"] if own else []
                for (number, _), tokens in zip(own, ids):
                    found = True
                    yield epoch, number, np.array([*tokens, self.tokenizer.eos_token_id], dtype=np.int32)
            if not found and start == 0:  # a whole pass without a row of its own: it would wait for ever
                raise ConfigError("--workers", self.world, f"at most the corpus's non-empty rows: worker "
                                                           f"{self.rank} (rows {self.rank}, {self.rank + self.world}, "
                                                           f"...) has none")
            epoch, start = epoch + 1, 0


def prefix_lm_batch(windows: np.ndarray, seed: int, step: int, rank: int, eos: int, pad: int) -> dict:
    """A batch of `windows` (batch_size x seq_len tokens), each split at a point drawn from (seed, step,
    rank) into input (prefix) and target (continuation), each ended by EOS."""
    from softprompt.models.data import IGNORE, pad_rows

    splits = np.random.default_rng([seed, step, rank]).integers(1, windows.shape[1], len(windows))
    inputs = [[*window[:k], eos] for window, k in zip(windows.tolist(), splits)]
    targets = [[*window[k:], eos] for window, k in zip(windows.tolist(), splits)]
    return {"input_ids": pad_rows(inputs, pad, left=False),
            "attention_mask": pad_rows([[1] * len(r) for r in inputs], 0, left=False),
            "labels": pad_rows(targets, IGNORE, left=False)}
