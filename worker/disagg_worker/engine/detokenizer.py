"""Incremental detokenization and stop strings for one request.

Text is produced token by token with a few prompt tokens as context (so leading spaces and multi-byte
characters come out as ``tokenizer.decode`` would produce them), and text that might still turn into
a stop string is held back: a client never sees part of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], stop: Sequence[str] = (),
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = tuple(stop)
        context = list(prompt_token_ids[-(_CONTEXT_TOKENS + 1):])
        self._tokens: list[str] = self._to_tokens(context)
        self._prefix_offset = max(len(self._tokens) - _CONTEXT_TOKENS, 0)
        self._read_offset = len(self._tokens)
        self.text = ""
        self._emitted = 0
        self.stopped = False

    def add_token(self, token_id: int) -> bool:
        """Append one generated token; returns True when a stop string completed (text is cut before it)."""
        new_tokens = self._to_tokens([token_id])
        if not new_tokens:
            return False
        self._tokens.extend(new_tokens)
        prefix = self.tokenizer.convert_tokens_to_string(self._tokens[self._prefix_offset:self._read_offset])
        full = self.tokenizer.convert_tokens_to_string(self._tokens[self._prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False  # an incomplete multi-byte character: wait for the next token
        before = len(self.text)
        self.text += full[len(prefix):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        return self._cut_at_stop(before)

    def _to_tokens(self, ids: list[int]) -> list[str]:
        # Models often pad the embedding past the tokenizer's vocabulary; such an id has no text
        # (the tokenizer returns None for it), so it contributes none.
        tokens = self.tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=self.skip_special_tokens)
        return [t for t in tokens if t is not None]

    def _cut_at_stop(self, before: int) -> bool:
        if not self.stop:
            return False
        longest = max(len(s) for s in self.stop)
        search_from = max(0, before - longest + 1)
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[:min(hits)]
        self.stopped = True
        return True

    def flush(self) -> None:
        """At the end, emit what was held back for an incomplete character (as ``decode`` would show it)."""
        if self.stopped or self._read_offset >= len(self._tokens):
            return
        prefix = self.tokenizer.convert_tokens_to_string(self._tokens[self._prefix_offset:self._read_offset])
        full = self.tokenizer.convert_tokens_to_string(self._tokens[self._prefix_offset:])
        self.text += full[len(prefix):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)

    def _held_back(self) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop string."""
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held

    def take_new_text(self, finished: bool) -> str:
        """Text not yet handed out; while running, a possible stop-string prefix stays back."""
        if finished:
            self.flush()
        end = len(self.text) if finished else len(self.text) - self._held_back()
        end = max(end, self._emitted)
        out = self.text[self._emitted:end]
        self._emitted = end
        return out
