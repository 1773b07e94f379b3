"""Export winning prompts for production (docs/export-and-serving.md): a PEFT adapter folder, a bare `.npy`
array, or an MLflow pyfunc model under alias `production`, one bundle for several prompts or tasks. Every
artifact records the backbone fingerprint and the prompt's SHA-256, which `load_export` checks; no pickle.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from softprompt.errors import one_line
from softprompt.models.checkpoint import (
    BUNDLE_FILE,
    CheckpointError,
    load_bundle_prompts,
    load_bundle_record,
    load_checkpoint,
    save_bundle_record,
    save_checkpoint,
    verify_prompt,
)
from softprompt.models.hub import OFFLINE_MODELS
from softprompt.package import copy_package
from softprompt.search.config import ConfigError
from softprompt.search.record import SearchRecord
from softprompt.search.tracking import softprompt_experiment
from softprompt.serving.ensemble import COMBINE

ALIAS = "production"


# ---- where prompts come from ----

def search_prompts(record: SearchRecord, trial: str | None = None, top: int = 1) -> list[Path]:
    """A search's prompt folders on this machine (downloaded from a URI): its `top` best trials, or one named trial."""
    if trial is not None:
        rows = record.evaluated()
        found = [r for r in rows if r["trial_id"] == trial]
        if not found:
            raise ConfigError("--trial", trial, f"a trial of search {record.storage.name} with a prompt: "
                                                f"{', '.join(r['trial_id'] for r in rows)}")
    else:
        found = record.ranked()[:top]
    return [record.storage.local_copy(r["prompt"]) for r in found]


def run_prompt(run_id: str, tracking_uri: str, into: Path) -> Path:
    """A tracked trial's prompt (its child run's `prompt` artifact) or a search's winner."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    names = {a.path for a in client.list_artifacts(run_id)}
    path = "prompt" if "prompt" in names else "winning_prompt" if "winning_prompt" in names else None
    if path is None:
        raise ConfigError("--run", run_id, "an MLflow run with a `prompt` or `winning_prompt` artifact")
    return Path(client.download_artifacts(run_id, path, str(into)))


# ---- formats ----

def _model_reference(model: str) -> str:
    """What another process loads the backbone from: offline aliases become their cache folder."""
    return str(OFFLINE_MODELS[model]()) if model in OFFLINE_MODELS else model


def export_npy(prompt_dir: Path, out: Path) -> Path:
    """`out` (.npy): the bare float32 [p, e] array; `out` with .json: what it was trained on."""
    checkpoint = load_checkpoint(prompt_dir)
    out = out.with_suffix(".npy")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, checkpoint.prompt.numpy(), allow_pickle=False)
    out.with_suffix(".json").write_text(json.dumps(_provenance(checkpoint.meta), indent=2))
    return out


PROVENANCE = ("backbone", "fingerprint", "task", "template", "labels", "verbalizers", "sentinel", "length", "width",
              "step", "prompt_sha256")
PEFT_TENSORS, PEFT_PROVENANCE = "adapter_model.safetensors", "softprompt.json"


def _provenance(meta: dict) -> dict:
    return {k: meta.get(k) for k in PROVENANCE}


def export_peft_adapter(prompt_dir: Path, out: Path, is_encoder_decoder: bool | None = None) -> Path:
    """A folder `peft.PeftModel.from_pretrained(base, out)` loads: PROMPT_TUNING with one
    transformer submodule, so for T5 the prompt stays on the encoder as we trained it (PEFT 0.21's
    seq2seq prompt tuning prefixes only the encoder input anyway)."""
    checkpoint = load_checkpoint(prompt_dir)
    model = _model_reference(checkpoint.meta["backbone"])
    if is_encoder_decoder is None:
        from transformers import AutoConfig
        is_encoder_decoder = bool(AutoConfig.from_pretrained(model).is_encoder_decoder)
    length, width = checkpoint.prompt.shape
    config = {"peft_type": "PROMPT_TUNING", "task_type": "SEQ_2_SEQ_LM" if is_encoder_decoder else "CAUSAL_LM",
              "num_virtual_tokens": length, "token_dim": width, "num_transformer_submodules": 1,
              "prompt_tuning_init": "RANDOM", "inference_mode": True, "base_model_name_or_path": model}
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file({"prompt_embeddings": checkpoint.prompt.contiguous()}, str(out / PEFT_TENSORS))
    (out / PEFT_PROVENANCE).write_text(json.dumps(_provenance(checkpoint.meta), indent=2))
    return out


# ---- reading exports back ----

def _read_provenance(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (an exported prompt's SHA-256 and backbone fingerprint are kept there)")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(record, dict) or not record.get("prompt_sha256") or not record.get("fingerprint"):
        raise CheckpointError(f"{path}: no prompt_sha256 and fingerprint "
                              "(export the prompt again with this softprompt)")
    return record


def _read_exported_tensor(path: Path) -> torch.Tensor:
    try:
        if path.suffix == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False))
        return load_file(str(path))["prompt_embeddings"]
    except (ValueError, OSError, EOFError, KeyError, SafetensorError) as error:
        raise CheckpointError(f"{path}: unreadable or truncated ({one_line(error)})") from None


def load_export(path: str | Path, fingerprint: str | None = None, width: int | None = None) -> list[torch.Tensor]:
    """The prompts of an export (`.npy`, PEFT folder, MLflow bundle folder) or of a checkpoint folder,
    each checked against its recorded SHA-256 and, if given, the backbone's fingerprint and width."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir() and (path / BUNDLE_FILE).is_file():
        prompts = load_bundle_prompts(path, load_bundle_record(path), fingerprint, width)
        return [prompt for members in prompts.values() for prompt in members]
    if path.is_dir() and not (path / PEFT_TENSORS).exists():
        return [load_checkpoint(path, fingerprint, width).prompt]
    tensor_path, record_path = ((path / PEFT_TENSORS, path / PEFT_PROVENANCE) if path.is_dir()
                                else (path, path.with_suffix(".json")))
    if path.suffix not in ("", ".npy") or not tensor_path.is_file():
        raise CheckpointError(f"{path}: not a prompt export; allowed: a .npy file with its .json, a PEFT adapter "
                              f"folder, an MLflow bundle folder, or a checkpoint folder")
    record = _read_provenance(record_path)
    return [verify_prompt(record, tensor_path, fingerprint, width, _read_exported_tensor(tensor_path))]


def tasks_by_name(by_source: dict[str, list[Path]]) -> dict[str, list[Path]]:
    """Each source's prompts under their task's name (a bundle routes requests by it): two searches of
    one task are refused, as the bundle could serve only one of them."""
    tasks, sources = {}, {}
    for source, prompts in by_source.items():
        task = load_checkpoint(prompts[0]).meta["task"]
        if task in tasks:
            raise ConfigError("export source", list(by_source), f"searches of different tasks; {sources[task]} and "
                                                                f"{source} are both on task {task!r} (give one a task "
                                                                f"mapping with its own name:, or ensemble one search "
                                                                f"with --top K)")
        tasks[task], sources[task] = prompts, source
    return tasks


def write_bundle(tasks: dict[str, list[Path]], out: Path, how: str = "vote") -> Path:
    """A folder of prompts for one or more tasks on one backbone: `bundle.json` plus each member's checkpoint."""
    if how not in COMBINE:
        raise ConfigError("--combine", how, f"one of {', '.join(COMBINE)}")
    out.mkdir(parents=True, exist_ok=True)
    record = {"combine": how, "tasks": {}}
    for task, folders in tasks.items():
        members, sentinels = [], set()
        for i, folder in enumerate(folders):  # every member on the first one's backbone
            checkpoint = load_checkpoint(folder, record.get("fingerprint"))
            meta = checkpoint.meta
            record.setdefault("fingerprint", meta["fingerprint"])
            record.setdefault("backbone", _model_reference(meta["backbone"]))
            save_checkpoint(out / task / str(i), checkpoint.prompt, {k: v for k, v in meta.items() if k != "optimizer"})
            members.append(f"{task}/{i}")
            sentinels.add(meta.get("sentinel", False))
        if len(sentinels) > 1:  # the task's members share one set of targets
            raise ConfigError("--top", len(folders), f"prompts of task {task} that agree on sentinel (these were "
                                                     f"trained with and without it): export fewer, or --trial")
        # the template travels with the prompts: the served model formats raw columns as training did
        record["tasks"][task] = {"template": meta.get("template"), "labels": meta["labels"],
                                 "verbalizers": meta["verbalizers"], "members": members,
                                 "max_length": meta["config"]["max_length"], "sentinel": sentinels.pop()}
    return save_bundle_record(out, record)


def export_mlflow_model(bundle: Path, registered_name: str, tracking_uri: str) -> int:
    """Log the bundle as an MLflow pyfunc model (models from code: no pickle), register it as
    `registered_name` and point its `production` alias at the new version. Returns the version."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    record = load_bundle_record(bundle)
    labels = sorted({label for t in record["tasks"].values() for label in t["labels"]})
    signature = ModelSignature(
        inputs=Schema([*(ColSpec("string", c, required=required) for c, required in _input_columns(record).items()),
                       ColSpec("string", "task", required=False)]),
        outputs=Schema([ColSpec("string", "task"), ColSpec("string", "label"), ColSpec("long", "label_id"),
                        ColSpec("string", "verbalizer"),
                        *(ColSpec("double", f"score_{label}", required=False) for label in labels)]))

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    experiment_id = softprompt_experiment(mlflow.MlflowClient(tracking_uri), tracking_uri)
    # the model carries the code it runs: softprompt with the rooms a served model imports
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"export {registered_name}"), \
            tempfile.TemporaryDirectory() as staged:
        package = copy_package(staged, rooms=("models", "serving"))
        mlflow.set_tags({"softprompt.fingerprint": record["fingerprint"], "softprompt.backbone": record["backbone"]})
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(package / "serving" / "served_model.py"), artifacts={"bundle": str(bundle)},
            code_paths=[str(package)], signature=signature, pip_requirements=_requirements(),
            registered_model_name=registered_name)
    version = int(info.registered_model_version)
    registry = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    registry.set_registered_model_alias(registered_name, ALIAS, version)
    return version


def _input_columns(record: dict) -> dict[str, bool]:
    """The raw columns the served model reads, each required if every task's template names it
    (a bundle made before templates travelled: `text`, the formatted input)."""
    from softprompt.models.templates import template_columns
    from softprompt.serving.rows import UNFORMATTED

    per_task = [template_columns(t.get("template") or UNFORMATTED) for t in record["tasks"].values()]
    return {c: all(c in columns for columns in per_task) for columns in per_task for c in columns}


def _requirements() -> list[str]:
    from importlib.metadata import version
    return [f"{p}=={version(p)}" for p in ("mlflow", "torch", "transformers", "safetensors", "pandas", "datasets")]

