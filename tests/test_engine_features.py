"""Engine behaviour beyond greedy equality: stops, sampling, detokenization, bad input, abort, KV moves."""

from __future__ import annotations

import pytest
import torch

from disagg_worker.engine.detokenizer import IncrementalDetokenizer
from disagg_worker.engine.engine import EngineConfig, LLMEngine
from disagg_worker.engine.request import InvalidRequestError, SamplingParams
from disagg_worker.engine.sampler import apply_temperature_top_k_top_p
from disagg_worker.models.loader import LoadedModel
from tests.conftest import hf_greedy, random_prompts


@pytest.fixture
def engine(llama: LoadedModel) -> LLMEngine:
    return LLMEngine(EngineConfig(num_kv_blocks=256, max_model_len=512), llama)


def drain(engine: LLMEngine) -> list:
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    return outs


def test_streamed_text_equals_decode_of_tokens(engine: LLMEngine) -> None:
    prompt = engine.tokenizer("The router picks a decode worker")["input_ids"]
    engine.add_request("a", prompt, {"max_tokens": 40, "temperature": 0})
    outs = [o for o in drain(engine) if o.request_id == "a"]
    tokens = [t for o in outs for t in o.new_token_ids]
    assert "".join(o.new_text for o in outs) == engine.tokenizer.decode(tokens, skip_special_tokens=True)
    assert outs[-1].finished and outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 40


def test_stop_string_cuts_text_and_never_leaks_a_partial_stop(engine: LLMEngine, llama: LoadedModel) -> None:
    prompt = random_prompts(1, 20, 20, 4)[0]
    full = engine.tokenizer.decode(hf_greedy(llama, prompt, 30), skip_special_tokens=True)
    stop = full[12:16]
    engine.add_request("s", prompt, {"max_tokens": 30, "temperature": 0, "stop": [stop, "never-seen"]})
    outs = drain(engine)
    text = "".join(o.new_text for o in outs)
    assert text == full[:full.index(stop)]
    assert outs[-1].finish_reason == "stop"
    for i in range(1, len(outs)):  # no streamed prefix ever contains the stop string's start
        assert stop not in "".join(o.new_text for o in outs[:i])


def test_stop_token_ids_stop_after_emitting_the_token(engine: LLMEngine, llama: LoadedModel) -> None:
    prompt = random_prompts(1, 15, 15, 6)[0]
    ref = hf_greedy(llama, prompt, 20)
    engine.add_request("t", prompt, {"max_tokens": 20, "temperature": 0, "stop_token_ids": [ref[3]]})
    tokens = [t for o in drain(engine) for t in o.new_token_ids]
    assert tokens == ref[:ref.index(ref[3]) + 1]


def test_seeded_sampling_is_reproducible_whatever_the_batch(llama: LoadedModel) -> None:
    prompt = random_prompts(1, 12, 12, 2)[0]
    params = {"max_tokens": 16, "temperature": 0.9, "top_p": 0.9, "top_k": 50, "seed": 1234}

    def sample(others: int) -> list[int]:
        engine = LLMEngine(EngineConfig(num_kv_blocks=256), llama)
        engine.add_request("x", prompt, params)
        for i in range(others):
            engine.add_request(f"o{i}", random_prompts(1, 5, 40, i)[0], {"max_tokens": 10, "temperature": 1.0})
        return [t for o in drain(engine) if o.request_id == "x" for t in o.new_token_ids]

    first = sample(0)
    assert first == sample(5)
    assert first != hf_greedy(llama, prompt, 16)  # sampling really happened


def test_top_k_one_is_greedy(engine: LLMEngine, llama: LoadedModel) -> None:
    prompt = random_prompts(1, 10, 10, 8)[0]
    engine.add_request("k", prompt, {"max_tokens": 12, "temperature": 1.5, "top_k": 1})
    assert [t for o in drain(engine) for t in o.new_token_ids] == hf_greedy(llama, prompt, 12)


def test_top_p_keeps_the_nucleus_only() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = apply_temperature_top_k_top_p(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert torch.isfinite(kept).tolist() == [True, True, False, False]


@pytest.mark.parametrize(("prompt", "params", "match"), [
    ([], {"max_tokens": 4}, "prompt is empty"),
    ([5] * 600, {"max_tokens": 4}, "maximum context length is 512"),
    ([5] * 500, {"max_tokens": 100}, "asks for 600"),
    ([5, 99999], {"max_tokens": 4}, "outside the vocabulary"),
    ([5], {"max_tokens": 0}, "max_tokens"),
    ([5], {"max_tokens": -3}, "max_tokens"),
    ([5], {"temperature": -1}, "temperature"),
    ([5], {"top_p": 1.5}, "top_p"),
    ([5], {"top_k": -2}, "top_k"),
    ([5], {"frobnicate": 1}, "frobnicate"),
    ([5], {"stop": [""]}, "stop strings must not be empty"),
])
def test_bad_input_is_a_clear_error_for_that_request_only(engine: LLMEngine, prompt: list[int], params: dict,
                                                           match: str) -> None:
    engine.add_request("good", [5, 6, 7], {"max_tokens": 5, "temperature": 0})
    with pytest.raises(InvalidRequestError, match=match):
        engine.add_request("bad", prompt, params)
    outs = drain(engine)
    assert [o.request_id for o in outs if o.finished] == ["good"]


def test_request_larger_than_the_pool_is_refused_up_front(llama: LoadedModel) -> None:
    engine = LLMEngine(EngineConfig(num_kv_blocks=4, block_size=4), llama)
    with pytest.raises(InvalidRequestError, match="maximum context length is 16 tokens"):
        engine.add_request("big", [5] * 30, {"max_tokens": 4})


def test_a_pool_smaller_than_the_context_is_the_context_it_advertises(llama: LoadedModel) -> None:
    """The router defaults a chat's max_tokens to the context left after the prompt: a worker that
    advertised the model's 2,048 tokens with a pool of 1,024 refused every chat sent without max_tokens."""
    engine = LLMEngine(EngineConfig(num_kv_blocks=8, block_size=16), llama)
    assert engine.max_model_len == 128 < llama.max_model_len
    prompt = [5] * 100
    engine.add_request("fits", prompt, {"max_tokens": 128 - len(prompt), "temperature": 0, "ignore_eos": True})
    out = [o for _ in range(200) if engine.has_unfinished() for o in engine.step() if o.finished]
    assert out[0].num_output_tokens == 28


def test_duplicate_request_id_is_refused(engine: LLMEngine) -> None:
    engine.add_request("dup", [5, 6], {"max_tokens": 3})
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("dup", [5, 6], {"max_tokens": 3})


def test_abort_frees_blocks_and_ends_the_stream(engine: LLMEngine) -> None:
    engine.add_request("a", [5] * 40, {"max_tokens": 50, "temperature": 0})
    engine.add_request("b", [6] * 40, {"max_tokens": 5, "temperature": 0})
    engine.step()
    assert engine.abort("a")
    outs = drain(engine)
    aborted = [o for o in outs if o.request_id == "a"]
    assert aborted and aborted[-1].finished and aborted[-1].finish_reason == "abort"
    assert [o for o in outs if o.request_id == "b"][-1].finish_reason == "length"
    assert engine.block_manager.usage == 0


def test_failed_step_fails_its_requests_not_the_engine(engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    engine.add_request("x", [5, 6, 7], {"max_tokens": 3, "temperature": 0})
    original = engine.runner.execute
    monkeypatch.setattr(engine.runner, "execute", lambda out: (_ for _ in ()).throw(RuntimeError("boom")))
    (out,) = engine.step()
    assert out.finished and out.finish_reason == "error" and "boom" in out.error
    monkeypatch.setattr(engine.runner, "execute", original)
    engine.add_request("y", [5, 6, 7], {"max_tokens": 3, "temperature": 0})
    assert drain(engine)[-1].finish_reason == "length"
    assert engine.block_manager.usage == 0


def test_detokenizer_handles_multibyte_characters(llama: LoadedModel) -> None:
    tok = llama.tokenizer
    text = "Grüße, 東京 — ok"
    ids = tok(text)["input_ids"]
    detok = IncrementalDetokenizer(tok, [5, 6])
    for t in ids:
        detok.add_token(t)
    assert detok.take_new_text(finished=True) == text


@pytest.mark.parametrize("cached_blocks", [0, 2])
def test_kv_export_import_continues_exactly(llama: LoadedModel, cached_blocks: int) -> None:
    """Prefill in one engine, move the KV blocks, decode in another: equal to HF generate."""
    prompt = random_prompts(1, 70, 70, 31)[0]
    prefill = LLMEngine(EngineConfig(num_kv_blocks=64), llama)
    decode = LLMEngine(EngineConfig(num_kv_blocks=64), llama)
    if cached_blocks:  # the decode side already holds part of the prompt
        decode.generate([prompt[:cached_blocks * 16 + 3]], {"max_tokens": 1, "temperature": 0})
    params = {"max_tokens": 20, "temperature": 0}
    cached = decode.reserve_for_import("r", prompt, params)
    assert cached == cached_blocks * 16
    prefill.add_request("r", prompt, {**params, "max_tokens": 1}, hold_kv=True)
    first = [t for o in drain(prefill) for t in o.new_token_ids]
    k, v = prefill.export_kv("r", first_block=cached // 16)
    prefill.release("r")
    assert prefill.block_manager.usage == 0
    decode.import_kv("r", cached // 16, k, v)
    out = decode.commit_import("r", first[0])
    tokens = out.new_token_ids + [t for o in drain(decode) for t in o.new_token_ids]
    assert tokens == hf_greedy(llama, prompt, 20)
    assert decode.block_manager.usage == 0


def test_import_fallback_prefills_locally(llama: LoadedModel) -> None:
    prompt = random_prompts(1, 50, 50, 12)[0]
    decode = LLMEngine(EngineConfig(num_kv_blocks=64), llama)
    assert decode.reserve_for_import("r", prompt, {"max_tokens": 10, "temperature": 0}) == 0
    decode.fallback_to_local("r")
    tokens = [t for o in drain(decode) for t in o.new_token_ids]
    assert tokens == hf_greedy(llama, prompt, 10)


def test_import_rejects_misshapen_kv(llama: LoadedModel) -> None:
    decode = LLMEngine(EngineConfig(num_kv_blocks=64), llama)
    decode.reserve_for_import("r", [5] * 40, {"max_tokens": 4})
    with pytest.raises(ValueError, match="does not fit"):
        decode.import_kv("r", 0, torch.zeros(4, 3, 16, 2, 31), torch.zeros(4, 3, 16, 2, 31))
    with pytest.raises(ValueError, match="outside the importable range"):
        decode.import_kv("r", 2, torch.zeros(4, 3, 16, 2, 32), torch.zeros(4, 3, 16, 2, 32))


def test_trailing_incomplete_character_is_flushed_like_decode(llama: LoadedModel) -> None:
    tok = llama.tokenizer
    ids = tok("ok 東")["input_ids"]
    partial = ids[:-1] if len(tok.convert_ids_to_tokens(ids[-1:])[0]) else ids
    detok = IncrementalDetokenizer(tok, [5])
    for t in partial:
        detok.add_token(t)
    assert detok.take_new_text(finished=True) == tok.decode(partial)


def test_a_prompt_ending_inside_a_character_does_not_take_the_outputs_bytes(llama: LoadedModel) -> None:
    """A prompt sent as token ids may end inside a multi-byte character; the streamed text is still what
    ``decode`` makes of the output tokens alone (the prompt's partial character once swallowed them)."""
    import random

    tok = llama.tokenizer
    partial = [i for i in range(len(tok)) if "\ufffd" in tok.decode([i])]  # single bytes >= 0x80
    rng = random.Random(0)
    cases = [([159], [121, 231]), ([148, 142], [107, 144, 252, 155, 189, 519])]
    def token() -> int:
        return rng.choice(partial) if rng.random() < 0.5 else rng.randrange(len(tok))

    cases += [([token() for _ in range(rng.randint(1, 8))], [token() for _ in range(rng.randint(1, 12))])
              for _ in range(300)]
    for prompt, out in cases:
        detok = IncrementalDetokenizer(tok, prompt)
        text = ""
        for n, t in enumerate(out):
            detok.add_token(t)
            text += detok.take_new_text(finished=n == len(out) - 1)
        assert text == tok.decode(out, skip_special_tokens=True), (prompt, out)


def test_an_id_without_text_adds_no_text(llama: LoadedModel) -> None:
    """Models pad their embedding past the tokenizer's vocabulary; the tokenizer has no token for
    such an id (None). It must add no text rather than break the request's detokenizer."""
    tok = llama.tokenizer
    beyond = len(tok) + 3
    assert tok.convert_ids_to_tokens([beyond])[0] is None
    detok = IncrementalDetokenizer(tok, [5, beyond])
    detok.add_token(beyond)
    ids = tok("fine")["input_ids"]
    for t in ids:
        detok.add_token(t)
    assert detok.take_new_text(finished=True) == tok.decode(ids)


def test_failed_text_fails_that_request_only(engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    engine.add_request("bad", [5, 6, 7], {"max_tokens": 5, "temperature": 0})
    engine.add_request("good", [5, 6, 8], {"max_tokens": 5, "temperature": 0})
    monkeypatch.setattr(engine._tracked["bad"].detok, "add_token",
                        lambda token: (_ for _ in ()).throw(TypeError("no text for this id")))
    outs = drain(engine)
    bad = [o for o in outs if o.request_id == "bad"]
    assert bad[-1].finish_reason == "error" and "no text for this id" in bad[-1].error
    good = [o for o in outs if o.request_id == "good"]
    assert good[-1].finish_reason == "length" and sum(len(o.new_token_ids) for o in good) == 5
    assert engine.block_manager.usage == 0


def test_non_finite_logits_fail_that_request_only(engine: LLMEngine, llama: LoadedModel,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A row of NaN logits (a degenerate penalty, a broken kernel) failed the whole step before: every
    request batched with it ended with an error."""
    prompt = random_prompts(1, 12, 12, 6)[0]
    sample = engine.sampler.sample

    def with_a_broken_row(logits: torch.Tensor, requests: list) -> list[int]:
        logits = logits.clone()  # the runner's is an inference tensor
        for i, req in enumerate(requests):
            if req.request_id == "bad":
                logits[i] = float("nan")
        return sample(logits, requests)

    monkeypatch.setattr(engine.sampler, "sample", with_a_broken_row)
    engine.add_request("good", prompt, {"max_tokens": 6, "temperature": 0})
    engine.add_request("bad", prompt, {"max_tokens": 6, "temperature": 1.0})
    outs = drain(engine)
    bad = [o for o in outs if o.request_id == "bad"]
    assert bad[-1].finish_reason == "error" and "not finite" in bad[-1].error
    assert [t for o in outs if o.request_id == "good" for t in o.new_token_ids] == hf_greedy(llama, prompt, 6)
    assert engine.block_manager.usage == 0


def test_vanishing_temperature_is_greedy(engine: LLMEngine, llama: LoadedModel) -> None:
    """logits / 1e-30 overflows to inf and NaN probabilities: such a temperature samples as argmax."""
    prompt = random_prompts(1, 12, 12, 5)[0]
    engine.add_request("t", prompt, {"max_tokens": 6, "temperature": 1e-30})
    assert [t for o in drain(engine) for t in o.new_token_ids] == hf_greedy(llama, prompt, 6)


def test_fallback_times_and_counts_the_local_prefill_afresh(llama: LoadedModel) -> None:
    decode = LLMEngine(EngineConfig(num_kv_blocks=64), llama)
    decode.reserve_for_import("r", [5] * 40, {"max_tokens": 2, "temperature": 0})
    decode.fallback_to_local("r")
    req = decode.get_request("r")
    assert req.first_scheduled_time is None and req.num_cached_tokens == 0
    drain(decode)
    assert req.first_scheduled_time is not None


def test_a_stop_string_completed_by_the_last_allowed_token_finishes_with_stop(engine: LLMEngine,
                                                                             llama: LoadedModel) -> None:
    prompt = random_prompts(1, 20, 20, 4)[0]
    tokens = hf_greedy(llama, prompt, 30)
    n = next(k for k in range(12, 31)  # a length whose text's last 3 characters appear nowhere before
             if len(text := engine.tokenizer.decode(tokens[:k], skip_special_tokens=True)) > 3
             and text[-3:] not in text[:-1])
    text = engine.tokenizer.decode(tokens[:n], skip_special_tokens=True)
    engine.add_request("s", prompt, {"max_tokens": n, "temperature": 0, "stop": [text[-3:]]})
    outs = drain(engine)
    assert "".join(o.new_text for o in outs) == text[:-3]
    assert outs[-1].finish_reason == "stop"  # the text was cut: "length" would be a lie


def test_a_held_request_that_fails_frees_its_blocks(engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    engine.add_request("held", [5, 6, 7, 8, 9], {"max_tokens": 1, "temperature": 0}, hold_kv=True)
    monkeypatch.setattr(engine._tracked["held"].detok, "add_token",
                        lambda token: (_ for _ in ()).throw(TypeError("no text for this id")))
    outs = drain(engine)
    assert outs[-1].finish_reason == "error"
    assert "held" not in engine.scheduler.held and engine.block_manager.usage == 0


def test_a_step_that_can_run_nothing_reports_a_stall(llama: LoadedModel) -> None:
    engine = LLMEngine(EngineConfig(num_kv_blocks=4, block_size=4, max_model_len=16), llama)
    engine.add_request("held", list(range(5, 18)), {"max_tokens": 1, "temperature": 0}, hold_kv=True)
    drain(engine)  # its KV waits for an export: every block is held
    engine.add_request("waits", [5, 6, 7], {"max_tokens": 2, "temperature": 0})
    assert engine.step() == [] and engine.stalled  # the async loop then waits instead of spinning
    engine.release("held")
    outs = drain(engine)
    assert not engine.stalled and outs[-1].finished and outs[-1].num_output_tokens == 2


def test_releasing_a_request_that_still_runs_aborts_it(engine: LLMEngine, llama: LoadedModel) -> None:
    """Forgotten while still scheduled, it ran on untracked, and a new request could take its id."""
    first, second = random_prompts(2, 20, 20, 5)
    engine.add_request("x", first, {"max_tokens": 5, "temperature": 0, "ignore_eos": True}, hold_kv=True)
    engine.step()
    engine.release("x")
    assert not engine.scheduler.has_work() or all(r.request_id != "x" for r in engine.scheduler.running)
    engine.add_request("x", second, {"max_tokens": 10, "temperature": 0, "ignore_eos": True})
    outs = [o for o in drain(engine) if o.request_id == "x"]
    assert outs[0].finish_reason == "abort"  # the first one's end, then only the second's tokens
    assert [t for o in outs[1:] for t in o.new_token_ids] == hf_greedy(llama, second, 10)
    assert engine.block_manager.usage == 0


def test_warm_up_runs_a_request_and_leaves_no_trace(llama: LoadedModel) -> None:
    engine = LLMEngine(EngineConfig(num_kv_blocks=64), llama)
    assert engine.warm_up() > 0
    bm = engine.block_manager
    assert not engine.has_unfinished() and bm.usage == 0 and bm.cached_hashes() == []
    assert (engine.steps, engine.busy_seconds, bm.prefix_queries_tokens) == (0, 0.0, 0)
    assert bm.enable_prefix_caching
    [req] = engine.generate([[5, 6, 7]], {"max_tokens": 4, "temperature": 0})
    assert req.output_token_ids == hf_greedy(llama, [5, 6, 7], 4)


def test_warm_up_fits_the_smallest_context(llama: LoadedModel) -> None:
    engine = LLMEngine(EngineConfig(num_kv_blocks=64, max_model_len=2), llama)
    assert engine.warm_up() > 0 and not engine.has_unfinished()


@pytest.mark.parametrize(("bias", "named"), [
    ({"7": 1.0, "5": 200.0}, "logit_bias['5'] (the bias)"),
    ({3: -100.5}, "logit_bias[3] (the bias)"),
    ({"-3": 1.0}, "logit_bias['-3'] (the token id)"),
])
def test_a_bad_logit_bias_entry_is_named_by_its_token_id(bias: dict[object, float], named: str) -> None:
    """The message named the pair by its position ("logit_bias.1.1"), which the client never wrote."""
    with pytest.raises(InvalidRequestError) as exc:
        SamplingParams.parse(logit_bias=bias)
    assert named in str(exc.value) and exc.value.param == "logit_bias"
