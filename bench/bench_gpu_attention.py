"""Why our bfloat16 step looked slow on a GPU: cuDNN's attention kernel and new sequence widths.

Times prompt-tuning steps (ours and PEFT's, SmolLM2-135M's architecture, batch 32, prompt 100) on
batch widths never seen before and on the same widths again, with cuDNN attention on and off.
Run on a CUDA machine, from the repository root, with a folder holding the model's config and
tokenizer (random weights are built from it):

    python bench/bench_gpu_attention.py FOLDER

Output of the run on an H200 that led to models/precision.py avoid_cudnn_attention:
bench/results/gpu-attention.txt.
"""
import json
import sys
import time

sys.path.insert(0, "bench")
import numpy as np
import torch
from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

from bench_core import peft_batch
from bench_gpu import random_weights
from softprompt.models.backbone import load_backbone
from softprompt.models.data import IGNORE, make_batch
from softprompt.models.prompt import SoftPrompt, _gather_targets, prompted_inputs
from softprompt.trainables.config import TrainConfig
from softprompt.trainables.loop import initial_prompt, prepare_data

model = random_weights(sys.argv[1])
cfg = TrainConfig(model=model, prompt_length=100, batch_size=32, init="random_uniform", max_train_examples=32 * 200)
bb = load_backbone(model, "bfloat16")
dev = bb.device
data = prepare_data(cfg, bb)
split = data.splits["train"]
rng = np.random.default_rng(0)
perm = rng.permutation(len(split))
idxs = [perm[i * 32:(i + 1) * 32] for i in range(150)]
ours_b = [make_batch(data, [split.input_ids[i] for i in idx], [split.labels[i] for i in idx]) for idx in idxs]
peft_b = [peft_batch(data, idx, data.pad_id) for idx in idxs]
print("distinct widths", len({b.input_ids.shape[1] for b in ours_b}), flush=True)
prompt = SoftPrompt(initial_prompt(cfg, bb, data)).to(dev)
opt = torch.optim.AdamW([prompt.weight], lr=0.03)


def ours(b, positions=True):
    b = b.to(dev)
    embeds, m = prompted_inputs(bb, prompt.weight, b.input_ids, b.attention_mask)
    kw = {"position_ids": (m.cumsum(-1) - 1).clamp(min=0)} if positions else {}
    out = bb.model(inputs_embeds=embeds, attention_mask=m, logits_to_keep=b.labels.shape[1] + 1, use_cache=False, **kw)
    loss = -_gather_targets(out.logits.float()[:, :-1], b.labels).sum() / (b.labels != IGNORE).sum()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


pbb = load_backbone(model, "bfloat16")
pmodel = get_peft_model(pbb.model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=100,
                                                     prompt_tuning_init=PromptTuningInit.RANDOM))
popt = torch.optim.AdamW([p for p in pmodel.parameters() if p.requires_grad], lr=0.03)


def peft(b):
    ids, m, labels = (t.to(dev) for t in b)
    pmodel(input_ids=ids, attention_mask=m, labels=labels).loss.backward()
    popt.step()
    popt.zero_grad(set_to_none=True)


def rate(fn, batches):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for b in batches:
        fn(b)
    torch.cuda.synchronize()
    return round(32 * len(batches) / (time.perf_counter() - t))


ours(ours_b[0])
peft(peft_b[0])
res = {}  # each setting first meets 50 new batches (new widths), then the same 50 again
for cudnn in (True, False):
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    k = "cudnn" if cudnn else "no_cudnn"
    s = slice(0, 50) if cudnn else slice(50, 100)  # fresh shapes for each setting
    res[f"ours_distinct_{k}"] = rate(ours, ours_b[s])
    res[f"peft_distinct_{k}"] = rate(peft, peft_b[s])
    res[f"ours_again_{k}"] = rate(ours, ours_b[s])  # same shapes a second time
    res[f"peft_again_{k}"] = rate(peft, peft_b[s])
    res[f"ours_nopos_again_{k}"] = rate(lambda b: ours(b, False), ours_b[s])
    print(json.dumps(res), flush=True)
torch.backends.cuda.enable_cudnn_sdp(False)
res["ours_fresh_no_cudnn"] = rate(ours, ours_b[100:150])
res["peft_fresh_no_cudnn"] = rate(peft, peft_b[100:150])
print(json.dumps(res), flush=True)
