"""Precision: which dtype a backbone computes in here, and the workarounds each precision and device
needs to score and train fast and faithfully (attention kernel, float32 output head, contiguous head input,
cuDNN attention, a fractional GPU's memory cap)."""
from __future__ import annotations

import torch


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
    """The attention kernel: on a CPU in bfloat16, transformers' eager one, as torch's fused CPU kernel
    (sdpa) has a slow bfloat16 backward (bench/results/core.md); elsewhere the model's default."""
    return "eager" if device.type == "cpu" and dtype == torch.bfloat16 else None


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def cap_gpu_memory(fraction: float, device: torch.device) -> None:
    """Ray's fractional GPUs are logical shares with no memory isolation: a trial given
    `fraction` of a GPU caps its own process's CUDA memory to that share (beyond it,
    torch.OutOfMemoryError, which ends that trial only)."""
    if device.type == "cuda" and 0 < fraction < 1:
        torch.cuda.set_per_process_memory_fraction(fraction, device.index)  # None: the current device


def avoid_cudnn_attention(device: torch.device) -> None:
    """cuDNN's attention kernel builds a plan for every new sequence width it meets, and a trial meets dozens
    (length-bucketed batches, evaluation): a step on an unseen width ran at a quarter of the speed. PyTorch's
    other fused kernels do not (bench/results/gpu-attention.txt)."""
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


class FloatHead(torch.nn.Module):
    """A reduced-precision model's output projection, done in float32 from a float32 copy of its weight:
    rank classification compares log-likelihoods that differ by tenths of a nat, finer than bfloat16 logits
    resolve (docs/architecture.md, Precision). Only the kept positions reach it (logits_to_keep); the copy
    costs vocabulary x width x 4 bytes."""

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
    """The output projection gets a contiguous input: on the strided slice `logits_to_keep` leaves, torch's
    matmul copies the [vocab, width] weight once per row, most of a bfloat16 step (bench/results/core.md).
    The hook keeps each model's own head (soft-capping, logit scales)."""
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
