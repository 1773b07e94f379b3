"""Before Ray Train reads a killed LM-adaptation job's state: the job resumes from the newest complete
checkpoint on storage. A kill can land while a checkpoint uploads (its folder half written), after the
upload but before Ray Train's controller registers it in the run's snapshot (the snapshot names the one
before), while the controller rewrites that snapshot (cut short: Ray Train then refuses the run), or
before it prunes the checkpoint before (num_to_keep=1: a folder no one deletes any more)."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

MODEL_FILE, OPTIMIZER_FILE, STEP_FILE = "model.safetensors", "optimizer.pt", "step.json"  # one checkpoint
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints: what a resume reads


def resume_from_newest_complete_checkpoint(run: Path) -> None:
    """Make Ray Train's snapshot in `run` name the newest checkpoint whose parts all load, or remove it
    where none does (the job starts over); remove every other checkpoint folder. A line says what changed."""
    names = sorted((p.name for p in run.glob("checkpoint_*") if p.is_dir()), reverse=True)
    newest = next((name for name in names if checkpoint_step(run / name) is not None), None)
    named = named_checkpoint(run / SNAPSHOT)
    if newest is not None and newest != named:
        write_snapshot(run, newest, checkpoint_step(run / newest))
        print(f"lm-adapt: resuming from {newest} (step {checkpoint_step(run / newest)}), the newest complete state "
              f"on storage; Ray Train's snapshot named {named or 'none readable'}", file=sys.stderr, flush=True)
    elif newest is None and (run / SNAPSHOT).exists():
        (run / SNAPSHOT).unlink()
        print("lm-adapt: no complete checkpoint on storage; the job starts over", file=sys.stderr, flush=True)
    for name in names:  # after the snapshot: a kill here leaves it naming a folder that is still whole
        if name != newest:
            shutil.rmtree(run / name)


def checkpoint_step(folder: Path) -> int | None:
    """The step a checkpoint folder holds, where its model, optimizer and step all load; else None."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        load_file(folder / MODEL_FILE)
        torch.load(folder / OPTIMIZER_FILE, weights_only=True)
        return int(json.loads((folder / STEP_FILE).read_text())["step"])
    except (OSError, SafetensorError, RuntimeError, ValueError, KeyError, TypeError):  # missing, or cut short
        return None


def named_checkpoint(snapshot: Path) -> str | None:
    """The checkpoint Ray Train's snapshot names for a resume; None where there is none or it is unreadable."""
    try:
        return json.loads(snapshot.read_text())["latest_checkpoint_result"]["checkpoint_dir_name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_snapshot(run: Path, name: str, step: int) -> None:
    """Ray Train's snapshot naming one checkpoint, in Ray's own schema (it checks its fields and
    version), written aside and renamed."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
        _TrainingResultState,
    )

    result = _TrainingResultState(checkpoint_dir_name=name, metrics={"step": step})
    state = _CheckpointManagerState(
        checkpoint_results=[result], checkpoint_report_indices=[0], latest_checkpoint_result=result,
        pending_training_results=[], pending_validation_specs=[], current_report_index=1,
        validated_checkpoint_dir_names=[], timed_out_validation_checkpoint_dir_names=[],
        failed_validation_checkpoint_dir_names=[])
    partial = run / f"{SNAPSHOT}.partial"
    partial.write_text(state.json())
    os.replace(partial, run / SNAPSHOT)
