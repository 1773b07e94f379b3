"""Prompt files, written and read here only. A checkpoint: `prompt.safetensors` (the prompt and
optimizer state tensors) plus `prompt.json` (what the prompt belongs to, the prompt tensor's SHA-256
as its identity). A bundle: `bundle.json` plus a checkpoint per member. No pickle anywhere: a
checkpoint someone sends you is data, never code. `verify_prompt` checks every prompt read (here or
from an export) against its SHA-256 and the backbone's fingerprint and width."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from softprompt.errors import UserError, one_line
from softprompt.files import atomic_folder

FORMAT = "softprompt-prompt/1"
TENSORS, META = "prompt.safetensors", "prompt.json"
# An exported bundle: bundle.json plus one prompt checkpoint per member, under `members`' paths.
BUNDLE_FORMAT, BUNDLE_FILE = "softprompt-bundle/1", "bundle.json"


class CheckpointError(UserError):
    """A checkpoint that is missing, damaged, or belongs to another backbone."""


@dataclass
class Checkpoint:
    prompt: torch.Tensor                 # [length, width] float32
    meta: dict
    optimizer_state: dict | None         # torch optimizer state_dict, or None


def tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()


def save_checkpoint(directory: str | Path, prompt: torch.Tensor, meta: dict,
                    optimizer_state: dict | None = None) -> Path:
    """Written whole or not at all (atomic_folder): a crash mid-write leaves the previous checkpoint in place."""
    directory = Path(directory)
    prompt = prompt.detach().cpu().float().contiguous()
    tensors = {"prompt": prompt}
    record = {**meta, "format": FORMAT, "length": prompt.shape[0], "width": prompt.shape[1],
              "prompt_sha256": tensor_sha256(prompt)}
    if optimizer_state is not None:
        scalars = {}
        for param_id, values in optimizer_state["state"].items():
            for key, value in values.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.{param_id}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(param_id), {})[key] = value
        record["optimizer"] = {"param_groups": optimizer_state["param_groups"], "scalars": scalars}
    try:
        with atomic_folder(directory) as partial:
            save_file(tensors, str(partial / TENSORS))
            # The whole file's hash covers the optimizer state too: a resumed trial must not train on edited state.
            record["file_sha256"] = hashlib.sha256((partial / TENSORS).read_bytes()).hexdigest()
            (partial / META).write_text(json.dumps(record, indent=2, default=str))
    except (OSError, SafetensorError) as error:  # e.g. a full disk: the previous checkpoint stays, no half copy
        raise CheckpointError(f"{directory}: could not be written ({one_line(error)}); "
                              f"the previous checkpoint there, if any, is unchanged") from error
    return directory


def load_checkpoint(directory: str | Path, fingerprint: str | None = None, width: int | None = None) -> Checkpoint:
    """Read a checkpoint; refuse it if damaged or made for another backbone."""
    directory = Path(directory)
    meta_path, tensor_path = directory / META, directory / TENSORS
    for path in (meta_path, tensor_path):
        if not path.is_file():
            # a crash between save_checkpoint's two renames leaves the previous checkpoint beside it
            left = [] if directory.exists() else sorted(directory.parent.glob(f".{directory.name}.old-*"))
            hint = f"; an interrupted save left the previous checkpoint in {left[0]}" if left else ""
            raise CheckpointError(f"{path}: missing (a prompt checkpoint holds {META} and {TENSORS}){hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{meta_path}: not valid JSON ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{meta_path}: format {found!r}, expected {FORMAT!r}")
    if hashlib.sha256(tensor_path.read_bytes()).hexdigest() != meta.get("file_sha256"):
        raise CheckpointError(f"{tensor_path}: does not match the SHA-256 in {META}; the file was damaged or edited")
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{tensor_path}: unreadable safetensors file ({error})") from None
    prompt = verify_prompt(meta, tensor_path, fingerprint, width, tensors.get("prompt", torch.empty(0)))
    return Checkpoint(prompt, with_labels(meta), _optimizer_state(meta, tensors))


def with_labels(record: dict) -> dict:
    """A checkpoint's meta or a bundle's task, with the task's label values. Those made before the
    label values travelled with prompts have none: they served their verbalizers as labels, and still do."""
    if "verbalizers" in record and not record.get("labels"):
        record["labels"] = list(record["verbalizers"])
    return record


def verify_prompt(record: dict, path: Path, fingerprint: str | None = None, width: int | None = None,
                  prompt: torch.Tensor | None = None) -> torch.Tensor | None:
    """`prompt` (if given) as `record` describes it, for the backbone of `fingerprint` and `width` (if
    given); else a CheckpointError naming `path`. The one check of every prompt file read."""
    if prompt is not None:
        if prompt.ndim != 2 or tensor_sha256(prompt) != record.get("prompt_sha256"):
            raise CheckpointError(f"{path}: the prompt tensor does not match the prompt_sha256 in its JSON record; "
                                  "the file was damaged or edited")
        if width is not None and prompt.shape[1] != width:
            raise CheckpointError(f"{path}: prompt width {prompt.shape[1]} does not match the backbone's "
                                  f"embedding width {width}")
    if fingerprint is not None and record.get("fingerprint") != fingerprint:
        raise CheckpointError(f"{path}: prompt trained on backbone {record.get('backbone')!r} "
                              f"(fingerprint {record.get('fingerprint')}), not on this one ({fingerprint})")
    return prompt


def save_bundle_record(folder: Path, record: dict) -> Path:
    """`bundle.json` for the member checkpoints already saved in `folder`."""
    (folder / BUNDLE_FILE).write_text(json.dumps({"format": BUNDLE_FORMAT, **record}, indent=2))
    return folder


def load_bundle_record(folder: str | Path) -> dict:
    """A bundle's `bundle.json`, checked: its format, and a task table whose tasks name members."""
    path = Path(folder) / BUNDLE_FILE
    try:
        record = json.loads(path.read_text())
        if not all(isinstance(task["members"], list) for task in record["tasks"].values()):
            raise TypeError("a task's members are not a list")
        if not record.get("fingerprint"):
            raise KeyError("fingerprint")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{path}: not a valid bundle record ({error})") from None
    if record.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(f"{path}: format {record.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    for task in record["tasks"].values():
        with_labels(task)
    return record


def load_bundle_prompts(folder: str | Path, record: dict, fingerprint: str | None = None,
                        width: int | None = None) -> dict[str, list[torch.Tensor]]:
    """Each task's member prompts, the bundle refused as a whole if made for another backbone."""
    verify_prompt(record, Path(folder) / BUNDLE_FILE, fingerprint)
    return {name: [load_checkpoint(Path(folder) / m, record["fingerprint"], width).prompt for m in task["members"]]
            for name, task in record["tasks"].items()}


def _optimizer_state(meta: dict, tensors: dict) -> dict | None:
    saved = meta.get("optimizer")
    if saved is None:
        return None
    state: dict[int, dict] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, param_id, key = name.split(".", 2)
            state.setdefault(int(param_id), {})[key] = tensor
    for param_id, values in saved["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": saved["param_groups"]}
