"""Stop strings as the text streams: the KMP matcher against a brute-force reference, a stop string
inside a token that ends in an incomplete character, and the limits on what a request may ask for."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from disagg_worker.engine.detokenizer import IncrementalDetokenizer, StopMatcher
from disagg_worker.engine.request import MAX_STOP_CHARS, SamplingParams


def first_stop(text: str, stops: list[str]) -> int | None:
    """Reference: the text is cut where the first stop string to complete (reading left to right) begins;
    of several completing at one character, the longest."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if end >= len(s) and text[end - len(s):end] == s]
        if starts:
            return min(starts)
    return None


def held_back(text: str, stops: list[str]) -> int:
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


alphabet = st.sampled_from("aab¢東")  # few letters, so stop strings overlap and repeat often


@settings(max_examples=400, deadline=None)
@given(st.lists(st.text(alphabet, min_size=1, max_size=6), min_size=1, max_size=4),
       st.lists(st.text(alphabet, max_size=5), max_size=8))
def test_matcher_cuts_where_the_first_stop_string_completes_whatever_the_chunks(stops: list[str],
                                                                                 chunks: list[str]) -> None:
    matcher = StopMatcher(stops)
    seen = ""
    for chunk in chunks:
        end = matcher.feed(chunk)
        if end is not None:
            assert len(seen) + matcher.match_start(end) == first_stop(seen + chunk, stops)
            return
        seen += chunk
        assert first_stop(seen, stops) is None
        assert matcher.held_back() == held_back(seen, stops)


def test_a_look_ahead_commits_nothing() -> None:
    matcher = StopMatcher(["abc"])
    matcher.feed("xab")
    assert matcher.feed("c", list(matcher.states)) == 1
    assert matcher.held_back() == 2 and matcher.feed("c") == 1


@pytest.fixture(scope="module")
def partial_char_tokenizer():
    """A byte-level BPE with a token that is "!" plus the first two bytes of a three-byte character, as
    real tokenizers have (GPT-2 style "Ġâ€"); the built-in presets' tokenizer has none."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    # "!" before dashes, ellipses and quotes: three-byte characters
    corpus = "!\u2014 !\u2013 !\u2026 !\u2018 !\u2019 !\u201c !\u201d !\u2022"
    bpe.train_from_iterator([corpus] * 50, trainers.BpeTrainer(
        vocab_size=258, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    ids = tok.encode("Hi!\u2014")
    assert tok.decode(ids[2:3]) == "!\ufffd", "the tokenizer has no '!' + partial character token"
    return tok, ids


@pytest.mark.parametrize("last", [True, False], ids=["ends-on-that-token", "more-tokens-follow"])
def test_a_stop_string_before_an_incomplete_character_stops_at_that_token(partial_char_tokenizer, last: bool) -> None:
    tok, ids = partial_char_tokenizer
    out = ids[1:3] if last else ids[1:]  # "i", "!" + 2 bytes of "—" (, the last byte)
    detok = IncrementalDetokenizer(tok, ids[:1], stop=["!"])
    stopped_at = next((n for n, t in enumerate(out) if detok.add_token(t)), None)
    assert stopped_at == 1  # not one token late, and not missed when generation ends there
    assert detok.take_new_text(finished=True) == "i"


def test_stop_strings_must_be_bounded_and_valid_unicode() -> None:
    SamplingParams(stop=["x" * MAX_STOP_CHARS])
    with pytest.raises(ValueError, match="at most 1024 characters"):
        SamplingParams(stop=["x" * (MAX_STOP_CHARS + 1)])
    with pytest.raises(ValueError, match="lone surrogate"):
        SamplingParams(stop=["\ud800x"])
