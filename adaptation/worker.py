"""What runs on each Ray Train worker of an LM-adaptation job: resume, then adapt, saving OUT/step-N
(rank 0) at each requested step. The loop reads top to bottom: batch, forward, loss, backward, step,
log, save. Dropout is seeded by (seed, step, worker) as the batch is (adaptation/corpus.py), so a job
resumed from its last saved state ends with the weights of one never stopped."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from softprompt.adaptation.config import AdaptConfig
from softprompt.adaptation.corpus import Cursor, TokenStream, prefix_lm_batch, ray_data_texts
from softprompt.adaptation.resume import MODEL_FILE, OPTIMIZER_FILE, STEP_FILE
from softprompt.files import atomic_folder


def train_worker(config: dict) -> None:
    """Ray Train's loop per worker: resume, then adapt, saving OUT/step-N (rank 0) at each requested step."""
    import ray
    import ray.train
    import ray.train.torch
    import torch
    from safetensors.torch import load_model, save_model
    from transformers import AutoModelForSeq2SeqLM
    from transformers.utils import logging as hf_logging

    from softprompt.models.hub import load_tokenizer
    from softprompt.trainables.adafactor import Adafactor

    hf_logging.disable_progress_bar()
    logging.getLogger().setLevel(logging.WARNING)  # Ray Train logs a line per report at INFO, on a logger of its own
    cfg, source = AdaptConfig(**{**config["cfg"], "steps": tuple(config["cfg"]["steps"])}), config["source"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config["threads"])
    model = AutoModelForSeq2SeqLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = load_tokenizer(source)  # one without a pad token pads with EOS, as in training
    start, optimizer_state, cursor = 0, None, Cursor()
    if checkpoint := ray.train.get_checkpoint():
        with checkpoint.as_directory() as folder:
            load_model(model, os.path.join(folder, MODEL_FILE))
            optimizer_state = torch.load(os.path.join(folder, OPTIMIZER_FILE), weights_only=True)
            saved = json.loads(Path(folder, STEP_FILE).read_text())
            # a state saved before the corpus was streamed has no cursors: its batches were random windows,
            # which no stream continues, so the stream starts at the corpus's first row
            start, cursor = saved["step"], Cursor(**saved["cursors"][rank]) if "cursors" in saved else Cursor()
    model = ray.train.torch.prepare_model(model)  # on the worker's device, wrapped for DDP
    device = ray.train.torch.get_device()
    optimizer = Adafactor(model.parameters(), lr=cfg.lr)  # after the move: its state lives where its parameters do
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    model.train()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    stream = TokenStream(lambda row: ray_data_texts(cfg.corpus, cfg.text_column, cfg.corpus_config, row),
                         tokenizer, rank, world, cursor)
    tracker = RunLogger(cfg.tracking_uri, config.get("run_id")) if rank == 0 else None
    last, window_tokens, window_start, losses = cfg.steps[-1], 0, time.perf_counter(), []
    for step in range(start + 1, last + 1):
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, step, rank]).generate_state(1)[0]))  # dropout
        windows = stream.take(cfg.batch_size * cfg.seq_len).reshape(cfg.batch_size, cfg.seq_len)
        batch = {k: v.to(device) for k, v in prefix_lm_batch(windows, cfg.seed, step, rank, eos, pad).items()}
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        window_tokens += int(batch["attention_mask"].sum() + (batch["labels"] != -100).sum())
        save = step in cfg.steps or step % cfg.checkpoint_every == 0
        if not (save or step % cfg.log_every == 0 or step == last):
            continue
        seconds = time.perf_counter() - window_start
        # this worker's mean loss over the window; tokens/s of all workers (each does the same work)
        metrics = {"step": step, "loss": float(np.mean(losses)), "tokens_per_s": world * window_tokens / seconds}
        cursors = from_every_worker(dataclasses.asdict(stream.cursor), world) if save else None  # every worker calls
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0 and save:
                unwrapped = model.module if hasattr(model, "module") else model
                save_model(unwrapped, os.path.join(folder, MODEL_FILE))
                torch.save(optimizer.state_dict(), os.path.join(folder, OPTIMIZER_FILE))
                Path(folder, STEP_FILE).write_text(json.dumps({"step": step, "cursors": cursors}))
                if step in cfg.steps:
                    _save_loadable(unwrapped, tokenizer, Path(cfg.out) / f"step-{step}")
            ray.train.report(metrics,
                             checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 and save else None)
        if rank == 0 and save:
            # report returns once the checkpoint is uploaded; Ray Train's controller registers it in the run's
            # snapshot, which a resume reads, only at its next poll. Until then a kill loses it.
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        if rank == 0:
            print(f"lm-adapt step {step}/{last}  loss {metrics['loss']:.4f}  {metrics['tokens_per_s']:,.0f} tokens/s "
                  f"({world} worker{'s' * (world > 1)}){'  state saved' * save}", flush=True)
            tracker.log(metrics)
        window_tokens, window_start, losses = 0, time.perf_counter(), []


def from_every_worker(value, world: int) -> list:
    """`value` of each worker, by rank, on every worker (each calls this at the same step)."""
    import torch.distributed as dist

    if world == 1:  # a job of one worker has no process group
        return [value]
    gathered = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def _save_loadable(model, tokenizer, target: Path) -> None:
    """A checkpoint transformers (and `load_backbone`) loads: safetensors, config, tokenizer, written whole
    (one there already was written by a run killed before its state was saved: the same weights)."""
    with atomic_folder(target) as partial:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)


class RunLogger:
    """Rank 0's MLflow logging of the job's loss and tokens/s; an unreachable server costs a warning, never the job."""

    def __init__(self, uri: str | None, run_id: str | None):
        self.client = None
        if uri and run_id:
            from mlflow.tracking import MlflowClient
            self.client, self.run_id = MlflowClient(uri), run_id

    def log(self, metrics: dict) -> None:
        self._quietly(lambda: [self.client.log_metric(self.run_id, key, metrics[key], step=metrics["step"])
                               for key in ("loss", "tokens_per_s")])

    def finish(self, manifest: Path) -> None:
        """The manifest as the run's artifact, and the run FINISHED."""
        self._quietly(lambda: (self.client.log_artifact(self.run_id, str(manifest)),
                               self.client.set_terminated(self.run_id, "FINISHED")))

    def _quietly(self, call) -> None:
        if self.client is None:
            return
        try:
            call()
        except Exception as error:  # tracking is never worth the job
            print(f"lm-adapt: MLflow logging failed ({type(error).__name__}); the job goes on untracked", flush=True)
            self.client = None
