"""The Ray Tune function trainable: one search trial = one prompt-tuning run on a worker. The frozen
backbone and the tokenised task are kept per worker process for its later trials. Reports at each eval
step with a checkpoint it resumes from bit-for-bit (prompt, optimizer state, data order).
"""
from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from ray import tune

from softprompt.backbone_server.client import connect
from softprompt.models.backbone import cached_backbone
from softprompt.models.checkpoint import CheckpointError, load_checkpoint
from softprompt.models.data import EncodedTask
from softprompt.models.precision import cap_gpu_memory, default_device, dtype_name
from softprompt.trainables.config import ASHA_METRICS, TrainConfig, trial_config
from softprompt.trainables.loop import DataSpec, Diverged, prepare_data, train
from softprompt.trainables.tracking import TrackingTarget, TrialTracker

_WORKER_DATA: dict[tuple[DataSpec, str], EncodedTask] = {}


def _cached_data(cfg: TrainConfig, backbone) -> EncodedTask:
    key = (DataSpec.of(cfg), backbone.fingerprint)
    if key not in _WORKER_DATA:
        _WORKER_DATA.clear()  # one task per search: keep only the latest
        _WORKER_DATA[key] = prepare_data(cfg, backbone)
    return _WORKER_DATA[key]


def dtype_change(meta: dict, backbone) -> str | None:
    """`bfloat16 -> float32` where a checkpoint was trained in another dtype than `backbone` computes
    in (`dtype: auto` resolves per node: a trial retried on a CPU node after a GPU one); None where it
    is the same, or the checkpoint predates recording it."""
    now = dtype_name(backbone.dtype)
    return f"{meta['dtype']} -> {now}" if meta.get("dtype", now) != now else None


def worst_value(mode: str) -> float:
    """Finite on purpose: Optuna refuses NaN/inf and would leave the trial RUNNING forever."""
    return 0.0 if mode == "max" else 1e9


def worst_metrics(metric: str, mode: str) -> dict:
    """Every metric ASHA or Optuna may read, each at its worst: a failed trial's last report. The
    trial is not told ASHA's metric, and Ray ends the whole search on a result that lacks it."""
    return {**{name: worst_value(better) for name, better in ASHA_METRICS.items()}, metric: worst_value(mode)}


def tune_trial(config: dict, base: dict, metric: str, mode: str, gpu_fraction: float = 0.0,
               tracking: TrackingTarget | None = None, shared: str | None = None,
               score_after_report: bool = False) -> None:
    """`config` holds this trial's sampled parameters, `base` the search's fixed TrainConfig fields;
    `tracking`, if given, is where the trial's MLflow child run goes; `shared`, if given, names the
    search's backbone servers (backbone_server/server.py), which then hold the model and do the passes;
    `score_after_report`: the scheduler reads no dev score (trainables.loop.train)."""
    cfg = trial_config(config, base)
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)  # a line per checkpoint is noise
    started = time.perf_counter()
    if shared:
        backbone, reused = connect(shared, cfg.model, cfg.dtype)
        device = backbone.device
    else:
        device = default_device()
        cap_gpu_memory(gpu_fraction, device)
        backbone, reused = cached_backbone(cfg.model, cfg.dtype, device)
    data = _cached_data(cfg, backbone)
    setup = {"backbone_reused": reused, "backbone_load_s": backbone.load_seconds,
             "setup_s": time.perf_counter() - started}
    tracker = TrialTracker(tracking, tune.get_context().get_trial_id(), config) if tracking else None

    def report(metrics: dict, save) -> None:
        with tempfile.TemporaryDirectory() as folder:
            save(Path(folder))
            status = "completed" if metrics["step"] == cfg.max_steps else "running"
            if tracker:
                unscored = metrics["best_step"] == 0  # its best_dev_* are Tune's placeholders, not scores
                tracker.log({k: v for k, v in {**metrics, **setup}.items()
                             if not (unscored and k.startswith("best_dev_"))}, Path(folder) / "best")
                if status == "completed":
                    tracker.finish(status)
            tune.report({**metrics, **setup, "status": status}, checkpoint=tune.Checkpoint.from_directory(folder))

    checkpoint = tune.get_checkpoint()
    try:
        if checkpoint is None:
            train(cfg, backbone, data, report=report, score_test=False, score_after_report=score_after_report)
        else:
            with checkpoint.as_directory() as folder:
                # a restarted trial (Ray retrying a failure, or a resumed search) says where it picked up
                try:
                    load_checkpoint(Path(folder) / "best")
                    current = load_checkpoint(Path(folder) / "current").meta
                    setup["resumed_from_step"] = current["step"]
                    if changed := dtype_change(current, backbone):
                        setup["resumed_dtype_changed"] = changed
                        print(f"softprompt: trial resumed from step {current['step']} with its dtype changed "
                              f"({changed}): the rest of it trains in another precision", file=sys.stderr, flush=True)
                except CheckpointError as error:
                    # A resumed search's driver points each trial at a complete checkpoint (search/resume.py);
                    # one damaged since, or met by Ray's retry mid-search, makes the trial start over, not fail.
                    setup.update(resumed_from_step=0, resume_error=str(error))
                    folder = None
                if folder and current["step"] >= cfg.max_steps:
                    # its final checkpoint: the driver may have been killed before it saved Tune's state with
                    # the final report, and a trial that ends without reporting leaves Tune the one before
                    # (it read "stopped early"). The saved final report is reported again; nothing is trained.
                    tune.report({**current["metrics"], **setup, "status": "completed"},
                                checkpoint=tune.Checkpoint.from_directory(folder))
                else:
                    train(cfg, backbone, data, report=report, resume_from=Path(folder) if folder else None,
                          score_test=False, score_after_report=score_after_report)
    except (Diverged, torch.OutOfMemoryError) as error:
        status = "diverged" if isinstance(error, Diverged) else "out_of_memory"
        if device.type == "cuda":  # this worker's next trial should not start with the failed one's cache
            torch.cuda.empty_cache()
        final = {**worst_metrics(metric, mode), "step": cfg.max_steps, "status": status, "error": str(error), **setup}
        if tracker:
            tracker.log(final)
            tracker.finish(status)
        tune.report(final)
    except Exception:
        if tracker:  # the driver corrects this if Ray stopped the trial on purpose
            tracker.finish("errored")
        raise
    finally:
        if shared:  # its server stops waiting for it
            backbone.leave()
