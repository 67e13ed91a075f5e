"""Shared fixtures: the built-in preset models (loaded once) and the Hugging Face greedy oracle."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from typing import Any

import pytest
import torch

from disagg_worker.models.loader import LoadedModel, load_model

torch.set_num_threads(2)
FAMILIES = ("tiny-llama", "tiny-qwen2", "tiny-mistral")
# With a compiler the CPU kernels must build: the oracle passes on the torch path too, so it cannot tell.
HAVE_COMPILER = shutil.which("c++") is not None or shutil.which("g++") is not None
# Where the oracle tests run: the CPU here and in CI; DISAGG_TEST_DEVICE=cuda runs the same tests on a GPU.
# fp32 on both sides in either case, so that engine and HF differ only in the order of their sums.
TEST_DEVICE = os.environ.get("DISAGG_TEST_DEVICE", "cpu")
# Worker processes of the end-to-end tests load the model as the oracle does.
WORKER_MODEL_ARGS = ["--device", TEST_DEVICE, "--dtype", "float32"]
_MODELS: dict[str, LoadedModel] = {}


def get_model(name: str) -> LoadedModel:
    if name not in _MODELS:
        _MODELS[name] = load_model(name, device=TEST_DEVICE, dtype="float32")
    return _MODELS[name]


@pytest.fixture(scope="session")
def llama() -> LoadedModel:
    return get_model("tiny-llama")


def hf_greedy(lm: LoadedModel, prompt: list[int], max_new_tokens: int, **kwargs: object) -> list[int]:
    """The oracle: ``model.generate(do_sample=False)`` on one unpadded prompt, new tokens only."""
    ids = torch.tensor([prompt], device=lm.device)
    with torch.inference_mode():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, **kwargs)
    return out[0, len(prompt):].tolist()


class OpenAIPenalties:
    """The oracle's side of OpenAI's presence and frequency penalties, as a Hugging Face logits processor:
    each token already in the output (not the prompt) loses ``presence + count * frequency``. HF runs
    it after its own repetition penalty, the order the engine applies them in (vLLM's)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        for token, count in zip(*torch.unique(input_ids[0, self.prompt_len:], return_counts=True), strict=True):
            scores[0, token] -= torch.tensor(self.presence, dtype=scores.dtype) + count.to(scores.dtype) * torch.tensor(
                self.frequency, dtype=scores.dtype)
        return scores


class LogitBias:
    """The oracle's side of OpenAI's ``logit_bias``: added to the listed tokens' logits. The engine adds
    it first, as vLLM does: put it before a repetition penalty in the processor list."""

    def __init__(self, bias: dict[int, float]) -> None:
        self.bias = bias

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        for token, value in self.bias.items():
            scores[:, token] += torch.tensor(value, dtype=scores.dtype)
        return scores


@pytest.fixture(scope="session")
def oracle() -> Callable[..., list[int]]:
    return hf_greedy


def random_prompts(n: int, lo: int, hi: int, seed: int, vocab: int = 1024, prefix: list[int] | None = None
                   ) -> list[list[int]]:
    rng = random.Random(seed)
    return [(prefix or []) + [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


async def serve_scripted_worker(servicer: object) -> tuple[Any, str]:
    """An in-process gRPC server on 127.0.0.1 offering ``servicer`` as a decode worker's Worker and
    Decode services (scripted answers stand in for the engine); returns the server and its address."""
    import grpc

    from disagg_worker.rpc import pb_grpc

    server = grpc.aio.server()
    pb_grpc.add_WorkerServicer_to_server(servicer, server)
    pb_grpc.add_DecodeServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"
