"""Shared fixtures: the SmolLM2 tokenizer, tiny random Llama and T5 backbones built on it (saved to
disk and loaded through `load_backbone`, so the real loading code runs), and the real SmolLM2."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from trainables.backbone import _smollm2_folder, load_backbone

torch.set_num_threads(1)  # the tiny models' ops are too small to gain from threads; test_learning asks for 2


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    return AutoTokenizer.from_pretrained(_smollm2_folder())


def _save_tiny(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(smollm2_tokenizer, tmp_path_factory):
    """A randomly initialised 2-layer Llama on SmolLM2's vocabulary. The initializer range is wider
    than the default so that a wrong position id or a leaked pad token changes the scores visibly."""
    tok = smollm2_tokenizer
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True,
                         initializer_range=0.2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return _save_tiny(LlamaForCausalLM(config), tok, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_t5_dir(smollm2_tokenizer, tmp_path_factory):
    tok = smollm2_tokenizer
    config = T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2,
                      decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    return _save_tiny(T5ForConditionalGeneration(config), tok, tmp_path_factory.mktemp("tiny-t5"))


# float32, whatever `auto` picks on the machine: these check the scoring path's logic to 1e-5, which
# is only measurable in float32. bfloat16 has its own tests (tests/test_precision.py).
@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    return load_backbone(str(tiny_llama_dir), "float32", device=torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny_t5(tiny_t5_dir):
    return load_backbone(str(tiny_t5_dir), "float32", device=torch.device("cpu"))


@pytest.fixture(scope="session")
def smollm2():
    return load_backbone("smollm2-135m", "float32", device=torch.device("cpu"))


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray cluster for the whole session (starting one costs seconds and ~1 GiB). It declares
    one logical GPU, so fractional-GPU packing can be tested on a CPU machine; a trial's device
    is still chosen by torch.cuda.is_available(), not by Ray's GPU ids."""
    import os

    import ray

    from search.tuner import give_local_workers_env

    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    give_local_workers_env()  # as `softprompt search run` starts its local Ray
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, configure_logging=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def repository_stays_clean():
    """Tests write only under tmp folders: MLflow's habit of creating ./mlruns, or a CLI run's
    default sqlite store, must not leak into the checkout."""
    from pathlib import Path

    root = Path(__file__).parents[1]
    watched = ["mlruns", "mlartifacts", "mlflow.db", "runs"]
    before = {name for name in watched if (root / name).exists()}
    yield
    leaked = {name for name in watched if (root / name).exists()} - before
    assert not leaked, f"the test session created {sorted(leaked)} in {root}"
