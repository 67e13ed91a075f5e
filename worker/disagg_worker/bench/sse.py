"""Incremental Server-Sent Events parsing for OpenAI streaming completions (pure, no I/O).

:class:`SSEParser` takes raw bytes as they arrive (split anywhere, even inside a UTF-8 character or a
``\\r\\n``) and returns complete events' ``data`` payloads. :func:`interpret` turns one payload of
``POST /v1/completions`` with ``"stream": true`` into a :class:`StreamEvent`: a token chunk, the final
usage chunk, an in-stream error, or ``[DONE]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

DONE = "[DONE]"


class SSEParser:
    """Feed bytes, get the ``data`` of each event completed so far (multi-line data joined by ``\\n``).

    Follows the SSE rules that matter for OpenAI streams: events end at a blank line; lines end with
    ``\\n``, ``\\r\\n`` or ``\\r``; ``:`` lines are comments; one optional space after ``data:`` is
    dropped; fields other than ``data`` are ignored.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[str]:
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the \n of a \r\n split across two chunks
        self._pending_cr = False
        self._buf += chunk
        out: list[str] = []
        while True:
            line, ending = self._next_line()
            if line is None:
                break
            if ending == b"\r" and not self._buf:
                self._pending_cr = True
            self._line(line, out)
        return out

    def close(self) -> list[str]:
        """End of stream: a final event that lacked its blank line is still delivered."""
        out: list[str] = []
        if self._buf:
            self._line(self._buf, out)
            self._buf = b""
        self._line(b"", out)
        return out

    def _next_line(self) -> tuple[bytes | None, bytes]:
        buf = self._buf
        n, r = buf.find(b"\n"), buf.find(b"\r")
        if n < 0 and r < 0:
            return None, b""
        if r >= 0 and (n < 0 or r < n):
            if r + 1 < len(buf) and buf[r + 1:r + 2] == b"\n":
                self._buf = buf[r + 2:]
                return buf[:r], b"\r\n"
            self._buf = buf[r + 1:]
            return buf[:r], b"\r"
        self._buf = buf[n + 1:]
        return buf[:n], b"\n"

    def _line(self, raw: bytes, out: list[str]) -> None:
        if not raw:
            if self._data:
                out.append("\n".join(self._data))
                self._data = []
            return
        line = raw.decode("utf-8", errors="replace")
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)


@dataclass(frozen=True)
class StreamEvent:
    """What one ``data`` payload of a completions stream means to the benchmark."""

    type: Literal["token", "usage", "done", "error", "other"]
    text: str = ""
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None


def interpret(data: str) -> StreamEvent:
    """Classify one SSE payload of an OpenAI (chat) completions stream.

    A chunk counts as a token chunk when it has a choice carrying text, or an empty text without a
    ``finish_reason`` (a token whose text the detokenizer is still holding back). A choice with empty
    text and a ``finish_reason`` only ends the stream; a chunk with no choices and a ``usage`` object is
    the usage chunk (``stream_options.include_usage``). A chunk may be both a token and carry usage.
    """
    if data.strip() == DONE:
        return StreamEvent("done")
    try:
        obj: Any = json.loads(data)
    except json.JSONDecodeError:
        return StreamEvent("error", error=f"malformed SSE data: {data[:200]!r}")
    if not isinstance(obj, dict):
        return StreamEvent("other")
    if obj.get("error"):
        err = obj["error"]
        msg = err.get("message", str(err)) if isinstance(err, dict) else str(err)
        return StreamEvent("error", error=str(msg)[:500])
    usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else None
    completion_tokens = _int_or_none(usage.get("completion_tokens")) if usage else None
    prompt_tokens = _int_or_none(usage.get("prompt_tokens")) if usage else None
    choices = obj.get("choices") or []
    if choices and isinstance(choices[0], dict):
        choice = choices[0]
        text = choice.get("text")
        if text is None:  # chat completions
            delta = choice.get("delta") or {}
            text = delta.get("content") or ""
        finish = choice.get("finish_reason")
        if text or finish is None:
            return StreamEvent("token", text=text, completion_tokens=completion_tokens, prompt_tokens=prompt_tokens,
                               finish_reason=finish)
        return StreamEvent("usage" if usage else "other", completion_tokens=completion_tokens,
                           prompt_tokens=prompt_tokens, finish_reason=finish)
    if usage:
        return StreamEvent("usage", completion_tokens=completion_tokens, prompt_tokens=prompt_tokens)
    return StreamEvent("other")


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
