"""Prompt checkpoints: bitwise round trips, refusal of foreign or damaged ones, no pickle, and a
resumed run that ends bit-for-bit where an uninterrupted one does."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from softprompt.models.checkpoint import META, TENSORS, CheckpointError, load_checkpoint, save_checkpoint
from softprompt.models.data import encode_task
from softprompt.models.tasks import load_task
from softprompt.trainables.config import TrainConfig
from softprompt.trainables.loop import train
from softprompt.trainables.optimizers import DEFAULT_LR, OPTIMIZERS

pytestmark = pytest.mark.no_ray  # `make test` runs it beside the loopback `ray up` test (pyproject.toml)


def trained_optimizer(name: str, steps: int = 3):
    prompt = torch.nn.Parameter(torch.randn(6, 16, generator=torch.Generator().manual_seed(0)))
    optimizer = OPTIMIZERS[name]([prompt], DEFAULT_LR[name], 1e-5)
    for step in range(steps):
        prompt.grad = torch.sin(prompt.detach() * (step + 1))
        optimizer.step()
    return prompt, optimizer


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_checkpoint_round_trip_is_bitwise_for_prompt_and_optimizer_state(tmp_path, name):
    prompt, optimizer = trained_optimizer(name)
    save_checkpoint(tmp_path / "ckpt", prompt, {"fingerprint": "abc", "step": 3}, optimizer.state_dict())
    loaded = load_checkpoint(tmp_path / "ckpt", fingerprint="abc", width=16)
    assert torch.equal(loaded.prompt, prompt.detach())
    assert loaded.meta["step"] == 3 and loaded.meta["length"] == 6 and loaded.meta["width"] == 16
    original = optimizer.state_dict()["state"][0]
    restored = loaded.optimizer_state["state"][0]
    assert restored.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(restored[key], value) if isinstance(value, torch.Tensor) else restored[key] == value
    # and the restored optimizer takes exactly the steps the original would have taken
    twin, twin_optimizer = trained_optimizer(name, steps=0)
    with torch.no_grad():
        twin.copy_(loaded.prompt)
    twin_optimizer.load_state_dict(loaded.optimizer_state)
    for p, opt in ((prompt, optimizer), (twin, twin_optimizer)):
        for step in range(3, 6):
            p.grad = torch.sin(p.detach() * (step + 1))
            opt.step()
    assert torch.equal(twin, prompt)


def test_checkpoint_without_optimizer_state_loads_as_none(tmp_path):
    save_checkpoint(tmp_path / "ckpt", torch.ones(2, 4), {"fingerprint": "abc"})
    assert load_checkpoint(tmp_path / "ckpt").optimizer_state is None


def test_checkpoint_folder_holds_no_pickle(tmp_path):
    prompt, optimizer = trained_optimizer("adamw")
    folder = save_checkpoint(tmp_path / "ckpt", prompt, {"fingerprint": "abc"}, optimizer.state_dict())
    files = sorted(p.name for p in folder.iterdir())
    assert files == [META, TENSORS]
    assert {Path(name).suffix for name in files} == {".json", ".safetensors"}
    for path in folder.iterdir():
        assert not path.read_bytes().startswith(b"\x80")  # pickle protocol 2+ header
    json.loads((folder / META).read_text())


def test_saving_again_replaces_the_checkpoint_and_leaves_no_partial_folders(tmp_path):
    save_checkpoint(tmp_path / "ckpt", torch.zeros(2, 4), {"fingerprint": "abc"})
    save_checkpoint(tmp_path / "ckpt", torch.ones(2, 4), {"fingerprint": "abc"})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert torch.equal(load_checkpoint(tmp_path / "ckpt").prompt, torch.ones(2, 4))


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return save_checkpoint(tmp_path / "ckpt", torch.randn(3, 16), {"backbone": "tiny", "fingerprint": "abc"})


def test_checkpoint_for_another_backbone_is_refused_naming_both_fingerprints(checkpoint):
    with pytest.raises(CheckpointError,
                       match=r"trained on backbone 'tiny' \(fingerprint abc\), not on this one \(xyz\)"):
        load_checkpoint(checkpoint, fingerprint="xyz", width=16)


def test_checkpoint_of_another_width_is_refused_naming_both_widths(checkpoint):
    with pytest.raises(CheckpointError, match="prompt width 16 does not match the backbone's embedding width 32"):
        load_checkpoint(checkpoint, fingerprint="abc", width=32)


def test_edited_prompt_tensor_fails_the_sha256_check(checkpoint):
    path = checkpoint / TENSORS
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte belongs to the prompt's values
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{TENSORS}: does not match the SHA-256"):
        load_checkpoint(checkpoint)


def test_truncated_tensor_file_is_refused_naming_the_file(checkpoint):
    path = checkpoint / TENSORS
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=rf"{TENSORS}: does not match the SHA-256"):
        load_checkpoint(checkpoint)


def test_edited_metadata_hash_is_refused(checkpoint):
    meta = json.loads((checkpoint / META).read_text())
    meta["prompt_sha256"] = "0" * 64
    (checkpoint / META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="the prompt tensor does not match the prompt_sha256"):
        load_checkpoint(checkpoint)


@pytest.mark.parametrize("missing", [META, TENSORS])
def test_checkpoint_with_a_missing_file_names_it(checkpoint, missing):
    (checkpoint / missing).unlink()
    with pytest.raises(CheckpointError, match=rf"{missing}: missing"):
        load_checkpoint(checkpoint)


def test_checkpoint_with_invalid_json_or_another_format_is_refused(checkpoint):
    meta = json.loads((checkpoint / META).read_text())
    (checkpoint / META).write_text(json.dumps({**meta, "format": "something-else/9"}))
    with pytest.raises(CheckpointError, match="format 'something-else/9'"):
        load_checkpoint(checkpoint)
    (checkpoint / META).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(checkpoint)


# ---- resuming a run ----

class Interrupted(Exception):
    """Stands in for a trial that Ray stops after a checkpoint."""


def run(cfg, backbone, data, folder: Path, stop_after: int | None = None, resume_from: Path | None = None) -> dict:
    """Train, saving every report's checkpoint to folder/<step>; raise Interrupted after `stop_after`."""
    def report(metrics, save):
        save(folder / str(metrics["step"]))
        if metrics["step"] == stop_after:
            raise Interrupted
    try:
        return train(cfg, backbone, data, report=report, resume_from=resume_from)
    except Interrupted:
        return {}


@pytest.fixture(scope="module")
def rotten_tomatoes():
    return load_task("rotten_tomatoes")


@pytest.fixture(scope="module")
def data(rotten_tomatoes, tiny_llama):
    return encode_task(rotten_tomatoes, tiny_llama.tokenizer, False, False, 64, max_train=40, max_eval=16)


@pytest.mark.parametrize("optimizer, lr", [("adafactor", 0.3), ("adamw", 0.03)])
def test_resumed_training_ends_bitwise_identical_to_uninterrupted_training(tiny_llama, data, tmp_path, optimizer, lr):
    cfg = TrainConfig(model=tiny_llama.name, optimizer=optimizer, lr=lr, warmup_steps=3, decay_factor=0.5,
                      batch_size=4, max_steps=8, eval_every=4)
    straight = run(cfg, tiny_llama, data, tmp_path / "straight")
    assert run(cfg, tiny_llama, data, tmp_path / "interrupted", stop_after=4) == {}
    assert not (tmp_path / "interrupted" / "8").exists()
    resumed = run(cfg, tiny_llama, data, tmp_path / "resumed", resume_from=tmp_path / "interrupted" / "4")

    final_straight = load_checkpoint(tmp_path / "straight" / "8" / "current")
    final_resumed = load_checkpoint(tmp_path / "resumed" / "8" / "current")
    assert torch.equal(final_resumed.prompt, final_straight.prompt)
    assert not torch.equal(final_resumed.prompt, load_checkpoint(tmp_path / "interrupted" / "4" / "current").prompt)
    for key, value in final_straight.optimizer_state["state"][0].items():
        same = torch.equal if isinstance(value, torch.Tensor) else (lambda a, b: a == b)
        assert same(final_resumed.optimizer_state["state"][0][key], value), key
    assert final_resumed.meta["scheduler"] == final_straight.meta["scheduler"]
    assert torch.equal(resumed.pop("prompt"), straight.pop("prompt"))
    assert resumed == straight  # best step, best dev accuracy and the test metrics


def test_resuming_from_the_final_checkpoint_only_reports_the_result(tiny_llama, data, tmp_path):
    cfg = TrainConfig(model=tiny_llama.name, batch_size=4, max_steps=4, eval_every=2)
    straight = run(cfg, tiny_llama, data, tmp_path / "straight")
    reports = []
    again = train(cfg, tiny_llama, data, report=lambda metrics, save: reports.append(metrics),
                  resume_from=tmp_path / "straight" / "4")
    assert reports == []
    assert torch.equal(again.pop("prompt"), straight.pop("prompt"))
    assert again == straight


def test_resuming_on_another_backbone_is_refused(tiny_llama, tiny_t5, rotten_tomatoes, data, tmp_path):
    cfg = TrainConfig(model=tiny_llama.name, batch_size=4, max_steps=2, eval_every=2)
    run(cfg, tiny_llama, data, tmp_path / "llama")
    t5_data = encode_task(rotten_tomatoes, tiny_t5.tokenizer, True, True, 64, max_train=16, max_eval=8)
    with pytest.raises(CheckpointError, match="not on this one"):
        train(cfg, tiny_t5, t5_data, resume_from=tmp_path / "llama" / "2")


def test_edited_optimizer_state_fails_the_file_sha256_check(tmp_path):
    prompt = torch.randn(3, 4)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(prompt.clone())], lr=0.1)
    optimizer.param_groups[0]["params"][0].grad = torch.ones(3, 4)
    optimizer.step()
    folder = save_checkpoint(tmp_path / "ckpt", prompt, {"fingerprint": "f"}, optimizer.state_dict())
    tensors = load_file(str(folder / "prompt.safetensors"))
    tensors["optimizer.0.exp_avg"] += 1.0  # the prompt tensor itself stays as it was
    save_file(tensors, str(folder / "prompt.safetensors"))
    with pytest.raises(CheckpointError, match="prompt.safetensors: does not match the SHA-256"):
        load_checkpoint(folder)


def test_a_bundle_record_without_a_fingerprint_is_a_one_line_checkpoint_error(tmp_path):
    from softprompt.models.checkpoint import BUNDLE_FILE, BUNDLE_FORMAT, load_bundle_record

    (tmp_path / BUNDLE_FILE).write_text(json.dumps({"format": BUNDLE_FORMAT, "combine": "vote",
                                                    "tasks": {"t": {"members": ["t/0"]}}}))
    with pytest.raises(CheckpointError, match="not a valid bundle record .*fingerprint"):
        load_bundle_record(tmp_path)
