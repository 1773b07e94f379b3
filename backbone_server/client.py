"""A trial's side of a shared backbone (backbone_server/server.py): its server found or started on the
trial's node and GPU, and the trial's training and scoring calls sent to it."""
from __future__ import annotations

import uuid

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from softprompt.backbone_server.server import NAMESPACE, BackboneServer
from softprompt.models.data import Batch, EncodedTask
from softprompt.models.hub import load_tokenizer, resolve_model
from softprompt.models.prompt import InputDropout, SoftPrompt


class SharedBackbone:
    """What a trial sees of a backbone a server holds: enough to tokenise, initialise prompts and
    sign checkpoints (no weights in the trial's process)."""

    def __init__(self, name: str, handle, info: dict, tokenizer):
        self.name, self.handle, self.tokenizer = name, handle, tokenizer
        self.fingerprint, self.width = info["fingerprint"], info["width"]
        self.is_encoder_decoder = info["is_encoder_decoder"]
        self.vocab_is_frequency_ordered = info["vocab_is_frequency_ordered"]
        self.dtype = getattr(torch, info["dtype"].removeprefix("torch."))  # what the server computes in
        self.load_seconds = info["load_s"]
        self.device = torch.device("cpu")  # the trial's prompt and optimizer live here
        self.client = uuid.uuid4().hex

    def embed(self, ids: list[int]) -> torch.Tensor:
        return ray.get(self.handle.embed.remote(list(ids)))

    def prompted_model(self, prompt: SoftPrompt) -> RemotePromptedModel:
        """The prompt on this backbone: its passes computed by the server."""
        return RemotePromptedModel(self, prompt)

    def leave(self) -> None:
        self.handle.leave.remote(self.client)


class RemotePromptedModel:
    """PromptedModel's training and scoring calls, computed by the server."""

    def __init__(self, backbone: SharedBackbone, prompt: SoftPrompt):
        self.backbone, self.prompt = backbone, prompt

    def loss_backward(self, batch: Batch, dropout: InputDropout | None = None) -> float:
        b = self.backbone
        value, grad = ray.get(b.handle.train.remote(b.client, self.prompt.weight.detach(), batch, dropout))
        weight = self.prompt.weight
        weight.grad = grad if weight.grad is None else weight.grad + grad
        return value

    def class_scores_batches(self, data: EncodedTask, batches: list[list[list[int]]]) -> list[torch.Tensor]:
        """All at once, so the server can fuse them with each other and with other trials'."""
        b = self.backbone
        prompt = ray.put(self.prompt.weight.detach().clone())
        return ray.get([b.handle.scores.remote(b.client, prompt, inputs, [data.target_ids] * len(inputs))
                        for inputs in batches])

    def generate(self, data: EncodedTask, inputs: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        return ray.get(self.backbone.handle.generate.remote(self.prompt.weight.detach(), inputs, max_new_tokens))

_CLIENTS: dict[str, SharedBackbone] = {}  # by server name


def connect(key: str, model: str, dtype: str, **options) -> tuple[SharedBackbone, bool]:
    """The server of this trial's node (and GPU) for `model`, started if there is none (`options`:
    BackboneServer's pass_tokens and min_gather_s); returns the trial's view of it and whether the
    model was loaded before (for another trial)."""
    gpus = ray.get_gpu_ids()
    gpu = str(gpus[0]) if gpus else None
    node = ray.get_runtime_context().get_node_id()
    name = f"{key}:{model}:{dtype}:{node}:{gpu or 'cpu'}"
    cached = _CLIENTS.get(name)
    if cached is not None:
        try:
            ray.get(cached.handle.join.remote())
            return cached, True
        except ray.exceptions.RayActorError:  # the server died since: start another
            _CLIENTS.pop(name)
    handle = ray.remote(BackboneServer).options(
        name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached", num_cpus=0, max_concurrency=1000,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(model, dtype, gpu, **options)
    info = ray.get(handle.join.remote())
    _CLIENTS[name] = SharedBackbone(model, handle, info, load_tokenizer(resolve_model(model)[0]))
    return _CLIENTS[name], info["loaded_before"]
