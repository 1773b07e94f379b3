"""Frozen backbones: load a causal LM or an encoder-decoder (T5), freeze it, fingerprint it, and keep
it loaded for every later trial a worker process runs."""
from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import dataclass

import torch
from transformers.utils import logging as hf_logging

from softprompt.models.hub import load_tokenizer, resolve_model
from softprompt.models.precision import (
    attention_for,
    avoid_cudnn_attention,
    contiguous_head,
    default_device,
    float_head,
    resolve_dtype,
)

SENTENCEPIECE_MODEL_TYPES = {"t5", "mt5", "umt5"}


@dataclass
class Backbone:
    name: str
    model: torch.nn.Module
    tokenizer: object
    fingerprint: str
    load_seconds: float
    compiled: object = None  # torch.compile(model), once `compile()` was called

    def __call__(self, **inputs):
        """A scoring or training pass through the model: compiled, once `compile()` was called."""
        return (self.model if self.compiled is None else self.compiled)(**inputs)

    def compile(self) -> None:
        """Compile the model's passes with inductor (`compile: true`), once per process: every later
        trial a worker runs reuses it (cached_backbone). Shapes are dynamic, so length buckets, batch
        sizes and prompt lengths reuse one graph per kind of pass (training, scoring)."""
        if self.compiled is None:
            self.compiled = torch.compile(self.model, dynamic=True)

    def prompted_model(self, prompt):
        """The prompt on this backbone, computed in this process (a shared backbone's computes on its server)."""
        from softprompt.models.prompt import PromptedModel  # it builds on this module

        return PromptedModel(self, prompt)

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(self.model.config.is_encoder_decoder)

    @property
    def width(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @torch.no_grad()
    def embed(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), width] float32 on the CPU, as the model receives them: through the embedding
        module, not its .weight (Gemma's scales its output by sqrt(width))."""
        module = self.model.get_input_embeddings()
        return module(torch.as_tensor(ids, dtype=torch.long, device=self.device)).float().cpu()

    @property
    def vocab_is_frequency_ordered(self) -> bool:
        """SentencePiece vocabularies (T5) list pieces roughly by frequency; BPE ones do not."""
        return self.model.config.model_type in SENTENCEPIECE_MODEL_TYPES


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (each first pass of a kind, each recompile)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def load_backbone(name: str, dtype: str = "auto", device: torch.device | None = None) -> Backbone:
    """Load `name` (offline alias, hub id or local folder) with every weight frozen."""
    started = time.perf_counter()
    device = device or default_device()
    avoid_cudnn_attention(device)
    hf_logging.disable_progress_bar()  # a per-load weights bar is noise; the GGUF conversion says so itself
    source, _, auto = resolve_model(name)
    torch_dtype = resolve_dtype(dtype, device)
    attention = attention_for(torch_dtype, device)
    model = auto.from_pretrained(source, dtype=torch_dtype, **({"attn_implementation": attention} if attention else {}))
    model = model.to(device)
    freeze(model)
    identity = fingerprint(model)  # before the head is wrapped: the same for every dtype
    if torch_dtype == torch.float32 or not float_head(model):
        contiguous_head(model)
    return Backbone(name, model, load_tokenizer(source), identity, time.perf_counter() - started)


def freeze(model: torch.nn.Module) -> None:
    """No weight gets gradients, and eval mode turns dropout off for training too."""
    model.requires_grad_(False)
    model.eval()


def fingerprint(model: torch.nn.Module) -> str:
    """Identify a backbone: architecture, every weight's name and shape, and the input
    embeddings' values (two checkpoints of one architecture differ there). The embeddings are
    hashed in bfloat16 so a float32 and a bfloat16 load of the same checkpoint agree."""
    digest = hashlib.sha256()
    digest.update(model.config.model_type.encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
    embeddings = model.get_input_embeddings().weight.detach().to("cpu", torch.bfloat16)
    digest.update(embeddings.contiguous().view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=2)  # a worker alternating checkpoints keeps at most two
def _worker_backbone(name: str, dtype: str, device: str) -> Backbone:
    return load_backbone(name, dtype, torch.device(device))


def cached_backbone(name: str, dtype: str = "auto", device: torch.device | None = None) -> tuple[Backbone, bool]:
    """(backbone, was_cached): loaded once per process and reused by every later trial it runs."""
    loads = _worker_backbone.cache_info().misses
    backbone = _worker_backbone(name, dtype, str(device or default_device()))
    return backbone, _worker_backbone.cache_info().misses == loads
