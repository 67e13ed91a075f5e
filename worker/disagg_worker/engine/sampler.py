"""Turn a step's logits into next tokens: greedy rows in one argmax, the others penalised, filtered
and drawn together (inverse CDF, one uniform per row), with one copy back to the host.

A request with a ``seed`` draws each token's uniform from a CPU generator seeded by (seed, token
index), so its output is reproducible whatever it is batched with, on any device, and identical
whether its first token was sampled by a prefill worker and the rest by a decode worker, or all on one.
"""

from __future__ import annotations

import torch

from disagg_worker.engine.request import Request, SamplingParams

_TOKEN_STRIDE = 1_000_003  # a prime: (seed, index) pairs map to distinct generator seeds
_NUCLEUS_CANDIDATES = 1024


def apply_temperature_top_k_top_p(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Scale one row of logits and mask everything outside top-k / top-p (nucleus) with -inf."""
    return batch_temperature_top_k_top_p(logits[None], [params])[0]


def batch_temperature_top_k_top_p(rows: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """``rows [n, vocab]`` (float32) scaled by each row's temperature, with everything outside its
    top-k and its nucleus (top-p) set to -inf; a few whole-batch ops instead of a dozen per row."""
    dev = rows.device
    temps = torch.tensor([p.temperature for p in params], dtype=rows.dtype, device=dev)
    rows = rows / temps[:, None]
    vocab = rows.shape[-1]
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(ks):
        top = torch.topk(rows, max(ks), dim=-1).values  # [n, max k], descending
        kth = top.gather(1, torch.tensor([[max(k, 1) - 1] for k in ks], device=dev))
        no_top_k = torch.tensor([[k == 0] for k in ks], device=dev)
        kth = torch.where(no_top_k, float("-inf"), kth)  # rows without top-k keep all (no mask write: no sync)
        rows = rows.masked_fill(rows < kth, float("-inf"))
    ps = [p.top_p for p in params]
    if any(p < 1.0 for p in ps):
        sel = torch.tensor([i for i, p in enumerate(ps) if p < 1.0], device=dev)
        top_p = torch.tensor([p for p in ps if p < 1.0], dtype=rows.dtype, device=dev)
        rows = rows.index_copy(0, sel, _nucleus(rows[sel], top_p))
    return rows


def _nucleus(rows: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """``rows`` with every token outside its nucleus set to -inf: a token is dropped when the mass of
    the tokens ranked before it already reaches ``top_p`` (so the top token is always kept).

    The ranking is read from the ``_NUCLEUS_CANDIDATES`` most likely tokens (a partial top-k); only a
    row whose nucleus does not fit in them is sorted whole (sorting 152k logits costs ~15 ms a row on
    a CPU).
    """
    probs = torch.softmax(rows, dim=-1)
    k = min(_NUCLEUS_CANDIDATES, rows.shape[-1])
    top, order = torch.topk(probs, k, dim=-1)  # descending
    cum = top.cumsum(dim=-1)
    fits = cum[:, -1] >= top_p  # then every token past the k-th has at least top_p before it: dropped
    if bool(fits.all()):
        return _keep_nucleus(rows, top, order, top_p)
    out = torch.empty_like(rows)
    f, w = fits.nonzero()[:, 0], (~fits).nonzero()[:, 0]
    out[f] = _keep_nucleus(rows[f], top[f], order[f], top_p[f])
    ranked, full_order = torch.sort(probs[w], dim=-1, descending=True)
    out[w] = _keep_nucleus(rows[w], ranked, full_order, top_p[w])
    return out


def _keep_nucleus(rows: torch.Tensor, ranked: torch.Tensor, order: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    keep_ranked = (ranked.cumsum(dim=-1) - ranked) < top_p[:, None]
    keep = torch.zeros_like(rows, dtype=torch.bool).scatter(1, order, keep_ranked)
    return rows.masked_fill(~keep, float("-inf"))


NOT_FINITE = -1  # inverse_cdf_sample: the row's probabilities are NaN or inf, or sum to 0
ON_A_MASKED_TOKEN = -2  # inverse_cdf_sample: the float32 sums rounded a step onto a token of probability 0


def inverse_cdf_sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Row i's token is the first whose cumulative probability exceeds ``uniforms[i]`` x the row's total,
    or one of the two codes above for the (rare) rows ``exact_inverse_cdf_sample`` must settle.

    One uniform per row instead of one random number per vocabulary entry (what ``multinomial`` and the
    exponential race draw): on a CPU with a 152k vocabulary that is most of the cost of a sampled row.
    A CPU sums in double and rounds each prefix, so a masked token's prefix equals its predecessor's and
    it is never chosen; a GPU scan adds in another order, which can leave a rounding step on one.
    """
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    target = torch.minimum(uniforms[:, None].to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    picks = torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1)
    masked = probs.gather(1, picks)[:, 0] <= 0
    picks = torch.where(masked, ON_A_MASKED_TOKEN, picks[:, 0])
    return torch.where(~torch.isfinite(total[:, 0]) | (total[:, 0] <= 0), NOT_FINITE, picks)


def exact_inverse_cdf_sample(probs: torch.Tensor, uniform: float) -> int:
    """One row, the slow and exact way (float64 sums, held flat across masked tokens)."""
    row = probs.detach().to("cpu", torch.float64)
    cdf = torch.where(row > 0, row.cumsum(0), 0.0).cummax(0).values
    target = min(uniform * float(cdf[-1]), float(torch.nextafter(cdf[-1], torch.zeros((), dtype=torch.float64))))
    return int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64), right=True)[0])


def rows_of(rows: list[int], ids: list[torch.Tensor]) -> torch.Tensor:
    """The row of each entry of ``torch.cat(ids)``: ``rows[i]`` repeated once per entry of ``ids[i]``."""
    return torch.cat([torch.full_like(t, row) for row, t in zip(rows, ids, strict=True)])


def penalise_rows_(rows: torch.Tensor, row_index: torch.Tensor, token_ids: torch.Tensor,
                   penalties: torch.Tensor) -> None:
    """Hugging Face's repetition penalty for a batch, in place: the logit ``rows[row_index[i], token_ids[i]]``
    is divided by ``penalties[row_index[i]]`` when positive, multiplied by it when negative. A token listed
    twice is written twice with the same value."""
    seen = rows[row_index, token_ids]
    penalty = penalties[row_index].to(rows.dtype)
    rows[row_index, token_ids] = torch.where(seen < 0, seen * penalty, seen / penalty)


def penalise_occurrences_(rows: torch.Tensor, row_index: torch.Tensor, token_ids: torch.Tensor,
                          presence: torch.Tensor, frequency: torch.Tensor) -> None:
    """OpenAI's presence and frequency penalties for a batch, in place: each (row, token) pair listed
    ``c`` times (``row_index[i]``, ``token_ids[i]``: the row's output tokens) has its logit lowered by
    ``presence[row] + c * frequency[row]``. Sparse: one write per distinct pair, not a vocabulary-wide
    count per row."""
    if not len(token_ids):
        return
    vocab = rows.shape[1]
    pairs, counts = torch.unique(row_index * vocab + token_ids, return_counts=True)
    at_row, at_token = pairs // vocab, pairs % vocab
    rows[at_row, at_token] -= presence.to(rows.dtype)[at_row] + counts.to(rows.dtype) * frequency.to(rows.dtype)[at_row]


class Sampler:
    """Draws a step's tokens. Random numbers come from CPU generators whatever the device, one uniform
    per sampled row, so a seeded request draws the same numbers on a CPU and on a GPU (its first token
    may come from a prefill worker on one and the rest from a decode worker on the other)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._default = torch.Generator()
        self._default.seed()
        self._seeded = torch.Generator()  # reseeded for every draw of a request with a seed
        self._seen: dict[str, tuple[torch.Tensor, int]] = {}  # request id -> (buffer, ids so far), on the device
        self._bias: dict[str, tuple[tuple[tuple[int, float], ...], torch.Tensor, torch.Tensor]] = {}

    def forget(self, request_id: str) -> None:
        self._seen.pop(request_id, None)
        self._bias.pop(request_id, None)

    def _bias_of(self, req: Request) -> tuple[torch.Tensor, torch.Tensor]:
        """The request's ``logit_bias`` as (token ids, float32 biases) on the device, built once: a
        thousand-entry bias rebuilt from Python at every step slowed its whole batch."""
        cached = self._bias.get(req.request_id)
        if cached is None or cached[0] is not req.params.logit_bias:
            pairs = req.params.logit_bias
            cached = (pairs, torch.tensor([t for t, _ in pairs], dtype=torch.long, device=self.device),
                      torch.tensor([b for _, b in pairs], dtype=torch.float32, device=self.device))
            self._bias[req.request_id] = cached
        return cached[1], cached[2]

    def _uniform(self, req: Request) -> torch.Tensor:
        if req.params.seed is None:
            return torch.rand(1, generator=self._default)
        self._seeded.manual_seed((req.params.seed * _TOKEN_STRIDE + req.num_output_tokens) % (1 << 63))
        return torch.rand(1, generator=self._seeded)

    def _seen_ids(self, req: Request) -> torch.Tensor:
        """The request's prompt and output ids on the device: a buffer that doubles when full, so each
        step copies only the tokens added since the last one."""
        ids = req.all_token_ids
        buf, n = self._seen.get(req.request_id, (None, 0))
        if buf is None or n > len(ids):  # new, or not this request's history: start again
            buf, n = torch.empty(max(16, 2 * len(ids)), dtype=torch.long, device=self.device), 0
        if n < len(ids):
            if len(ids) > buf.shape[0]:
                grown = torch.empty(2 * len(ids), dtype=torch.long, device=self.device)
                grown[:n] = buf[:n]
                buf = grown
            buf[n:len(ids)] = torch.tensor(ids[n:], dtype=torch.long, device=self.device)
            n = len(ids)
        self._seen[req.request_id] = (buf, n)
        return buf[:n]

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        """``logits[i]`` belongs to ``requests[i]``; returns one token id per request, or ``NOT_FINITE``
        for a request whose logits are NaN or inf (nothing to sample from: the engine fails that request
        alone, not its batch).

        Greedy rows cost one argmax for the batch; the others are penalised, filtered and drawn
        together, each with one uniform: from the sampler's generator, or for a request with a seed
        from a generator seeded by (seed, token index), so that its tokens do not depend on what it
        is batched with. One copy back to the host at the end.
        """
        if not requests:
            return []
        dev = logits.device
        tokens = torch.argmax(logits, dim=-1)
        work = [i for i, r in enumerate(requests) if not r.params.greedy or r.params.changes_logits]
        if not work:
            return tokens.tolist()
        reqs = [requests[i] for i in work]
        rows = logits[torch.tensor(work, device=dev)].float()  # fp16 logits / T overflow; HF works in fp32
        # vLLM's order: the bias, then the repetition penalty, then presence and frequency
        biased = [j for j, r in enumerate(reqs) if r.params.logit_bias]
        if biased:
            at_token, bias = zip(*(self._bias_of(reqs[j]) for j in biased), strict=True)
            row_index = rows_of(biased, at_token)
            rows[row_index, torch.cat(at_token)] += torch.cat(bias)  # one entry per token: no repeats to sum
        penalised = [j for j, r in enumerate(reqs) if r.params.penalises_repetition]
        if penalised:
            seen = [self._seen_ids(reqs[j]) for j in penalised]
            row_index = rows_of(penalised, seen)
            penalties = torch.tensor([r.params.repetition_penalty or 1.0 for r in reqs], device=dev)
            penalise_rows_(rows, row_index, torch.cat(seen), penalties)  # rows is this call's own copy
        # over the output only, as OpenAI defines them
        additive = [j for j, r in enumerate(reqs) if r.params.penalises_occurrences]
        if additive:
            outputs = [self._seen_ids(reqs[j])[reqs[j].num_prompt_tokens:] for j in additive]
            row_index = rows_of(additive, outputs)
            presence = torch.tensor([r.params.presence_penalty for r in reqs], device=dev)
            frequency = torch.tensor([r.params.frequency_penalty for r in reqs], device=dev)
            penalise_occurrences_(rows, row_index, torch.cat(outputs), presence, frequency)
        picks = torch.empty(len(work), dtype=torch.long, device=dev)
        greedy = [j for j, r in enumerate(reqs) if r.params.greedy]  # penalised greedy rows
        if greedy:
            at = torch.tensor(greedy, device=dev)
            picks[at] = rows[at].argmax(dim=-1)
        sampled = [j for j, r in enumerate(reqs) if not r.params.greedy]
        if sampled:
            at = torch.tensor(sampled, device=dev)
            probs = torch.softmax(batch_temperature_top_k_top_p(rows[at], [reqs[j].params for j in sampled]), dim=-1)
            uniforms = torch.cat([self._uniform(reqs[j]) for j in sampled])
            picks[at] = inverse_cdf_sample(probs, uniforms.to(dev))
        tokens[torch.tensor(work, device=dev)] = picks
        out = tokens.tolist()
        if ON_A_MASKED_TOKEN in out:
            row_of = {work[j]: k for k, j in enumerate(sampled)}
            for i, t in enumerate(out):
                if t == ON_A_MASKED_TOKEN:
                    out[i] = exact_inverse_cdf_sample(probs[row_of[i]], float(uniforms[row_of[i]]))
        return out
