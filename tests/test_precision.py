"""Precision and compiled passes: what `dtype: auto` picks (bfloat16 on a GPU and on a CPU that runs it
natively, bench/results/dtype.md), the bfloat16 attention kernel, the output head's contiguous input, and
`compile: true`. None of these may trade accuracy away: bfloat16 and float32 rank classification must agree on
the dev examples, and a compiled pass must give the eager one's loss, gradient and scores."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from softprompt.models.backbone import compiled_graphs, load_backbone
from softprompt.models.data import TrainOrder, train_batch
from softprompt.models.evaluate import split_class_scores
from softprompt.models.precision import attention_for, cpu_runs_bf16, resolve_dtype
from softprompt.models.prompt import PromptedModel, SoftPrompt, class_scores, loss
from softprompt.search.config import _has_cxx
from softprompt.trainables.config import TrainConfig
from softprompt.trainables.loop import initial_prompt, prepare_data

pytestmark = pytest.mark.no_ray  # `make test` runs it beside the loopback `ray up` test (pyproject.toml)

CPU, GPU = torch.device("cpu"), torch.device("cuda")


def test_auto_takes_bfloat16_on_a_gpu_and_on_a_cpu_that_runs_it_natively():
    """At equal wall time bfloat16 training gave better prompts on a CPU that runs it natively
    (bench/results/dtype.md), so auto takes it there too; float32 elsewhere."""
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert cpu_runs_bf16() == native
    assert resolve_dtype("auto", CPU) == (torch.bfloat16 if cpu_runs_bf16() else torch.float32)
    assert resolve_dtype("auto", GPU) == torch.bfloat16
    assert resolve_dtype("float32", CPU) == resolve_dtype("float32", GPU) == torch.float32  # float32 still forces it
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16


def test_the_cpu_runs_bfloat16_with_eager_attention_and_everything_else_with_the_model_default(tiny_llama_dir):
    assert attention_for(torch.bfloat16, CPU) == "eager"
    assert attention_for(torch.float32, CPU) is None and attention_for(torch.bfloat16, GPU) is None
    bf16 = load_backbone(str(tiny_llama_dir), "bfloat16", CPU)
    fp32 = load_backbone(str(tiny_llama_dir), "float32", CPU)
    assert (bf16.dtype, bf16.model.config._attn_implementation) == (torch.bfloat16, "eager")
    assert (fp32.dtype, fp32.model.config._attn_implementation) == (torch.float32, "sdpa")
    assert bf16.fingerprint == fp32.fingerprint  # one checkpoint, whatever the dtype: its prompts load on both


def test_the_output_head_projects_a_contiguous_input_and_the_logits_are_unchanged(tiny_llama):
    """logits_to_keep slices the hidden states; a strided slice made torch's matmul copy the whole
    [vocab, width] head once per row (1.43 s against 6 ms for 32 rows of SmolLM2 in bfloat16)."""
    seen = []
    head = tiny_llama.model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    try:
        ids = torch.randint(5, 1000, (4, 9))
        kept = tiny_llama.model(input_ids=ids, logits_to_keep=3).logits
        full = tiny_llama.model(input_ids=ids).logits
    finally:
        handle.remove()
    assert seen == [True, True]
    torch.testing.assert_close(kept, full[:, -3:], rtol=0, atol=1e-5)


def test_bfloat16_and_float32_rank_classification_agree_on_at_least_95_percent_of_dev_examples(smollm2):
    """The real SmolLM2 with the default 20-token class-label prompt, on 300 rotten_tomatoes dev
    examples: the class each dtype ranks first."""
    cfg = TrainConfig(max_eval_examples=300, max_train_examples=200)
    data = prepare_data(cfg, smollm2)
    prompt = initial_prompt(cfg, smollm2, data)
    bf16 = load_backbone("smollm2-135m", "bfloat16", CPU)
    predictions = {}
    for name, backbone in (("float32", smollm2), ("bfloat16", bf16)):
        pm = PromptedModel(backbone, SoftPrompt(prompt))
        predictions[name] = split_class_scores(pm, data, data.splits["dev"], 32).argmax(-1)
    agree = float(np.mean(predictions["float32"] == predictions["bfloat16"]))
    labels = np.asarray(data.splits["dev"].labels)
    accuracy = {name: float(np.mean(p == labels)) for name, p in predictions.items()}
    print(f"FIGURE precision: bfloat16 and float32 rank classification agree on {agree:.3f} of "
          f"{len(labels)} dev examples; accuracy {accuracy['float32']:.3f} float32, "
          f"{accuracy['bfloat16']:.3f} bfloat16")
    assert agree >= 0.95


needs_cxx = pytest.mark.skipif(not _has_cxx(),
                               reason="torch.compile on a CPU needs a C++ compiler (g++, c++ or clang++)")


@needs_cxx
def test_a_compiled_backbone_gives_the_eager_loss_gradient_and_scores_and_builds_a_bounded_number_of_graphs(
        tiny_llama_dir):
    """Batches of three lengths and two sizes, two prompt lengths, then scoring: one graph per kind
    of pass (training, scoring), not one per shape."""
    eager = load_backbone(str(tiny_llama_dir), "float32", CPU)
    compiled = load_backbone(str(tiny_llama_dir), "float32", CPU)
    compiled.compile()
    cfg = TrainConfig(model=str(tiny_llama_dir), max_train_examples=64, max_eval_examples=16)
    data = prepare_data(cfg, eager)
    order = TrainOrder([len(x) for x in data.splits["train"].input_ids], 8, 0)
    before = compiled_graphs()
    shapes = set()
    for step, length in ((0, 5), (3, 5), (5, 12), (7, 12)):
        batch = train_batch(data, order, step)
        shapes.add((tuple(batch.input_ids.shape), length))
        values = torch.randn(length, eager.width, generator=torch.Generator().manual_seed(step)) * 0.1
        results = []
        for backbone in (eager, compiled):
            prompt = values.clone().requires_grad_(True)
            value = loss(backbone, prompt, batch)
            value.backward()
            results.append((value.detach(), prompt.grad))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
        # fused kernels round differently
        torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-3, atol=1e-5)
    assert len(shapes) >= 3  # really several shapes
    inputs = data.splits["dev"].input_ids
    for rows in (inputs[:16], inputs[:5]):
        expected = class_scores(eager, values, rows, [data.target_ids] * len(rows))
        got = class_scores(compiled, values, rows, [data.target_ids] * len(rows))
        torch.testing.assert_close(torch.stack(got), torch.stack(expected), rtol=1e-5, atol=1e-5)
    graphs = compiled_graphs() - before
    print(f"FIGURE precision: {graphs} compiled graphs for {len(shapes)} training shapes and 2 scoring shapes")
    assert 2 <= graphs <= 4


@needs_cxx
def test_a_compiled_training_run_reports_its_graphs_and_compiles_nothing_after_its_first_evaluation(tiny_llama_dir):
    from softprompt.trainables.loop import train

    backbone = load_backbone(str(tiny_llama_dir), "float32", CPU)
    cfg = TrainConfig(model=str(tiny_llama_dir), max_train_examples=48, max_eval_examples=12, max_test_examples=12,
                      max_steps=6, eval_every=2, compile=True, optimizer="adamw")
    reports = []
    train(cfg, backbone, report=lambda metrics, save: reports.append(metrics))
    assert backbone.compiled is not None
    assert [r["step"] for r in reports] == [2, 4, 6]
    graphs = [r["compiled_graphs"] for r in reports]
    assert graphs[0] >= 2 and graphs[1] == graphs[0]  # new batches and a new evaluation: no new graph
