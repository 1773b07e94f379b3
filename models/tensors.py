"""One tensor read from a model's checkpoint files without loading the model: the input embeddings
(prompt inits and nearest-token reports need them; a whole T5-XXL is ~44 GB in float32)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from softprompt.models.hub import BackboneError, load_tokenizer, resolve_model

# Where transformers' save_pretrained puts weights, newest layout first; an index maps tensor -> shard.
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors",
                "pytorch_model.bin.index.json", "pytorch_model.bin")


def _checkpoint_file(source: str, filename: str) -> Path | None:
    """A file of a local model folder or of a hub repository (downloaded alone, or from the cache)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    if Path(source).expanduser().is_dir():
        path = Path(source).expanduser() / filename
        return path if path.is_file() else None
    try:
        return Path(hf_hub_download(source, filename))
    except EntryNotFoundError:
        return None


def _embedding_key(names: list[str], keys) -> str | None:
    """The stored name of the input embeddings: one of the module's own names, or else the one key
    ending in its leaf name (a checkpoint saved under an older layout of the same class)."""
    exact = [n for n in names if n in keys]
    if exact:  # tied copies (T5's shared and encoder.embed_tokens) hold the same values
        return exact[0]
    leaf = ".".join(names[0].split(".")[-2:])
    ending = [k for k in keys if k == leaf or k.endswith(f".{leaf}")]
    return ending[0] if len(ending) == 1 else None


def input_embeddings(name: str) -> tuple[torch.Tensor, object]:
    """`name`'s input-embedding matrix [vocab, width], read alone from its checkpoint files, and its tokenizer.
    The model is built on the meta device, without weights, only to learn that tensor's name. It is the
    embedding module's weight, before any scale the module applies to its output (Gemma multiplies by sqrt(width))."""
    from safetensors import safe_open

    source, config, auto = resolve_model(name)
    with torch.device("meta"):
        model = auto.from_config(config)
    module = model.get_input_embeddings()
    names = [f"{n}.weight" for n, m in model.named_modules(remove_duplicate=False) if m is module]
    prefix = f"{model.base_model_prefix}."  # a checkpoint of the bare model lacks the head's prefix
    names += [n[len(prefix):] for n in names if n.startswith(prefix)]
    path = next(filter(None, (_checkpoint_file(source, f) for f in WEIGHT_FILES)), None)
    if path is not None and path.name.endswith(".index.json"):  # sharded: fetch and open only its shard
        weight_map = json.loads(path.read_text())["weight_map"]
        key = _embedding_key(names, weight_map)
        path = _checkpoint_file(source, weight_map[key]) if key else None
    embeddings = None
    if path is not None and path.suffix == ".safetensors":
        with safe_open(path, "pt") as weights:
            key = _embedding_key(names, weights.keys())
            embeddings = weights.get_tensor(key) if key else None
    elif path is not None:  # memory-mapped: only the pages of the one tensor read are loaded
        weights = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        key = _embedding_key(names, weights)
        embeddings = weights[key].clone() if key else None
    if embeddings is None:
        raise BackboneError(f"model {name!r}: no input-embedding tensor ({', '.join(names)}) found in its "
                            f"checkpoint files ({', '.join(WEIGHT_FILES)})")
    return embeddings, load_tokenizer(source)
