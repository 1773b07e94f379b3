"""What a `softprompt lm-adapt` job may be given: its settings (AdaptConfig) and every check made at the
edge, before Ray starts, so that a user's mistake is one line and nothing is written. Imports neither
torch nor Ray: the CLI builds its flags from AdaptConfig."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from softprompt.configfile import ConfigError

JOB_FILE = "job.json"  # what the job trains on and how, kept in its state folder: a resume must match
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


def parse_steps(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ConfigError("--steps", text, "whole step counts separated by commas (e.g. 10000,50000,100000)") from None
