"""LM adaptation as a Ray Train job (paper section 3.2, Figure 3d): continue a span-corruption T5
with T5's prefix-LM objective (a text prefix as input, its continuation as target) and save a
loadable checkpoint at each requested step, for searches to explore how much adaptation a prompt
needs.

The job is data parallel (TorchTrainer, DDP: one model copy per worker, a GPU each, or CPU workers
where there is none). The batch of step s on worker r depends only on (seed, s, r) and dropout is
seeded the same way, so a killed job resumed from its last checkpoint trains on exactly what it
would have, and ends with the same weights.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from softprompt.adaptation.resume import MODEL_FILE, OPTIMIZER_FILE, STEP_FILE, resume_from_newest_complete_checkpoint
from softprompt.configfile import ConfigError
from softprompt.files import atomic_folder
from softprompt.models.manifest import write_manifest
from softprompt.trainables.tracking import RUN_FILE

STATE_DIR, RUN_NAME = ".ray", "lm-adapt"   # Ray Train's run under OUT: the same name resumes it
JOB_FILE = "job.json"                      # what the job trains on and how, kept under STATE_DIR: a resume must match
# What decides the weights at each step: a resumed job with other values would not continue the same run.
JOB_FIELDS = ("corpus", "corpus_config", "text_column", "batch_size", "seq_len", "lr", "seed", "workers")


@dataclass(frozen=True)
class AdaptConfig:
    model: str                       # a span-corruption T5: hub id (google/t5-v1_1-base) or local folder
    corpus: str                      # a `datasets` source (hub id or save_to_disk folder) or text files
    steps: tuple[int, ...]           # save a checkpoint at each of these steps, increasing
    out: str                         # OUT/step-N folders, the manifest, and the job's state
    text_column: str = "text"        # the corpus column that holds the text
    corpus_config: str | None = None  # a hub data set's configuration (wikitext-103-raw-v1)
    workers: int | None = None       # default: one per GPU, or one CPU worker per node's cores
    batch_size: int = 8              # sequences per worker and step
    seq_len: int = 128               # tokens per sequence, split at a random point into input and target
    lr: float = 1e-3                 # T5X Adafactor (trainables/adafactor.py), constant
    seed: int = 0
    checkpoint_every: int = 1000     # a resumable state this often, besides every requested step
    log_every: int = 10              # loss and tokens/s to the log and MLflow this often
    tracking_uri: str | None = None  # MLflow; none: not tracked


def check_config(cfg: AdaptConfig) -> None:
    """One-line errors for what the job would otherwise fail on later, on a worker."""
    if (not cfg.steps or any(not isinstance(s, int) or s < 1 for s in cfg.steps)
            or list(cfg.steps) != sorted(set(cfg.steps))):
        raise ConfigError("--steps", ",".join(map(str, cfg.steps)), "positive step counts, strictly increasing "
                                                                    "(e.g. 10000,50000,100000)")
    for field in ("batch_size", "seq_len", "checkpoint_every", "log_every"):
        if getattr(cfg, field) < (2 if field == "seq_len" else 1):
            raise ConfigError(f"--{field.replace('_', '-')}", getattr(cfg, field),
                              "a positive whole number" + (" of at least 2" if field == "seq_len" else ""))
    if cfg.workers is not None and cfg.workers < 1:
        raise ConfigError("--workers", cfg.workers, "a positive whole number")
    if not cfg.lr > 0:
        raise ConfigError("--lr", cfg.lr, "a positive learning rate")
    if "://" in cfg.out:  # Path() would make s3://B/P a local folder `s3:/B/P`
        raise ConfigError("--out", cfg.out, "a folder (the checkpoints are written by transformers' save_pretrained, "
                                            "which takes paths, not URIs); on a cluster, one every node mounts")


# Filesystems every node of a cluster can mount (fuse: s3fs, gcsfuse, ...): /proc/mounts' type names.
SHARED_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "ceph", "glusterfs", "beegfs", "9p", "fuse")


def filesystem_type(path: str | Path) -> str | None:
    """The type of the filesystem `path` (or the folder it would be made in) is on, as /proc/mounts
    names it; None where there is no /proc/mounts (not Linux)."""
    path = Path(path).expanduser().resolve()
    while not path.exists():
        path = path.parent
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    mounted = {point.replace("\\040", " "): kind for point, kind in mounts}
    return next((mounted[str(p)] for p in (path, *path.parents) if str(p) in mounted), None)


def check_out_shared(out: str, other_nodes: bool, filesystem: str | None) -> None:
    """With nodes beside this one (alive, or an autoscaler's to add), rank 0 may run on any of them and
    writes OUT/step-N there, while this driver writes the manifest here: OUT must be storage every node
    mounts, not a disk of this machine's own. An unknown filesystem (None) is trusted."""
    if other_nodes and filesystem is not None and filesystem.split(".")[0] not in SHARED_FILESYSTEMS:
        raise ConfigError("--out", out, f"a folder every node of this Ray cluster mounts (NFS, EFS, Lustre, a FUSE "
                                        f"bucket mount...): it is on a {filesystem} filesystem of this machine only, "
                                        f"and other nodes would write their checkpoints to their own disks")


def model_source(name: str) -> str:
    """The loadable source of an encoder-decoder checkpoint; a decoder-only model is refused."""
    from softprompt.models.hub import resolve_model

    source, config, _ = resolve_model(name)
    if not config.is_encoder_decoder:
        raise ConfigError("model", name, f"an encoder-decoder (T5) checkpoint: {name} is a decoder-only "
                                         f"({config.model_type}) model, a language model already")
    return source


# ---- the corpus: read and tokenised once, in the driver ----

def read_corpus(source: str, text_column: str = "text", config: str | None = None) -> list[str]:
    """The corpus's texts: `text_column` (a .txt file's lines: `text`) of the train split, else the first, of
    what `source` names, read as a task mapping's dataset is (models.tasks.read_dataset)."""
    from softprompt.models.tasks import FILE_SUFFIXES, TaskError, Where, read_dataset

    try:
        data = read_dataset({"dataset": os.path.expanduser(source), "config": config}, Where(source, mapping=False))
    except TaskError as error:
        raise ConfigError("--corpus", source, f"a readable corpus: a save_to_disk folder, text files "
                                              f"({', '.join(FILE_SUFFIXES)}) or a hub data set ({error})") from None
    return _column(data["train"] if "train" in data else next(iter(data.values())), text_column, source)


def _column(data, text_column: str, source: str) -> list[str]:
    if text_column not in data.column_names:
        raise ConfigError("--text-column", text_column, f"a column of {source}: {', '.join(data.column_names)}")
    return [t for t in data[text_column] if isinstance(t, str) and t.strip()]


def tokenize_corpus(texts: list[str], tokenizer, seq_len: int, source: str) -> np.ndarray:
    """One token stream, each text ended by EOS; too short for one sequence is an error."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    stream = np.fromiter((t for row in ids for t in (*row, tokenizer.eos_token_id)), dtype=np.int32)
    if len(stream) <= seq_len:
        raise ConfigError("--corpus", source, f"a corpus of more than --seq-len {seq_len} tokens: it has "
                                              f"{len(stream)} ({len(texts)} non-empty texts)")
    return stream


def prefix_lm_batch(stream: np.ndarray, cfg: AdaptConfig, step: int, rank: int, eos: int, pad: int) -> dict:
    """Worker `rank`'s batch at `step`: `batch_size` windows of `seq_len` tokens, each split at a
    random point into input (prefix) and target (continuation), each ended by EOS."""
    from softprompt.models.data import IGNORE, pad_rows

    rng = np.random.default_rng([cfg.seed, step, rank])
    starts = rng.integers(0, len(stream) - cfg.seq_len + 1, cfg.batch_size)
    splits = rng.integers(1, cfg.seq_len, cfg.batch_size)
    inputs = [[*stream[s:s + k], eos] for s, k in zip(starts, splits)]
    targets = [[*stream[s + k:s + cfg.seq_len], eos] for s, k in zip(starts, splits)]
    return {"input_ids": pad_rows(inputs, pad, left=False),
            "attention_mask": pad_rows([[1] * len(r) for r in inputs], 0, left=False),
            "labels": pad_rows(targets, IGNORE, left=False)}


# ---- what runs on each worker ----

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
    stream = ray.get(config["stream"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config["threads"])
    model = AutoModelForSeq2SeqLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = load_tokenizer(source)  # one without a pad token pads with EOS, as in training
    start, optimizer_state = 0, None
    if checkpoint := ray.train.get_checkpoint():
        with checkpoint.as_directory() as folder:
            load_model(model, os.path.join(folder, MODEL_FILE))
            optimizer_state = torch.load(os.path.join(folder, OPTIMIZER_FILE), weights_only=True)
            start = json.loads(Path(folder, STEP_FILE).read_text())["step"]
    model = ray.train.torch.prepare_model(model)  # on the worker's device, wrapped for DDP
    device = ray.train.torch.get_device()
    optimizer = Adafactor(model.parameters(), lr=cfg.lr)  # after the move: its state lives where its parameters do
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    model.train()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    tracker = _RunLogger(cfg.tracking_uri, config.get("run_id")) if rank == 0 else None
    last, window_tokens, window_start, losses = cfg.steps[-1], 0, time.perf_counter(), []
    for step in range(start + 1, last + 1):
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, step, rank]).generate_state(1)[0]))  # dropout
        batch = {k: v.to(device) for k, v in prefix_lm_batch(stream, cfg, step, rank, eos, pad).items()}
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
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0 and save:
                unwrapped = model.module if hasattr(model, "module") else model
                save_model(unwrapped, os.path.join(folder, MODEL_FILE))
                torch.save(optimizer.state_dict(), os.path.join(folder, OPTIMIZER_FILE))
                Path(folder, STEP_FILE).write_text(json.dumps({"step": step}))
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


def _save_loadable(model, tokenizer, target: Path) -> None:
    """A checkpoint transformers (and `load_backbone`) loads: safetensors, config, tokenizer, written whole
    (one there already was written by a run killed before its state was saved: the same weights)."""
    with atomic_folder(target) as partial:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)


class _RunLogger:
    """Rank 0's MLflow logging: the job's run, its loss and tokens/s; an unreachable server costs a
    warning, never the job."""

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


# ---- the driver ----

def _cluster_workers(cfg: AdaptConfig, started_here: bool) -> tuple[int, bool, int]:
    """(workers, on GPUs, threads per CPU worker): GPU workers where the cluster has GPUs or its
    autoscaler can add GPU nodes (then the job waits for them), else CPU workers."""
    import ray

    from softprompt.search.resources import addable_node_types

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if gpus or any(node.get("GPU", 0) for node in addable_node_types(started_here)):
        if not gpus:
            print("lm-adapt: no GPU node yet: the job waits for the autoscaler to add one", flush=True)
        elif cfg.workers and cfg.workers > gpus and not any(n.get("GPU", 0) for n in addable_node_types(started_here)):
            raise ConfigError("--workers", cfg.workers,
                              f"at most {gpus}, the GPUs of this Ray cluster (a worker each), which cannot add nodes")
        return cfg.workers or max(gpus, 1), True, 1
    nodes = max(1, sum(1 for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")))
    workers = cfg.workers or nodes
    threads = max(1, cpus // workers)
    if workers * threads > cpus:
        raise ConfigError("--workers", workers, f"at most {cpus}, the CPUs of this Ray cluster (no GPU here)")
    return workers, False, threads


def check_resumed_job(cfg: AdaptConfig, state: Path, record_new: bool = True) -> None:
    """A job resumed in OUT must train as the one that started there did (more steps may be asked
    for); the first run records how (`record_new`). A --workers left to the cluster (None: not known
    before Ray starts) is compared once it is known."""
    job = {"model": cfg.model, **{k: getattr(cfg, k) for k in JOB_FIELDS}}
    record = state / JOB_FILE
    if not record.is_file():
        if record_new:
            state.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(job, indent=2))
        return
    started = json.loads(record.read_text())
    for key, value in job.items():
        if key == "workers" and value is None:
            continue
        if started.get(key) != value:
            flag = "model" if key == "model" else f"--{key.replace('_', '-')}"
            raise ConfigError(flag, value, f"{started.get(key)!r}, as the job in {Path(cfg.out)} started (it resumes "
                                           f"there); another --out starts a new one")


def _start_run(cfg: AdaptConfig, state: Path) -> str | None:
    """The job's MLflow run: the one a resumed job started, or a new one with the job's parameters;
    None, with one line, where the server cannot be reached (the job goes on untracked)."""
    record = state / RUN_FILE
    if not cfg.tracking_uri or record.is_file():
        return json.loads(record.read_text())["run_id"] if cfg.tracking_uri else None
    from mlflow.tracking import MlflowClient

    from softprompt.search.tracking import softprompt_experiment

    try:
        client = MlflowClient(cfg.tracking_uri)
        run = client.create_run(softprompt_experiment(client, cfg.tracking_uri),
                                run_name=f"lm-adapt {Path(cfg.out).name}", tags={"softprompt.kind": "lm-adapt"})
        for key, value in dataclasses.asdict(cfg).items():
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            client.log_param(run.info.run_id, key, shown)
    except Exception as error:  # tracking is never worth the job
        print(f"lm-adapt: MLflow at {cfg.tracking_uri} unreachable ({type(error).__name__}); the job runs untracked",
              flush=True)
        return None
    record.write_text(json.dumps({"run_id": run.info.run_id}))
    return run.info.run_id


def run_adaptation(cfg: AdaptConfig, worker=train_worker) -> Path:
    """Run (or resume) the job to its last step; returns the manifest. Everything a user can get
    wrong is refused before the job starts or OUT is made."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from transformers import AutoTokenizer

    from softprompt.search.resources import addable_node_types

    check_config(cfg)
    resolved = Path(cfg.out).resolve()  # a resume with other settings is refused before Ray starts, in seconds
    check_resumed_job(dataclasses.replace(cfg, out=str(resolved)), resolved / STATE_DIR, record_new=False)
    source = model_source(cfg.model)
    texts = read_corpus(cfg.corpus, cfg.text_column, cfg.corpus_config)
    stream = tokenize_corpus(texts, AutoTokenizer.from_pretrained(source), cfg.seq_len, cfg.corpus)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # it prints each progress line twice
    started_here = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():  # with its dashboard: Ray Train watches its controller through the state API
        ray.init(include_dashboard=True, configure_logging=False, logging_level="WARNING")
    workers, use_gpu, threads = _cluster_workers(cfg, started_here)
    alive = sum(1 for node in ray.nodes() if node["Alive"])
    check_out_shared(cfg.out, alive > 1 or bool(addable_node_types(started_here)), filesystem_type(cfg.out))
    out = Path(cfg.out).resolve()
    cfg = dataclasses.replace(cfg, out=str(out), workers=workers)
    check_resumed_job(cfg, out / STATE_DIR)
    run_id = _start_run(cfg, out / STATE_DIR)
    resume_from_newest_complete_checkpoint(out / STATE_DIR / RUN_NAME)
    print(f"lm-adapt {cfg.model}: {len(stream):,} corpus tokens, {workers} {'GPU' if use_gpu else 'CPU'} worker(s), "
          f"checkpoints at steps {', '.join(map(str, cfg.steps))} into {out}", flush=True)
    trainer = TorchTrainer(
        worker,
        train_loop_config={"cfg": dataclasses.asdict(cfg), "source": source, "stream": ray.put(stream),
                           "threads": threads, "run_id": run_id},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": threads}),
        run_config=RunConfig(name=RUN_NAME, storage_path=str(out / STATE_DIR),
                             failure_config=FailureConfig(max_failures=2),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             # INFO is a line per report and checkpoint; without the dashboard's state API a
                             # warning every few seconds. A worker's failure still ends fit() with its error.
                             logging_config=LoggingConfig(log_level="ERROR")))
    trainer.fit()
    manifest = write_manifest(out, {"base_model": cfg.model, **{k: getattr(cfg, k) for k in JOB_FIELDS}}, cfg.steps)
    if run_id:
        _RunLogger(cfg.tracking_uri, run_id).finish(manifest)
    return manifest
