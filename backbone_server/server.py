"""A shared backbone: one frozen copy of the model per GPU (per node on CPU) trains many trials' prompts.

A BackboneServer is a Ray actor holding the frozen model. It fuses the batches pending from several trials
into one forward/backward, one prompt per row, and returns each trial its own loss and prompt gradient (no
weight of the model learns, so no gradient crosses trials). Naming, lifetime and failures: docs/shared-backbone.md.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from softprompt.models.backbone import load_backbone
from softprompt.models.data import Batch, pass_chunks, target_batch, unpad
from softprompt.models.precision import default_device
from softprompt.models.prompt import GroupDropout, InputDropout, class_scores, generate, loss

NAMESPACE = "softprompt"   # servers live outside any one driver's namespace: a resumed search finds them
MAX_FUSED_TOKENS = 32768   # rows x padded width of the requests one round takes; one request is never split
# ... and of one forward/backward within a round. On a GPU one pass takes the whole round: a small
# pass is launch-bound (bench/results/gpu.md). On a CPU a bigger pass is no faster per example
# (bench/results/shared.md) and holds about 1 MB of activations per token: there each trial's batch is its own pass.
PASS_TOKENS = {"cpu": 0}
GATHER_FRACTION = 0.1      # a pass waits up to this share of the previous pass's time for the other trials,
GATHER_S = (0.005, 0.5)    # and at least and at most this long (a trial's round trip between passes: ~1-3 ms)
IDLE_CLIENT_S = 2.0        # a trial not heard from for this long (or 3 passes) is not waited for
IDLE_EXIT_S = 1800         # a server without requests for this long exits


@dataclass
class TrainRequest:
    prompt: torch.Tensor
    batch: Batch
    dropout: InputDropout | None

    @property
    def tokens(self) -> int:
        return int(self.batch.input_ids.numel()) + len(self.batch.input_ids) * len(self.prompt)


@dataclass
class ScoreRequest:
    prompt: torch.Tensor
    inputs: list[list[int]]
    targets: list[list[list[int]]]

    @property
    def tokens(self) -> int:
        width = len(self.prompt) + max(len(x) for x in self.inputs) + max(len(t) for ts in self.targets for t in ts)
        return width * sum(len(ts) for ts in self.targets)


class BackboneServer:
    """The frozen model, once, and the fused passes of every trial that uses it (a Ray actor)."""

    def __init__(self, model: str, dtype: str, gpu: str | None, pass_tokens: int | None = None,
                 min_gather_s: float = GATHER_S[0]):
        # before CUDA starts: this server's GPU is its trials' GPU, whatever Ray set; none for trials without one
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu if gpu is not None else ""
        torch.set_num_threads(len(os.sched_getaffinity(0)))  # it holds no CPU of its own: the trials wait on it
        self.backbone = load_backbone(model, dtype, default_device())
        self.min_gather_s = min_gather_s
        self.pass_tokens = pass_tokens if pass_tokens is not None else PASS_TOKENS.get(self.backbone.device.type,
                                                                                       MAX_FUSED_TOKENS)
        self.pending: list[tuple[str, str, object, asyncio.Future]] = []  # kind, client, request, reply
        self.clients: dict[str, float] = {}  # client -> when last heard from
        self.draining = False
        self.executor = ThreadPoolExecutor(1)  # passes run off the event loop, which keeps taking requests
        self.last_pass_s = 0.0
        # rounds: batches of requests taken together; passes: forward(/backward)s run for them
        self.counts = {"rounds": 0, "passes": 0, "requests": 0, "rows": 0, "max_fused": 0}
        self.joined = 0  # trials that connected
        self.broken: Exception | None = None
        self.last_request = time.monotonic()
        self.idle_watch = None

    def describe(self) -> dict:
        b = self.backbone
        return {"fingerprint": b.fingerprint, "width": b.width, "is_encoder_decoder": b.is_encoder_decoder,
                "vocab_is_frequency_ordered": b.vocab_is_frequency_ordered, "load_s": b.load_seconds,
                "device": str(b.device), "dtype": str(b.dtype), "pid": os.getpid()}

    def join(self) -> dict:
        """describe(), and whether a trial connected before (the model was loaded for it, not for this one)."""
        self.joined += 1
        return {**self.describe(), "loaded_before": self.joined > 1}

    def embed(self, ids: list[int]) -> torch.Tensor:
        return self.backbone.embed(ids)

    def statistics(self) -> dict:
        return dict(self.counts)

    def leave(self, client: str) -> None:
        self.clients.pop(client, None)

    async def train(self, client: str, prompt: torch.Tensor, batch: Batch, dropout: InputDropout | None):
        """(loss, gradient of the loss with respect to `prompt`) for one training batch."""
        return await self._submit("train", client, TrainRequest(prompt, batch, dropout))

    async def scores(self, client: str, prompt: torch.Tensor, inputs: list[list[int]],
                     targets: list[list[list[int]]]) -> torch.Tensor:
        """[rows, classes]: class_scores of `inputs` under `prompt`."""
        return await self._submit("scores", client, ScoreRequest(prompt, inputs, targets))

    async def generate(self, prompt: torch.Tensor, inputs: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations (exact-match evaluation), one trial at a time."""
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, lambda: generate(self.backbone, prompt.to(self.backbone.device), inputs, max_new_tokens))

    async def _submit(self, kind: str, client: str, request):
        reply = asyncio.get_running_loop().create_future()
        if self.idle_watch is None:
            self.idle_watch = asyncio.ensure_future(self._exit_when_idle())
        self.clients[client] = self.last_request = time.monotonic()
        self.pending.append((kind, client, request, reply))
        if not self.draining:
            self.draining = True
            asyncio.ensure_future(self._drain())
        return await reply

    async def _gather(self) -> None:
        """Wait briefly until every trial heard from lately has a request in: the trials of the last
        pass are stepping their optimizers, and a pass without them would split the round in two."""
        started = time.monotonic()
        deadline = started + min(max(self.min_gather_s, GATHER_FRACTION * self.last_pass_s), GATHER_S[1])
        idle = max(IDLE_CLIENT_S, 3 * self.last_pass_s)
        while time.monotonic() < deadline:
            waiting = {client for _, client, _, _ in self.pending}
            if all(client in waiting for client, seen in self.clients.items() if started - seen < idle):
                return
            await asyncio.sleep(0.002)

    async def _drain(self) -> None:
        try:
            while self.pending:
                if self.pass_tokens:
                    await self._gather()
                # without fusion (a CPU), one request at a time, first come first served: its trial gets
                # its reply as soon as its pass ends, and works on while the next one's pass runs
                budget = MAX_FUSED_TOKENS if self.pass_tokens else 0
                kind, taken, rest, tokens = self.pending[0][0], [], [], 0
                for item in self.pending:
                    size = item[2].tokens
                    if item[0] == kind and (not taken or tokens + size <= budget):
                        taken.append(item)
                        tokens += size
                    else:
                        rest.append(item)
                self.pending = rest
                started = time.monotonic()
                try:
                    results = await asyncio.get_running_loop().run_in_executor(
                        self.executor, self._run, kind, [item[2] for item in taken])
                except BaseException as error:  # not a pass's own error (those are results): every one hears it
                    results = [error] * len(taken)
                for item, result in zip(taken, results):
                    if item[3].done():  # its trial hung up
                        continue
                    if isinstance(result, BaseException):
                        item[3].set_exception(result)
                    else:
                        item[3].set_result(result)
                self.last_pass_s = time.monotonic() - started
                self.last_request = time.monotonic()
                self.counts["rounds"] += 1
                self.counts["requests"] += len(taken)
                self.counts["max_fused"] = max(self.counts["max_fused"], len(taken))
                if self.broken is not None:  # its trials have their error; Ray retries them on a new server
                    os._exit(1)
        finally:
            self.draining = False

    def _run(self, kind: str, requests: list) -> list:
        """Each request's result, or the error that its own rows caused. A round that fails is
        split in halves until the request at fault is alone, so one trial's out-of-memory or bad
        input ends that trial only. A CUDA error other than out-of-memory leaves the GPU context
        unusable: every request of the round gets it, and the server exits (`broken`)."""
        out_of_memory = False
        try:
            return (self._train_pass if kind == "train" else self._score_pass)(requests)
        except torch.OutOfMemoryError as error:
            if len(requests) == 1:
                return [error]
            out_of_memory = True  # retried below, outside this block: its traceback holds the pass's tensors
        except Exception as error:
            if "CUDA error" in str(error) or type(error).__name__ == "AcceleratorError":
                self.broken = error
                return [error] * len(requests)
            if len(requests) == 1:
                return [error]
        if out_of_memory and torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(requests) // 2
        return self._run(kind, requests[:half]) + self._run(kind, requests[half:])

    async def _exit_when_idle(self) -> None:
        """A server no request reached for IDLE_EXIT_S exits: a search whose driver was killed and
        never resumed does not hold the model (and, on a GPU, memory Ray does not see) for ever."""
        while True:
            await asyncio.sleep(60)
            if not self.pending and time.monotonic() - self.last_request > IDLE_EXIT_S:
                os._exit(0)

    def _train_pass(self, requests: list[TrainRequest]) -> list[tuple[float, torch.Tensor]]:
        """The requests' losses and gradients, in passes of at most `pass_tokens` (a request whole)."""
        return [result for chunk in pass_chunks([r.tokens for r in requests], self.pass_tokens)
                for result in self._fused_train_pass([requests[i] for i in chunk])]

    def _fused_train_pass(self, requests: list[TrainRequest]) -> list[tuple[float, torch.Tensor]]:
        backbone, seq2seq = self.backbone, self.backbone.is_encoder_decoder
        prompts = [r.prompt.detach().to(backbone.device).requires_grad_() for r in requests]  # leaves of this pass
        inputs, targets, rows, groups, parts = [], [], [], [], []
        for g, (request, prompt) in enumerate(zip(requests, prompts)):
            x, t = unpad(request.batch, seq2seq)
            longest = max(len(a) + (0 if seq2seq else len(b)) for a, b in zip(x, t))
            parts.append((request.dropout, len(inputs), len(x), len(prompt) + longest))
            inputs += x
            targets += t
            rows += [prompt] * len(x)
            groups += [g] * len(x)
        batch = target_batch(inputs, targets, backbone.tokenizer.pad_token_id, seq2seq).to(backbone.device)
        dropout = GroupDropout(tuple(parts), left=not seq2seq) if any(r.dropout for r in requests) else None
        losses = loss(backbone, rows, batch, dropout, groups=groups)
        losses.sum().backward()  # each prompt's gradient is its own group's: the groups share no weight that learns
        self.counts["rows"] += len(rows)
        self.counts["passes"] += 1
        return [(value, prompt.grad.float().cpu()) for value, prompt in zip(losses.tolist(), prompts)]

    @torch.no_grad()
    def _score_pass(self, requests: list[ScoreRequest]) -> list[torch.Tensor]:
        device = self.backbone.device
        rows, inputs, targets = [], [], []
        for request in requests:
            prompt = request.prompt.to(device)
            rows += [prompt] * len(request.inputs)
            inputs += request.inputs
            targets += request.targets
        scores = class_scores(self.backbone, rows, inputs, targets)
        self.counts["rows"] += len(rows)
        self.counts["passes"] += 1
        bounds = list(itertools.accumulate((len(r.inputs) for r in requests), initial=0))
        return [torch.stack(scores[start:end]).float().cpu() for start, end in zip(bounds, bounds[1:])]
