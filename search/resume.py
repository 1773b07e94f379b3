"""Before Tune reads a killed search's saved state: each unfinished trial resumes from the newest
complete checkpoint it has on storage, or starts over. A kill can leave the state naming a checkpoint
that is gone or half written, and Tune's own restore then fails (docs/reliability.md, fault 16)."""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path, PurePosixPath

import pyarrow.fs
from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint
from ray.tune.trainable.metadata import _TrainingRunMetadata

from softprompt.models.checkpoint import CheckpointError, load_checkpoint
from softprompt.search.storage import SearchStorage

CHECKPOINT_PARTS = ("current", "best")  # what trainables/trainable.py writes into every checkpoint


def point_trials_at_complete_checkpoints(search: SearchStorage) -> None:
    """Make every checkpoint that Tune's newest experiment state names for a trial it will resume the
    newest complete one the trial has, or clear the name where none is left (the trial starts over);
    a line says which."""
    filesystem, folder = experiment_folder(search)
    state_path = _find_newest_experiment_checkpoint(folder, fs=filesystem)
    if state_path is None:  # no state saved yet: Tuner.restore says so
        return
    with filesystem.open_input_stream(state_path) as stream:
        state = json.loads(stream.readall())
    cleared = False
    for entry in state["trial_data"]:
        trial, metadata = json.loads(entry[0]), _TrainingRunMetadata.from_json_state(entry[1])
        named = metadata.checkpoint_manager.latest_checkpoint_result
        if trial["status"] == "TERMINATED" or named is None:
            continue
        named_path = PurePosixPath(named.checkpoint.path)  # where the search was: it may have moved
        trial_folder, name = f"{folder}/{named_path.parent.name}", named_path.name
        newest = newest_complete_checkpoint(filesystem, trial_folder)
        if newest == name:
            continue
        if newest is None:
            manager = metadata.checkpoint_manager
            metadata.checkpoint_manager = type(manager)(manager.checkpoint_config)
            entry[1], cleared = metadata.get_json_state(), True
            print(f"softprompt: trial {trial['trial_id']} has no complete checkpoint left on storage; it starts over",
                  file=sys.stderr)
            continue
        # Copied to where the state looks rather than named in it: the trial's next checkpoint goes to the
        # number after the named one, and Tune prunes the one it resumed from once that is registered.
        if filesystem.get_file_info(f"{trial_folder}/{name}").type != pyarrow.fs.FileType.NotFound:
            filesystem.delete_dir(f"{trial_folder}/{name}")
        pyarrow.fs.copy_files(f"{trial_folder}/{newest}", f"{trial_folder}/{name}", source_filesystem=filesystem,
                              destination_filesystem=filesystem)
        print(f"softprompt: trial {trial['trial_id']}: {name} on storage is incomplete; it resumes from {newest}",
              file=sys.stderr)
    if cleared:  # one write in place: Tune reads the newest state file by its name
        with filesystem.open_output_stream(state_path) as stream:
            stream.write(json.dumps(state).encode())


def experiment_folder(search: SearchStorage) -> tuple[pyarrow.fs.FileSystem, str]:
    """(filesystem, path on it) of the folder where Tune keeps the search's state."""
    return search.tune_storage()[1] or pyarrow.fs.LocalFileSystem(), search.tune_path()


def newest_complete_checkpoint(filesystem: pyarrow.fs.FileSystem, trial_folder: str) -> str | None:
    """The name of the newest checkpoint_* folder in `trial_folder` whose parts all load, or None."""
    names = sorted((PurePosixPath(info.path).name for info in filesystem.get_file_info(
        pyarrow.fs.FileSelector(trial_folder, allow_not_found=True))
        if info.type == pyarrow.fs.FileType.Directory and PurePosixPath(info.path).name.startswith("checkpoint_")),
        reverse=True)
    return next((name for name in names if is_complete(filesystem, f"{trial_folder}/{name}")), None)


def is_complete(filesystem: pyarrow.fs.FileSystem, path: str) -> bool:
    with tempfile.TemporaryDirectory() as local:
        try:
            pyarrow.fs.copy_files(path, local, source_filesystem=filesystem)
            for part in CHECKPOINT_PARTS:
                load_checkpoint(Path(local) / part)
        except (CheckpointError, OSError):
            return False
    return True
