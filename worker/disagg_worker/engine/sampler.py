"""Turn a step's logits into next tokens: greedy rows in one argmax, sampled rows with their own RNG.

A request with a ``seed`` draws each token from a generator seeded by (seed, token index), so its
output is reproducible whatever it is batched with, and identical whether its first token was sampled
by a prefill worker and the rest by a decode worker, or all on one worker.
"""

from __future__ import annotations

import torch

from disagg_worker.engine.request import Request, SamplingParams

_TOKEN_STRIDE = 1_000_003  # a prime: (seed, index) pairs map to distinct generator seeds


def apply_temperature_top_k_top_p(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Scale one row of logits and mask everything outside top-k / top-p (nucleus) with -inf."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop a token when the mass before it already reaches top_p (the top token is always kept)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def apply_repetition_penalty(row: torch.Tensor, token_ids: list[int], penalty: float) -> torch.Tensor:
    """Hugging Face's repetition penalty on one row of logits: every token already in the prompt or the
    output has its logit divided by ``penalty`` when positive, multiplied by it when negative."""
    ids = torch.tensor(sorted(set(token_ids)), dtype=torch.long, device=row.device)
    seen = row.gather(0, ids)
    return row.scatter(0, ids, torch.where(seen < 0, seen * penalty, seen / penalty))


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._generators: dict[str, torch.Generator] = {}
        self._default = torch.Generator(device=device)
        self._default.seed()

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, req: Request) -> torch.Generator:
        if req.params.seed is None:
            return self._default
        gen = self._generators.get(req.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            self._generators[req.request_id] = gen
        gen.manual_seed((req.params.seed * _TOKEN_STRIDE + req.num_output_tokens) % (1 << 63))
        return gen

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        """``logits[i]`` belongs to ``requests[i]``; returns one token id per request."""
        tokens = torch.argmax(logits, dim=-1).tolist() if len(requests) else []
        for i, req in enumerate(requests):
            penalty = req.params.repetition_penalty or 1.0
            if req.params.greedy and penalty == 1.0:
                continue
            row = logits[i].float()  # fp16 logits / T overflow; HF's logits processors work in float32 too
            if penalty != 1.0:  # only this row is copied, not the batch's logits
                row = apply_repetition_penalty(row, req.all_token_ids, penalty)
                if req.params.greedy:
                    tokens[i] = int(torch.argmax(row))
                    continue
            row = apply_temperature_top_k_top_p(row, req.params)
            probs = torch.softmax(row, dim=-1)
            tokens[i] = int(torch.multinomial(probs, 1, generator=self._generator(req)).item())
        return tokens
