"""The oracle: greedy output through the engine equals Hugging Face ``generate`` token for token.

Llama, Qwen2 and Mistral random-init presets (all GQA), single and 16+ concurrent requests of mixed
lengths, with and without prefix-cache hits, chunked prefill, KV-pool pressure that forces
preemption, sliding-window attention, and both attention paths (compiled CPU kernel and pure torch).
"""

from __future__ import annotations

import functools

import pytest
import torch

from disagg_worker.engine.engine import EngineConfig, LLMEngine
from disagg_worker.models.loader import LoadedModel
from tests.conftest import (
    FAMILIES,
    HAVE_COMPILER,
    TEST_DEVICE,
    LogitBias,
    OpenAIPenalties,
    get_model,
    hf_greedy,
    random_prompts,
)


@functools.cache
def _reference(family: str, prompt: tuple[int, ...], n: int) -> tuple[int, ...]:
    return tuple(hf_greedy(get_model(family), list(prompt), n))


def reference(family: str, prompt: list[int], n: int) -> list[int]:
    return list(_reference(family, tuple(prompt), n))


def run(lm: LoadedModel, prompts: list[list[int]], max_tokens: list[int], wide_decode_groups: bool | None = None,
        **cfg: object) -> tuple[LLMEngine, list]:
    engine = LLMEngine(EngineConfig(**{"num_kv_blocks": 512, **cfg}), lm)
    if wide_decode_groups is not None:  # the device's choice otherwise
        engine.runner.wide_decode_groups = wide_decode_groups
    reqs = engine.generate(prompts, [{"max_tokens": m, "temperature": 0} for m in max_tokens])
    assert engine.block_manager.usage == 0, "blocks leaked"
    engine.block_manager.check_invariants([])
    return engine, reqs


def mixed_workload(seed: int, n: int = 18) -> tuple[list[list[int]], list[int]]:
    shared = random_prompts(1, 40, 40, seed + 100)[0]
    prompts = random_prompts(n // 2, 1, 250, seed) + random_prompts(n - n // 2, 1, 60, seed + 1, prefix=shared)
    lengths = [1 + (i * 7) % 40 for i in range(n)]
    return prompts, lengths


@pytest.mark.parametrize("family", FAMILIES)
def test_single_request(family: str) -> None:
    lm = get_model(family)
    prompt = random_prompts(1, 37, 37, 7)[0]
    _, (req,) = run(lm, [prompt], [24])
    assert req.output_token_ids == reference(family, prompt, 24)


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["kernel", "torch"])
@pytest.mark.parametrize("family", FAMILIES)
def test_concurrent_mixed_lengths_with_prefix_hits(family: str, cpu_kernels: bool) -> None:
    lm = get_model(family)
    prompts, lengths = mixed_workload(seed=11)
    engine, reqs = run(lm, prompts, lengths, cpu_kernels=cpu_kernels, max_num_batched_tokens=256)
    if cpu_kernels and HAVE_COMPILER and lm.device.type == "cpu":
        assert engine.runner.kernel is not None, "the CPU kernels did not build"
    assert engine.block_manager.prefix_hit_ratio > 0  # the shared prefix was reused
    for p, n, r in zip(prompts, lengths, reqs, strict=True):
        assert r.output_token_ids == reference(family, p, n), (len(p), n)


@pytest.mark.parametrize("family", FAMILIES)
def test_wide_decode_groups_as_on_a_gpu(family: str) -> None:
    """The grouping a GPU uses (few wide decode groups, padded and masked), here on the torch path."""
    lm = get_model(family)
    prompts, lengths = mixed_workload(seed=13)
    _, reqs = run(lm, prompts, lengths, wide_decode_groups=True, cpu_kernels=False, max_num_batched_tokens=256)
    for p, n, r in zip(prompts, lengths, reqs, strict=True):
        assert r.output_token_ids == reference(family, p, n), (len(p), n)


@pytest.mark.parametrize("family", FAMILIES)
def test_preemption_under_kv_pool_pressure(family: str) -> None:
    lm = get_model(family)
    prompts, lengths = mixed_workload(seed=5)
    engine, reqs = run(lm, prompts, lengths, num_kv_blocks=24, max_num_batched_tokens=64)
    assert engine.scheduler.num_preemptions > 0
    for p, n, r in zip(prompts, lengths, reqs, strict=True):
        assert r.output_token_ids == reference(family, p, n)


def test_tiny_budget_chunks_every_prompt(llama: LoadedModel) -> None:
    prompts, lengths = mixed_workload(seed=3, n=16)
    _, reqs = run(llama, prompts, lengths, max_num_batched_tokens=7, block_size=4)
    for p, n, r in zip(prompts, lengths, reqs, strict=True):
        assert r.output_token_ids == reference("tiny-llama", p, n)


def test_second_wave_hits_the_prefix_cache(llama: LoadedModel) -> None:
    base = random_prompts(4, 64, 100, 21)
    engine = LLMEngine(EngineConfig(num_kv_blocks=512), llama)
    engine.generate(base, {"max_tokens": 4, "temperature": 0})
    follow = [[*p, 9, 10, 11] for p in base]
    reqs = engine.generate(follow, {"max_tokens": 12, "temperature": 0})
    assert all(r.num_cached_tokens >= 64 for r in reqs)
    for p, r in zip(follow, reqs, strict=True):
        assert r.output_token_ids == reference("tiny-llama", p, 12)


def test_sliding_window_attention_matches_hf() -> None:
    from transformers import MistralConfig, MistralForCausalLM

    from disagg_worker.models.presets import build_tokenizer

    torch.manual_seed(3)
    cfg = MistralConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        sliding_window=24, initializer_range=0.2, tie_word_embeddings=False)
    model = MistralForCausalLM(cfg).eval()
    lm = LoadedModel("mistral-window", model.to(TEST_DEVICE), build_tokenizer(), torch.device(TEST_DEVICE),
                     torch.float32)
    prompts = random_prompts(6, 20, 90, 8)
    for cpu_kernels, wide in ((True, False), (False, False), (False, True)):
        _, reqs = run(lm, prompts, [30] * len(prompts), wide_decode_groups=wide, cpu_kernels=cpu_kernels,
                      max_num_batched_tokens=32)
        for p, r in zip(prompts, reqs, strict=True):
            assert r.output_token_ids == hf_greedy(lm, p, 30)


def test_eos_from_generation_config_stops_like_hf(llama: LoadedModel) -> None:
    prompt = random_prompts(1, 30, 30, 99)[0]
    free_run = reference("tiny-llama", prompt, 20)
    eos = free_run[5]
    saved = llama.model.generation_config.eos_token_id
    llama.model.generation_config.eos_token_id = [eos]
    try:
        _, (req,) = run(llama, [prompt], [20])
        expected = hf_greedy(llama, prompt, 20)
    finally:
        llama.model.generation_config.eos_token_id = saved
    assert req.output_token_ids == expected == free_run[:free_run.index(eos) + 1]
    assert req.finish_reason.value == "stop"


def test_presence_and_frequency_penalties_match_hf_with_the_openai_formula(llama: LoadedModel) -> None:
    """Mixed in one batch with unpenalised requests and a repetition penalty, with chunked prefill and a
    prefix-cache hit: each request's greedy output equals HF ``generate`` with OpenAI's formula added."""
    from transformers import LogitsProcessorList

    prompts, lengths = mixed_workload(seed=23, n=8)
    lengths = [48] * len(prompts)  # long enough for this model's outputs to repeat a token
    settings = [(1.5, 0.0, None), (0.0, 2.0, None), (0.0, 0.0, None), (-0.75, 0.5, None),
                (0.5, 1.0, 1.3), (2.0, -2.0, None), (0.0, 0.0, 1.3), (0.25, 0.75, None)]
    engine = LLMEngine(EngineConfig(num_kv_blocks=512, max_num_batched_tokens=64), llama)
    reqs = engine.generate(prompts, [{"max_tokens": n, "temperature": 0, "presence_penalty": pr,
                                      "frequency_penalty": fr, "repetition_penalty": rp}
                                     for n, (pr, fr, rp) in zip(lengths, settings, strict=True)])
    assert engine.block_manager.prefix_hit_ratio > 0
    changed = 0
    for prompt, n, (pr, fr, rp), r in zip(prompts, lengths, settings, reqs, strict=True):
        penalties = LogitsProcessorList([OpenAIPenalties(len(prompt), pr, fr)])
        expected = hf_greedy(llama, prompt, n, logits_processor=penalties,
                             **({} if rp is None else {"repetition_penalty": rp}))
        assert r.output_token_ids == expected, (pr, fr, rp)
        changed += (pr or fr) and r.output_token_ids != hf_greedy(llama, prompt, n, **(
            {} if rp is None else {"repetition_penalty": rp}))
    assert changed >= 3, "the penalties changed too few outputs to test them"


def test_logit_bias_matches_hf_before_the_penalties(llama: LoadedModel) -> None:
    """A bias that bans each greedy output's first and fifth token and one that favours a token, alone and
    with the penalties, in one batch with unbiased requests: equal to HF ``generate`` with the bias added
    before the repetition penalty and OpenAI's penalties (vLLM's order)."""
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    prompts, _ = mixed_workload(seed=29, n=6)
    free = [reference("tiny-llama", p, 12) for p in prompts]
    settings = [({free[0][0]: -100.0, free[0][4]: -100.0}, 0.0, None), ({}, 0.0, None),
                ({free[2][1]: -5.5, 77: 7.25}, 0.0, None), ({free[3][0]: -100.0}, 1.5, 1.3),
                ({}, 0.5, None), ({5: 100.0}, 0.0, None)]
    engine = LLMEngine(EngineConfig(num_kv_blocks=512, max_num_batched_tokens=64), llama)
    reqs = engine.generate(prompts, [{"max_tokens": 12, "temperature": 0, "logit_bias": bias, "frequency_penalty": fr,
                                      "repetition_penalty": rp} for bias, fr, rp in settings])
    for prompt, (bias, fr, rp), r, unbiased in zip(prompts, settings, reqs, free, strict=True):
        repetition = [] if rp is None else [RepetitionPenaltyLogitsProcessor(rp)]
        processors = LogitsProcessorList([LogitBias(bias), *repetition, OpenAIPenalties(len(prompt), 0.0, fr)])
        expected = hf_greedy(llama, prompt, 12, logits_processor=processors)
        assert r.output_token_ids == expected, bias
        assert all(r.output_token_ids.count(t) == 0 for t, b in bias.items() if b == -100.0)
        if bias:  # every bias here bites
            assert r.output_token_ids != unbiased
        elif not (fr or rp):
            assert r.output_token_ids == unbiased
    assert reqs[5].output_token_ids == [5] * 12  # +100 makes it the only choice


def test_repetition_penalty_matches_hf_per_request_and_from_generation_config(llama: LoadedModel) -> None:
    """HF ``generate`` applies ``repetition_penalty`` even when greedy, from the request or from the model's
    generation_config (Qwen2.5-Instruct ships 1.05): mixed in one batch with unpenalised requests, with
    chunked prefill and a prefix-cache hit, the engine must match it."""
    prompts, lengths = mixed_workload(seed=21, n=8)
    penalties = [1.3, None, 0.8, 1.3, None, 2.0, 1.3, None]
    engine = LLMEngine(EngineConfig(num_kv_blocks=512, max_num_batched_tokens=64), llama)
    reqs = engine.generate(prompts, [{"max_tokens": n, "temperature": 0, "repetition_penalty": p}
                                     for n, p in zip(lengths, penalties, strict=True)])
    assert engine.block_manager.prefix_hit_ratio > 0
    for prompt, n, p, r in zip(prompts, lengths, penalties, reqs, strict=True):
        expected = hf_greedy(llama, prompt, n, **({} if p is None else {"repetition_penalty": p}))
        assert r.output_token_ids == expected, p
    assert any(r.output_token_ids != reference("tiny-llama", q, n)
               for q, n, p, r in zip(prompts, lengths, penalties, reqs, strict=True) if p), "no penalty bit"

    saved = llama.model.generation_config.repetition_penalty
    llama.model.generation_config.repetition_penalty = 1.3
    try:
        engine = LLMEngine(EngineConfig(num_kv_blocks=512), llama)
        defaulted, explicit = engine.generate([prompts[0]] * 2, [{"max_tokens": 20, "temperature": 0},
                                                                 {"max_tokens": 20, "temperature": 0,
                                                                  "repetition_penalty": 1.0}])
        expected = hf_greedy(llama, prompts[0], 20)
    finally:
        llama.model.generation_config.repetition_penalty = saved
    assert defaulted.output_token_ids == expected != reference("tiny-llama", prompts[0], 20)
    assert explicit.output_token_ids == reference("tiny-llama", prompts[0], 20)


def test_generation_config_settings_the_engine_does_not_apply_are_named(llama: LoadedModel) -> None:
    assert llama.unapplied_generation_defaults() == {}
    gc = llama.model.generation_config
    gc.no_repeat_ngram_size = 3
    try:
        assert llama.unapplied_generation_defaults() == {"no_repeat_ngram_size": 3}
    finally:
        gc.no_repeat_ngram_size = None
