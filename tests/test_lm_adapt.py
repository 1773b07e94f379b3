"""`softprompt lm-adapt`: a span-corruption T5 continued with the prefix-LM objective as a Ray Train
job (2 CPU workers here), with checkpoints at the requested steps that load as backbones, a manifest
searches read, resume after a kill, and one-line refusals. A tiny random T5 on local text stands in
for google/t5-v1_1-base on C4, and the text is larger than the job's Ray object store: it is streamed."""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import on_session_ray, softprompt
from safetensors.torch import load_file

from softprompt.adaptation.config import JOB_FILE
from softprompt.adaptation.corpus import Cursor, TokenStream, open_corpus
from softprompt.adaptation.lm_adapt import RUN_NAME, STATE_DIR
from softprompt.adaptation.resume import SNAPSHOT, checkpoint_step, resume_from_newest_complete_checkpoint
from softprompt.cli.main import main
from softprompt.configfile import ConfigError
from softprompt.models.backbone import load_backbone
from softprompt.models.hub import load_tokenizer
from softprompt.models.manifest import MANIFEST_FILE, read_manifest
from softprompt.models.tasks import OFFLINE_TASKS

STEPS = "4,8"
JOB = ["--steps", STEPS, "--workers", "2", "--batch-size", "4", "--seq-len", "32", "--checkpoint-every", "2",
       "--log-every", "2"]


SNIPPETS = OFFLINE_TASKS["rotten_tomatoes"]().splits["train"]["input"]
CORPUS_BYTES = 150 * 2**20  # larger than the object store of the job that reads it (OBJECT_STORE)
OBJECT_STORE = 80 * 2**20   # about Ray's smallest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Local text, one Rotten Tomatoes training snippet a line, over and over to CORPUS_BYTES."""
    path = tmp_path_factory.mktemp("corpus") / "snippets.txt"
    text = "\n".join(SNIPPETS) + "\n"
    path.write_text(text * (CORPUS_BYTES // len(text.encode()) + 1))
    return path


def lm_adapt(model, corpus, out, *extra: str, env: dict | None = None, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "softprompt", "lm-adapt", str(model), "--corpus", str(corpus), *JOB,
                           "--out", str(out), *extra], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, **popen)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_checkpoints_appear_at_the_requested_steps_and_each_loads_as_a_backbone(adapted, tiny_t5_dir):
    out = adapted["out"]
    manifest = yaml.safe_load((out / MANIFEST_FILE).read_text())
    assert manifest["base_model"] == str(tiny_t5_dir) and manifest["objective"] == "prefix_lm"
    assert [(c["steps"], c["path"]) for c in manifest["checkpoints"]] == [(4, "step-4"), (8, "step-8")]
    assert read_manifest(out) == ({str(out / "step-8"): 8, str(out / "step-4"): 4}, str(tiny_t5_dir))
    base = weights(Path(tiny_t5_dir))
    for step in (4, 8):
        backbone = load_backbone(str(out / f"step-{step}"), device=torch.device("cpu"))
        assert backbone.is_encoder_decoder and backbone.tokenizer.eos_token_id is not None
    four, eight = weights(out / "step-4"), weights(out / "step-8")
    name = "encoder.block.0.layer.0.SelfAttention.q.weight"
    assert not torch.equal(four[name], base[name]) and not torch.equal(eight[name], four[name])
    assert "lm-adapt step 8/8" in adapted["stdout"] and "tokens/s (2 workers)" in adapted["stdout"]


def test_a_corpus_larger_than_the_object_store_is_streamed_and_only_what_the_steps_need_is_read(adapted, corpus,
                                                                                                tiny_t5_dir):
    """Each worker's saved cursor says where its token stream stands after step 8: 8 batches of 4 windows of
    32 tokens, taken from its own rows (every second one) and nothing past them."""
    store = int(re.search(r"object store bytes (\d+)", adapted["stdout"]).group(1))
    assert store <= OBJECT_STORE < corpus.stat().st_size
    cursors = json.loads((checkpoint_folder(adapted["out"]) / "step.json").read_text())["cursors"]
    lines = [row["text"] for row in itertools.islice(open_corpus(str(corpus)), 1000)]  # of over a million
    tokenizer = load_tokenizer(str(tiny_t5_dir))
    lengths = [len(ids) + 1 for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]]  # and EOS
    for rank, cursor in enumerate(cursors):
        assert cursor["epoch"] == 0 and cursor["row"] % 2 == rank and cursor["row"] < 1000, cursor
        assert sum(lengths[rank:cursor["row"]:2]) + cursor["offset"] == 8 * 4 * 32, cursor


def snippet_batches(rows: list[str], size: int = 7):
    """`texts_from` over `rows`: its texts from a row on, in batches, as Ray Data hands a worker the corpus."""
    return lambda start: (rows[i:i + size] for i in range(start, len(rows), size))


def test_a_token_stream_resumed_from_its_cursor_goes_on_with_the_tokens_it_would_have_given(smollm2_tokenizer):
    """Across the end of the corpus too (it is read again from its first row), and rows of other workers
    are never its own."""
    rows = [*SNIPPETS[:40], "", "  "]
    own = TokenStream(snippet_batches(rows), smollm2_tokenizer, rank=1, world=3)
    taken = np.concatenate([own.take(50) for _ in range(40)])
    expected = np.concatenate([[*smollm2_tokenizer(text, add_special_tokens=False)["input_ids"],
                                smollm2_tokenizer.eos_token_id] for text in rows[1:40:3]])
    assert len(taken) > 3 * len(expected)  # read over more than three times
    assert np.array_equal(taken[:3 * len(expected)], np.tile(expected, 3))
    cursor = own.cursor
    assert cursor.epoch >= 3 and cursor.row % 3 == 1
    again = TokenStream(snippet_batches(rows), smollm2_tokenizer, rank=1, world=3, cursor=cursor)
    assert np.array_equal(np.concatenate([again.take(37) for _ in range(20)]),
                          np.concatenate([own.take(37) for _ in range(20)]))
    assert again.cursor == own.cursor != cursor


def test_a_worker_without_a_row_of_its_own_stops_with_one_line(smollm2_tokenizer):
    stream = TokenStream(snippet_batches(["one text", "", "another"]), smollm2_tokenizer, rank=1, world=2,
                         cursor=Cursor(epoch=0, row=1))
    with pytest.raises(ConfigError, match=r"^--workers = 2 is not allowed: at most the corpus's non-empty rows: "
                                          r"worker 1 \(rows 1, 3, ...\) has none$"):
        stream.take(1)


def test_the_job_is_one_mlflow_run_with_its_loss_curve(adapted):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(adapted["uri"])
    experiment = client.get_experiment_by_name("softprompt")
    runs = client.search_runs([experiment.experiment_id], "tags.`softprompt.kind` = 'lm-adapt'")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["steps"] == "4,8" and run.data.params["workers"] == "2"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [2, 4, 6, 8] and all(m.value > 0 for m in losses)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "tokens_per_s")] == [2, 4, 6, 8]
    assert run.info.status == "FINISHED"


# `softprompt lm-adapt ARGS` on a Ray whose object store is OBJECT_STORE, its rank 0 copying OUT at two moments:
# when its step-2 and step-4 lines say its state is saved, OUT is copied as a kill right then would leave it
# (rank 0 waits in the copy, rank 1 for rank 0 in the next step's all-reduce). The job is otherwise the
# command's own, run to its end.
TOLD = textwrap.dedent(f"""
    import functools, os, shutil, sys
    import ray
    import softprompt.adaptation.worker, softprompt.cli.lm_adapt
    from softprompt.adaptation.lm_adapt import run_adaptation
    from softprompt.adaptation.worker import train_worker
    from softprompt.cli.main import main

    copies, out = sys.argv[1:3]  # captured by value: a worker's own sys.argv is Ray's
    os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"  # as the command sets it before it starts Ray itself
    ray.init(num_cpus=2, object_store_memory={OBJECT_STORE}, include_dashboard=True, configure_logging=False,
             logging_level="WARNING")
    print("object store bytes", int(ray.cluster_resources()["object_store_memory"]), flush=True)

    def copied_when_told(config):
        def print_then_copy(line, **kwargs):
            print(line, **kwargs)
            step = line.split()[2].split("/")[0]
            if step in ("2", "4"):
                shutil.copytree(out, f"{{copies}}/told-{{step}}", symlinks=True)
        softprompt.adaptation.worker.print = print_then_copy
        train_worker(config)

    softprompt.cli.lm_adapt.run_adaptation = functools.partial(run_adaptation, worker=copied_when_told)
    sys.exit(main(sys.argv[3:]))
""")


@pytest.fixture(scope="module")
def adapted(tiny_t5_dir, corpus, tmp_path_factory):
    """One tracked `softprompt lm-adapt` job to step 8, and OUT as a kill leaves it the moment rank 0 says its
    step-2 (told-2) and its step-4 (told-4) state is saved."""
    tmp = tmp_path_factory.mktemp("adapted")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    (tmp / "told.py").write_text(TOLD)
    done = subprocess.run([sys.executable, str(tmp / "told.py"), str(tmp), str(tmp / "out"), "lm-adapt",
                           str(tiny_t5_dir), "--corpus", str(corpus), *JOB, "--out", str(tmp / "out"),
                           "--tracking-uri", uri], cwd=tmp, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"tmp": tmp, "out": tmp / "out", "uri": uri, "stdout": done.stdout}


@pytest.fixture(scope="module")
def told(adapted) -> Path:
    """The folder holding told-2 and told-4."""
    return adapted["tmp"]


def checkpoint_folders(out: Path) -> list[Path]:
    return [p for p in (out / STATE_DIR / RUN_NAME).glob("checkpoint_*") if p.is_dir()]  # not Ray's snapshot file


def resumed(state: Path, tiny_t5_dir, corpus, adapted, tmp_path) -> list[int]:
    """Resume the job from a copy of `state`; check it ends with the uninterrupted run's checkpoints, bit
    for bit, and one resumable state on storage. Returns the steps it logged."""
    out = tmp_path / "out"
    shutil.copytree(state, out, symlinks=True)
    done = lm_adapt(tiny_t5_dir, corpus, out, "--tracking-uri", "none", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for step in (4, 8):
        again, first = weights(out / f"step-{step}"), weights(adapted["out"] / f"step-{step}")
        assert again.keys() == first.keys()
        assert all(torch.equal(again[k], first[k]) for k in first), step
    assert len(checkpoint_folders(out)) == 1
    # lines Ray prefixes with the worker
    return [int(step) for step in re.findall(r"lm-adapt step (\d+)/", done.stdout)]


def test_a_job_killed_once_it_says_its_state_is_saved_leaves_that_state_where_a_resume_looks(told, tmp_path):
    """Saved means registered in Ray Train's snapshot, where a resume looks, before the step's line says so: the
    state a kill leaves right after the step-2 line names a whole step-2 checkpoint, which the repair before a
    resume keeps. (A job resumed from a snapshot is the test after the next.)"""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState

    state = tmp_path / "state"
    shutil.copytree(told / "told-2", state, symlinks=True)
    run = state / STATE_DIR / RUN_NAME
    snapshot = (run / SNAPSHOT).read_text()
    resume_from_newest_complete_checkpoint(run)
    (folder,) = checkpoint_folders(state)
    assert checkpoint_step(folder) == 2 and (run / SNAPSHOT).read_text() == snapshot
    assert _CheckpointManagerState.parse_raw(snapshot).latest_checkpoint_result.checkpoint_dir_name == folder.name


def checkpoint_folder(out: Path) -> Path:
    (folder,) = checkpoint_folders(out)
    return folder


def cut_to_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def newer_checkpoint_beside(state: Path, newer: Path) -> Path:
    """`state` with the checkpoint of `newer` (and its OUT/step-4, written before it) copied in, unregistered."""
    shutil.copytree(checkpoint_folder(newer), state / STATE_DIR / RUN_NAME / checkpoint_folder(newer).name)
    if (newer / "step-4").exists() and not (state / "step-4").exists():
        shutil.copytree(newer / "step-4", state / "step-4")
    return state / STATE_DIR / RUN_NAME / checkpoint_folder(newer).name


def uploaded_not_registered(two: Path, four: Path) -> None:
    newer_checkpoint_beside(two, four)


def half_uploaded(two: Path, four: Path) -> None:
    folder = newer_checkpoint_beside(two, four)
    cut_to_half(folder / "model.safetensors")
    (folder / "step.json").unlink()


def snapshot_cut_while_registering(two: Path, four: Path) -> None:
    newer_checkpoint_beside(two, four)
    snapshot = two / STATE_DIR / RUN_NAME / SNAPSHOT
    snapshot.write_bytes((four / STATE_DIR / RUN_NAME / SNAPSHOT).read_bytes())
    cut_to_half(snapshot)


def registered_older_not_pruned(two: Path, four: Path) -> None:
    shutil.rmtree(two)
    shutil.copytree(four, two)
    newer_checkpoint_beside(two, four.parent / "told-2")


PHASES = [(uploaded_not_registered, 4), (half_uploaded, 2), (snapshot_cut_while_registering, 4),
          (registered_older_not_pruned, 4)]


@pytest.mark.parametrize("kill,step", PHASES, ids=[kill.__name__ for kill, _ in PHASES])
def test_a_kill_in_each_phase_of_saving_leaves_a_state_that_names_its_newest_complete_checkpoint(
        kill, step, told, tmp_path):
    """The step-4 checkpoint uploaded but not yet in Ray Train's snapshot; half uploaded; registered while
    the snapshot was being rewritten (cut short); registered, the step-2 one not yet pruned. What a resume
    does first (adaptation/resume.py) leaves one checkpoint, the newest whole one, and a snapshot in Ray
    Train's schema naming it; the next test resumes a job from such a repaired state."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState

    state = tmp_path / "state"
    shutil.copytree(told / "told-2", state, symlinks=True)
    kill(state, told / "told-4")
    run = state / STATE_DIR / RUN_NAME
    resume_from_newest_complete_checkpoint(run)
    (folder,) = checkpoint_folders(state)
    assert checkpoint_step(folder) == step
    snapshot = _CheckpointManagerState.parse_raw((run / SNAPSHOT).read_text())
    assert snapshot.latest_checkpoint_result.checkpoint_dir_name == folder.name


def test_a_job_killed_while_its_snapshot_was_rewritten_resumes_from_the_newest_complete_state(
        told, tiny_t5_dir, corpus, adapted, tmp_path):
    """The repair that writes Ray Train's snapshot anew (the test above), then the job: Ray Train takes the
    written snapshot, resumes after step 4 and ends with the uninterrupted job's checkpoints, bit for bit."""
    state = tmp_path / "state"
    shutil.copytree(told / "told-2", state, symlinks=True)
    snapshot_cut_while_registering(state, told / "told-4")
    assert resumed(state, tiny_t5_dir, corpus, adapted, tmp_path) == [6, 8]


def test_a_search_explores_the_adapted_checkpoints_with_their_adaptation_steps(ray_cluster, adapted, tiny_t5_dir,
                                                                               tmp_path):
    from softprompt.search.record import SearchRecord

    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump({
        "name": "adapted", "trials": 3, "max_steps": 4, "concurrency": 1, "scheduler": "none", "sampler": "grid",
        "storage_path": str(tmp_path / "runs"), "checkpoints": [str(adapted["out"] / MANIFEST_FILE), str(tiny_t5_dir)],
        "space": {"prompt_length": {"choices": [4]}},
        "train": {"task": "rotten_tomatoes", "batch_size": 4, "eval_every": 4, "max_eval_examples": 8,
                  "max_train_examples": 32, "max_test_examples": 8, "confirm_examples": 8}}))
    done = softprompt("search", "run", str(config), "--tracking-uri", "none", cwd=tmp_path, env=on_session_ray())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trials = SearchRecord.load(str(tmp_path / "runs"), "adapted").trials
    steps = {str(adapted["out"] / "step-8"): 8, str(adapted["out"] / "step-4"): 4, str(tiny_t5_dir): 0}
    assert sorted((t["params"]["model"], t["params"]["adaptation_steps"]) for t in trials) == sorted(steps.items())
    assert "adaptation_steps=0" in done.stdout and "adaptation_steps=8" in done.stdout


@pytest.fixture
def ray_must_not_start(monkeypatch):
    """A command that should be refused before Ray starts fails loudly if it gets that far."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the refusal")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)


def test_a_job_resumed_with_other_settings_is_refused_in_one_line_before_ray_starts(
        adapted, tiny_t5_dir, corpus, tmp_path, capsys, ray_must_not_start):
    other = [*JOB[:JOB.index("--seq-len")], "--seq-len", "48", *JOB[JOB.index("--seq-len") + 2:]]
    job = json.loads((adapted["out"] / STATE_DIR / JOB_FILE).read_text())
    code = main(["lm-adapt", str(tiny_t5_dir), "--corpus", str(corpus), *other, "--out", str(adapted["out"]),
                 "--tracking-uri", "none"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"softprompt: error: --seq-len = 48 is not allowed: 32, as the job in {adapted['out']} "
                               f"started"), lines
    assert json.loads((adapted["out"] / STATE_DIR / JOB_FILE).read_text()) == job  # the record is unchanged


def test_a_resume_that_leaves_workers_to_the_cluster_is_compared_once_they_are_known(tmp_path):
    """Before Ray starts, --workers left out (None) is not known yet: every other setting is checked then,
    the workers once the cluster has said how many."""
    from softprompt.adaptation.config import AdaptConfig, check_resumed_job

    state = tmp_path / "out" / STATE_DIR
    first = AdaptConfig(model="t5", corpus="corpus.txt", steps=(4, 8), out=str(tmp_path / "out"), workers=2)
    check_resumed_job(first, state, record_new=False)  # a new job, before Ray starts: nothing written yet
    assert not state.exists()
    check_resumed_job(first, state)  # once Ray has started: the job's settings recorded
    check_resumed_job(dataclasses.replace(first, workers=None, steps=(4, 8, 12)), state, record_new=False)
    with pytest.raises(ConfigError, match="--lr = 0.5 is not allowed: 0.001, as the job in"):
        check_resumed_job(dataclasses.replace(first, workers=None, lr=0.5), state, record_new=False)
    with pytest.raises(ConfigError, match="--workers = 1 is not allowed: 2, as the job in"):
        check_resumed_job(dataclasses.replace(first, workers=1), state)


@pytest.mark.parametrize("change,fragments", [
    ({"model": "llama"}, ["model = ", "an encoder-decoder (T5) checkpoint", "decoder-only (llama) model"]),
    ({"--steps": "8,4"}, ["--steps = '8,4' is not allowed", "strictly increasing"]),
    ({"--steps": "4,4"}, ["--steps = '4,4' is not allowed", "strictly increasing"]),
    ({"--steps": "10k"}, ["--steps = '10k' is not allowed", "whole step counts"]),
    ({"corpus": "empty"}, ["--corpus = ", "a corpus of more than --seq-len 32 tokens: it has 0"]),
    ({"corpus": "missing"}, ["--corpus = ", "text files"]),
    ({"corpus": "binary"}, ["--corpus = ", "a readable corpus", "UnicodeDecodeError"]),
    ({"corpus": "no-column"}, ["--text-column = 'text' is not allowed", "a column of", "review"]),
    ({"--out": "s3://bucket/adapted"}, ["--out = 's3://bucket/adapted' is not allowed", "a folder", "not URIs"]),
], ids=["decoder-only", "steps-decreasing", "steps-repeated", "steps-not-numbers", "empty-corpus", "missing-corpus",
        "unreadable-corpus", "corpus-without-the-column", "out-uri"])
def test_bad_input_gets_one_line_and_exit_2(change, fragments, tiny_t5_dir, tiny_llama_dir, corpus, tmp_path, capsys):
    corpora = {"empty": tmp_path / "empty.txt", "missing": tmp_path / "nowhere" / "*.txt",
               "binary": tmp_path / "binary.txt", "no-column": tmp_path / "reviews.csv"}
    corpora["empty"].write_text("\n\n")
    corpora["binary"].write_bytes(bytes(range(256)) * 4)
    corpora["no-column"].write_text("review,label\ngood,1\n")
    model = tiny_llama_dir if change.get("model") == "llama" else tiny_t5_dir
    source = corpora.get(change.get("corpus"), corpus)
    job = [change.get(a, v) for a, v in zip(JOB[::2], JOB[1::2], strict=True)]
    argv = ["lm-adapt", str(model), "--corpus", str(source),
            *[x for pair in zip(JOB[::2], job, strict=True) for x in pair],
            "--out", change.get("--out", str(tmp_path / "out")), "--tracking-uri", "none"]
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("softprompt: error: "), (out, err)
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize("other_nodes,filesystem,refused", [
    (True, "ext4", True), (True, "overlay", True), (True, "nfs4", False), (True, "fuse.s3fs", False),
    (True, None, False), (False, "ext4", False)])
def test_out_on_a_disk_of_this_machine_only_is_refused_when_other_nodes_may_run_workers(other_nodes, filesystem,
                                                                                        refused):
    """Without --submit on a cluster of several nodes (or one an autoscaler grows), rank 0 writes OUT/step-N
    on whichever node it runs: OUT must be a filesystem every node mounts."""
    from softprompt.adaptation.config import check_out_shared

    if not refused:
        check_out_shared("/data/adapted", other_nodes, filesystem)
        return
    with pytest.raises(ConfigError) as refusal:
        check_out_shared("/data/adapted", other_nodes, filesystem)
    assert str(refusal.value).startswith("--out = '/data/adapted' is not allowed: a folder every node of this Ray "
                                         "cluster mounts") and f"on a {filesystem} filesystem" in str(refusal.value)


def test_the_filesystem_of_a_folder_not_made_yet_is_that_of_its_nearest_existing_parent(tmp_path):
    from softprompt.adaptation.config import filesystem_type

    assert filesystem_type(tmp_path / "not" / "made" / "yet") == filesystem_type(tmp_path) is not None
