"""Incremental detokenization and stop strings for one request.

Text is produced token by token with a few prompt tokens as context (so leading spaces and multi-byte
characters come out as ``tokenizer.decode`` would produce them), and text that might still turn into
a stop string is held back: a client never sees part of a stop string.

Stop strings are matched as the text streams, one character at a time, by a Knuth-Morris-Pratt
automaton per string (``StopMatcher``): the text ends where the first stop string to complete begins,
whatever the tokens' boundaries, and each character costs O(1) per stop string (amortised), however
long the strings or the text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_CONTEXT_TOKENS = 5


def _prefix_function(s: str) -> list[int]:
    """``pi[i]``: the length of the longest proper prefix of ``s[:i + 1]`` that is also its suffix."""
    pi = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = pi[k - 1]
        if s[i] == s[k]:
            k += 1
        pi[i] = k
    return pi


class StopMatcher:
    """Where the first stop string completes in a stream of text, and how much of the text's end may
    still begin one. ``states[i]``: how many leading characters of stop string ``i`` the text ends with."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self._pi = [_prefix_function(s) for s in self.stops]
        self.states = [0] * len(self.stops)

    def feed(self, text: str, states: list[int] | None = None) -> int | None:
        """Advance over ``text`` (``states``: a copy to advance instead, for a look that commits nothing).
        Returns the index in ``text`` just past the first stop string to complete (None: none did); the
        states then stop there."""
        states = self.states if states is None else states
        for pos, ch in enumerate(text):
            done = False
            for i, stop in enumerate(self.stops):
                k = states[i]
                if k == len(stop):
                    k = self._pi[i][k - 1]
                while k and stop[k] != ch:
                    k = self._pi[i][k - 1]
                if stop[k] == ch:
                    k += 1
                states[i] = k
                done = done or k == len(stop)
            if done:
                return pos + 1
        return None

    def match_start(self, end: int) -> int:
        """Where the stop string completed at ``end`` begins (the earliest, if several completed there)."""
        return end - max(len(s) for s, k in zip(self.stops, self.states, strict=True) if k == len(s))

    def held_back(self) -> int:
        """Characters at the end of the text that are a proper prefix of some stop string."""
        return max((k for s, k in zip(self.stops, self.states, strict=True) if k < len(s)), default=0)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], stop: Sequence[str] = (),
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = tuple(stop)
        context = self._to_tokens(list(prompt_token_ids[-(_CONTEXT_TOKENS + 1):]))
        # A prompt (sent as token ids) may end inside a multi-byte character: output bytes must not
        # complete it, since the output's text is what ``decode`` makes of the output tokens alone.
        while context and self.tokenizer.convert_tokens_to_string(context).endswith("\ufffd"):
            context.pop()
        self._tokens: list[str] = context
        self._prefix_offset = max(len(self._tokens) - _CONTEXT_TOKENS, 0)
        self._read_offset = len(self._tokens)
        self.text = ""
        self._emitted = 0
        self.stopped = False
        self._matcher = StopMatcher(self.stop)

    def add_token(self, token_id: int) -> bool:
        """Append one generated token; returns True when a stop string completed (text is cut before it)."""
        new_tokens = self._to_tokens([token_id])
        if not new_tokens:
            return False
        self._tokens.extend(new_tokens)
        prefix = self.tokenizer.convert_tokens_to_string(self._tokens[self._prefix_offset:self._read_offset])
        full = self.tokenizer.convert_tokens_to_string(self._tokens[self._prefix_offset:])
        if len(full) <= len(prefix):
            return False
        if full.endswith("\ufffd"):
            # an incomplete multi-byte character: its text waits for the next token, but the complete
            # characters before it are final, and a stop string they finish ends the request now
            settled = full[len(prefix):].rstrip("\ufffd")
            if self.stop and self._matcher.feed(settled, list(self._matcher.states)) is not None:
                return self._append(settled)
            return False
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        return self._append(full[len(prefix):])

    def _to_tokens(self, ids: list[int]) -> list[str]:
        # Models often pad the embedding past the tokenizer's vocabulary; such an id has no text
        # (the tokenizer returns None for it), so it contributes none.
        tokens = self.tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=self.skip_special_tokens)
        return [t for t in tokens if t is not None]

    def _append(self, new_text: str) -> bool:
        """Add text; True when a stop string completed in it (the text then ends where it begins)."""
        end = self._matcher.feed(new_text) if self.stop else None
        if end is None:
            self.text += new_text
            return False
        self.text = (self.text + new_text[:end])[:len(self.text) + self._matcher.match_start(end)]
        self.stopped = True
        return True

    def flush(self) -> bool:
        """At the end, emit what was held back for an incomplete character (as ``decode`` would show it);
        True when that completed a stop string."""
        if self.stopped or self._read_offset >= len(self._tokens):
            return self.stopped
        prefix = self.tokenizer.convert_tokens_to_string(self._tokens[self._prefix_offset:self._read_offset])
        full = self.tokenizer.convert_tokens_to_string(self._tokens[self._prefix_offset:])
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        return self._append(full[len(prefix):])

    def take_new_text(self, finished: bool) -> str:
        """Text not yet handed out; while running, a possible stop-string prefix stays back."""
        if finished:
            self.flush()
        end = len(self.text) if finished else len(self.text) - self._matcher.held_back()
        end = max(end, self._emitted)
        out = self.text[self._emitted:end]
        self._emitted = end
        return out
