"""LM adaptation as a Ray Train job (paper section 3.2, Figure 3d): continue a span-corruption T5
with T5's prefix-LM objective (a text prefix as input, its continuation as target) and save a
loadable checkpoint at each requested step, for searches to explore how much adaptation a prompt
needs. This is the driver (cli/lm_adapt.py is its command); the settings and their checks are adaptation/config.py,
the corpus and batches adaptation/corpus.py, each worker's loop adaptation/worker.py.

The job is data parallel (TorchTrainer, DDP: one model copy per worker, a GPU each, or CPU workers
where there is none). Each worker streams the corpus itself, so the driver reads only its first rows,
to refuse a corpus the job could not train on. A killed job resumed from its last checkpoint trains
on exactly what it would have (adaptation/corpus.py says how), and ends with the same weights.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from softprompt.adaptation.config import (
    JOB_FIELDS,
    AdaptConfig,
    check_config,
    check_out_shared,
    check_resumed_job,
    filesystem_type,
    model_source,
)
from softprompt.adaptation.corpus import check_corpus, open_corpus
from softprompt.adaptation.resume import resume_from_newest_complete_checkpoint
from softprompt.adaptation.worker import RunLogger, train_worker
from softprompt.configfile import ConfigError
from softprompt.models.manifest import write_manifest
from softprompt.trainables.tracking import RUN_FILE

STATE_DIR, RUN_NAME = ".ray", "lm-adapt"   # Ray Train's run under OUT: the same name resumes it


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
    check_corpus(open_corpus(cfg.corpus, cfg.text_column, cfg.corpus_config), cfg.text_column,
                 AutoTokenizer.from_pretrained(source), cfg.seq_len, cfg.corpus)
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
    print(f"lm-adapt {cfg.model}: corpus {cfg.corpus} streamed to {workers} {'GPU' if use_gpu else 'CPU'} worker(s), "
          f"checkpoints at steps {', '.join(map(str, cfg.steps))} into {out}", flush=True)
    trainer = TorchTrainer(
        worker,
        train_loop_config={"cfg": dataclasses.asdict(cfg), "source": source, "threads": threads, "run_id": run_id},
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
        RunLogger(cfg.tracking_uri, run_id).finish(manifest)
    return manifest
