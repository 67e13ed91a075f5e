"""The sampler's batched filters and draws, against per-row references."""

from __future__ import annotations

import pytest
import torch

from disagg_worker.engine import sampler as sampler_module
from disagg_worker.engine.request import Request, SamplingParams
from disagg_worker.engine.sampler import (
    NOT_FINITE,
    ON_A_MASKED_TOKEN,
    Sampler,
    apply_temperature_top_k_top_p,
    batch_temperature_top_k_top_p,
    exact_inverse_cdf_sample,
    inverse_cdf_sample,
    penalise_occurrences_,
)


def reference_filter(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The textbook per-row version: temperature, then top-k, then the nucleus from a full sort."""
    row = row / p.temperature
    if 0 < p.top_k < row.shape[-1]:
        row = row.masked_fill(row < torch.topk(row, p.top_k).values[-1], float("-inf"))
    if p.top_p < 1.0:
        ranked, order = torch.sort(torch.softmax(row, -1), descending=True)
        drop = (ranked.cumsum(-1) - ranked) >= p.top_p
        row = row.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return row


PARAMS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=0.5, top_k=40, top_p=0.9),
    SamplingParams(temperature=1.0, top_p=0.999),  # a flat row's nucleus is wider than the candidates
    SamplingParams(temperature=1.0, top_k=100_000),  # top-k beyond the vocabulary keeps everything
]


@pytest.mark.parametrize("scale", [0.05, 1.0, 6.0], ids=["flat", "normal", "peaked"])
def test_batched_filters_equal_the_per_row_reference(scale: float) -> None:
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(len(PARAMS), 5000, generator=g) * scale
    got = batch_temperature_top_k_top_p(rows, PARAMS)
    for i, p in enumerate(PARAMS):
        want = reference_filter(rows[i], p)
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want)), p
        torch.testing.assert_close(got[i][~torch.isinf(want)], want[~torch.isinf(want)])
        torch.testing.assert_close(apply_temperature_top_k_top_p(rows[i], p), got[i])


def test_inverse_cdf_never_picks_a_zero_and_matches_the_distribution() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]])
    edges = inverse_cdf_sample(probs.expand(3, -1), torch.tensor([0.0, 0.5, 1.0 - 2**-24]))
    assert edges.tolist() == [1, 3, 4]
    n = 40_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    picks = inverse_cdf_sample(probs.expand(n, -1), u)
    freq = torch.bincount(picks, minlength=6).float() / n
    assert freq[[0, 2, 5]].sum() == 0
    torch.testing.assert_close(freq, probs[0], atol=0.01, rtol=0)


def make(i: int, **params: object) -> Request:
    return Request(request_id=f"r{i}", prompt_token_ids=[3, 4, 5, 4], params=SamplingParams(max_tokens=4, **params))


def test_a_seeded_row_draws_the_same_token_whatever_its_batch_and_sampler() -> None:
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(2))
    alone = Sampler(torch.device("cpu")).sample(logits[2:3], [make(0, temperature=1.0, seed=9)])
    batch = [make(i, temperature=1.0, top_p=0.9) for i in range(5)]
    batch[2] = make(7, temperature=1.0, seed=9)
    assert Sampler(torch.device("cpu")).sample(logits, batch)[2] == alone[0]


def test_greedy_rows_and_penalised_rows_in_one_batch() -> None:
    logits = torch.zeros(3, 10)
    logits[:, 4] = 2.0  # token 4 is in every prompt: a penalty of 3 makes it lose to token 7
    logits[:, 7] = 1.0
    reqs = [make(0, temperature=0), make(1, temperature=0, repetition_penalty=3.0), make(2, temperature=0)]
    assert Sampler(torch.device("cpu")).sample(logits, reqs) == [4, 7, 4]


def test_occurrence_penalties_match_a_dense_count() -> None:
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(4, 30, generator=g)
    outputs = [torch.randint(0, 30, (n,), generator=g) for n in (0, 5, 40, 12)]  # row 0: no output yet
    presence, frequency = torch.tensor([1.0, 0.5, -0.25, 2.0]), torch.tensor([2.0, -1.0, 0.75, 0.0])
    expected = rows.clone()
    for r, ids in enumerate(outputs):
        counts = torch.bincount(ids, minlength=30).float()
        expected[r] -= (counts > 0).float() * presence[r] + counts * frequency[r]
    row_index = torch.cat([torch.full_like(ids, r) for r, ids in enumerate(outputs)])
    penalise_occurrences_(rows, row_index, torch.cat(outputs), presence, frequency)
    assert torch.allclose(rows, expected)
    penalise_occurrences_(rows, row_index[:0], row_index[:0], presence, frequency)  # nothing seen: no change
    assert torch.allclose(rows, expected)


def test_penalties_apply_to_the_output_not_the_prompt() -> None:
    logits = torch.zeros(2, 10)
    logits[:, 4] = 2.0  # token 4 is in every prompt and, for request 1, once in its output
    logits[:, 7] = 1.0
    quiet, penalised = make(0, temperature=0, frequency_penalty=1.5), make(1, temperature=0, presence_penalty=1.5)
    penalised.append_output(4)
    assert Sampler(torch.device("cpu")).sample(logits, [quiet, penalised]) == [4, 7]


def test_logit_bias_comes_before_the_penalties_and_bans_with_minus_100() -> None:
    logits = torch.full((3, 10), -10.0)
    logits[:, 4], logits[:, 7], logits[:, 2] = -1.0, -1.3, -1.2
    banned = make(0, temperature=0, logit_bias={4: -100.0, 2: -100.0})
    # token 4 is in the prompt: +0.5 then a repetition penalty of 2 gives -1.0 > -1.3 (vLLM's order);
    # the other way round it would be -2.0 + 0.5 = -1.5 and token 7 would win
    before = make(1, temperature=0, repetition_penalty=2.0, logit_bias={4: 0.5})
    sampled = make(2, temperature=1.0, seed=3, logit_bias={t: -100.0 for t in range(10) if t != 2})
    sampler = Sampler(torch.device("cpu"))
    assert sampler.sample(logits, [banned, before, sampled]) == [7, 4, 2]
    assert sampler.sample(logits, [banned, before, sampled]) == [7, 4, 2]  # the cached bias, the same
    assert Sampler(torch.device("cpu")).sample(logits[:1], [make(3, temperature=0)]) == [4]


def test_non_finite_logits_are_reported_for_their_row_instead_of_sampling_outside_the_vocabulary() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(4))
    logits[1, 7] = float("nan")
    reqs = [make(i, temperature=1.0) for i in range(3)]
    out = Sampler(torch.device("cpu")).sample(logits, reqs)
    assert out[1] == NOT_FINITE and all(0 <= t < 50 for t in (out[0], out[2]))
    probs = torch.tensor([[0.5, 0.5], [float("nan"), 1.0], [0.0, 0.0]])
    assert inverse_cdf_sample(probs, torch.tensor([0.7, 0.5, 0.5])).tolist() == [1, NOT_FINITE, NOT_FINITE]


def test_a_masked_token_is_never_chosen_and_tiny_ones_still_can_be(monkeypatch: pytest.MonkeyPatch) -> None:
    probs = torch.full((1, 2000), 1e-9)
    probs[0, ::2] = 0.0  # every other token masked, the rest tiny: float32 sums near 1 would not see them
    probs[0, -1] = 1.0
    u = torch.rand(4000, generator=torch.Generator().manual_seed(5))
    fast = inverse_cdf_sample(probs.expand(4000, -1), u)
    assert bool(((fast == ON_A_MASKED_TOKEN) | (probs[0, fast.clamp(min=0)] > 0)).all())
    exact = [exact_inverse_cdf_sample(probs[0], x) for x in (0.0, 5e-7, 0.9)]
    assert exact[0] == 1 and exact[1] % 2 == 1 and exact[1] < 1999 and exact[2] == 1999
    # a GPU's sums can leave a rounding step on a masked token: that row is settled the exact way
    monkeypatch.setattr(sampler_module, "inverse_cdf_sample",
                        lambda p, uniforms: torch.full((p.shape[0],), ON_A_MASKED_TOKEN))
    logits = torch.log(torch.tensor([[0.0, 0.6, 0.0, 0.4]]))
    assert Sampler(torch.device("cpu")).sample(logits, [make(0, temperature=1.0)])[0] in (1, 3)
