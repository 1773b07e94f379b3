"""Prompt checkpoints: `prompt.safetensors` (the prompt and optimizer state tensors) plus
`prompt.json` (what the prompt belongs to, the prompt tensor's SHA-256 as its identity). No pickle
anywhere: a checkpoint someone sends you is data, never code. Loading checks the tensor file's
SHA-256, the backbone fingerprint and width."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trainables.errors import UserError

FORMAT = "softprompt-prompt/1"
TENSORS, META = "prompt.safetensors", "prompt.json"


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
    """Write into a sibling folder, then swap it in: a crash mid-write leaves the previous
    checkpoint in place."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
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
    partial = directory.with_name(f".{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        save_file(tensors, str(partial / TENSORS))
        # The whole file's hash covers the optimizer state too: a resumed trial must not train on edited state.
        record["file_sha256"] = hashlib.sha256((partial / TENSORS).read_bytes()).hexdigest()
        (partial / META).write_text(json.dumps(record, indent=2, default=str))
        for path in (partial / TENSORS, partial / META, partial):  # on disk before the swap, not just in cache
            _fsync(path)
    except (OSError, SafetensorError) as error:  # e.g. a full disk: the previous checkpoint stays, no half copy
        shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointError(f"{directory}: could not be written ({' '.join(str(error).split())}); "
                              f"the previous checkpoint there, if any, is unchanged") from error
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    if directory.exists():
        os.replace(directory, old)
    os.replace(partial, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def _fsync(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


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
        raise CheckpointError(f"{tensor_path}: does not match the SHA-256 in {META}; "
                              "the file was damaged or edited")
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{tensor_path}: unreadable safetensors file ({error})") from None
    prompt = tensors.get("prompt")
    if prompt is None or tensor_sha256(prompt) != meta.get("prompt_sha256"):
        raise CheckpointError(f"{tensor_path}: the prompt tensor does not match the prompt_sha256 in {META}")
    if width is not None and prompt.shape[1] != width:
        raise CheckpointError(f"{directory}: prompt width {prompt.shape[1]} does not match the backbone's "
                              f"embedding width {width}")
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise CheckpointError(f"{directory}: prompt was trained on backbone {meta.get('backbone')!r} "
                              f"(fingerprint {meta.get('fingerprint')}), not on this one ({fingerprint})")
    return Checkpoint(prompt, meta, _optimizer_state(meta, tensors))


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
