"""The router's HTTP surface: OpenAI ``/v1/completions``, ``/v1/chat/completions`` (SSE or JSON),
``/v1/models``, and ``/health``, ``/ready``, ``/metrics``. Errors use OpenAI's error JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from disagg_worker import metrics as m
from disagg_worker.router.openai_schema import APIError, ChatCompletionRequest, CompletionRequest, error_body
from disagg_worker.router.service import RouterService, StreamResult

log = logging.getLogger(__name__)


def internal_error(exc: BaseException, where: str) -> APIError:
    """A 500 for a client: an id to find the traceback in the router's log, not the exception's text
    (which can name files, hosts and internals)."""
    error_id = uuid.uuid4().hex[:12]
    log.error("internal error %s in %s", error_id, where, exc_info=exc)
    return APIError(500, f"internal error {error_id}: the router's log has the details", "server_error")
DEFAULT_MAX_BODY_BYTES = 16 << 20
# Text up to this long is tokenized on the event loop (well under a millisecond): a few huge prompts
# in the thread pool must not hold up every small request behind them.
INLINE_TOKENIZE_CHARS = 8192
MESSAGE_OVERHEAD_CHARS = 16  # what a chat template adds per message, at the least (Llama 3's adds ~20)


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets a 413 in OpenAI's error JSON, told by its
    Content-Length before anything is read, or (chunked) as soon as the bytes read pass the limit."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _error(self) -> JSONResponse:
        return JSONResponse(error_body(f"the request body is larger than {self.max_bytes} bytes",
                                       code="request_too_large"), status_code=413)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            m.ROUTER_REQUESTS.labels("other", "413").inc()
            return await self._error()(scope, receive, send)
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, f"the request body is larger than {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def _usage(r: StreamResult) -> dict[str, Any]:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.output_tokens,
            "total_tokens": r.prompt_tokens + r.output_tokens,
            "prompt_tokens_details": {"cached_tokens": r.cached_tokens}}


def _total(results: list[StreamResult]) -> StreamResult:
    """Token counts of all choices together (the response's ``usage``)."""
    return StreamResult(prompt_tokens=sum(r.prompt_tokens for r in results),
                        cached_tokens=sum(r.cached_tokens for r in results),
                        output_tokens=sum(r.output_tokens for r in results))


class ClientDisconnected(Exception):
    """The HTTP client went away before its answer was ready."""


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects (the request body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Any) -> Any:
    """Await ``work``; if the client disconnects first, cancel it and raise ClientDisconnected, so a
    request nobody waits for stops generating instead of running to max_tokens."""
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected
    return task.result()


async def _all_or_nothing(coros: list[Any]) -> list[Any]:
    """Run ``coros`` concurrently; on the first failure cancel the others and wait for them, so the
    streams they iterate can be closed safely."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# pydantic's names for the branches of a union, which it puts in an error's location
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "list[int]", "list[str]", "list[list[int]]",
                        "function-after", "json-or-python", "literal"})


def route_label(request: Request) -> str:
    """The matched route's template (``/v1/models/{model_id:path}``), never the raw path: a metric label
    per requested URL would grow without bound."""
    route = request.scope.get("route")
    return getattr(route, "path", None) or "other"


def build_app(service: RouterService, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="disagg router", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    m.register_router_metrics()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        m.ROUTER_REQUESTS.labels(route_label(request), str(exc.status)).inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        m.ROUTER_REQUESTS.labels(route_label(request), "400").inc()
        if err.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the request body is not valid JSON: {err['msg']}"), status_code=400)
        loc = [str(p) for p in err["loc"][1 if err["loc"][:1] == ("body",) else 0:]]
        # OpenAI names the top-level field; the message keeps the path (without pydantic's union tags)
        path = ".".join(p for p in loc if p.isdigit() or p not in _TYPE_TAGS)
        return JSONResponse(error_body(f"{path or 'body'}: {err['msg']}", param=loc[0] if loc else None),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # unknown paths and wrong methods, in OpenAI's error shape (the path label stays bounded)
        m.ROUTER_REQUESTS.labels("other", str(exc.status_code)).inc()
        code = {404: "not_found", 413: "request_too_large"}.get(exc.status_code)
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}", param=None, code=code),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        m.ROUTER_REQUESTS.labels(route_label(request), "500").inc()
        return internal_error(exc, request.url.path).response()

    @app.get("/health")
    def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        ok = service.ready()
        return JSONResponse({"ready": ok, "decode_workers": len(service.decode_pool.healthy()),
                             "prefill_workers": len(service.prefill_pool.healthy())}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        m.WORKERS_HEALTHY.labels("decode").set(len(service.decode_pool.healthy()))
        m.WORKERS_HEALTHY.labels("prefill").set(len(service.prefill_pool.healthy()))
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict[str, Any]:
        return {"id": service.model_name, "object": "model", "created": 0, "owned_by": "disagg",
                "max_model_len": service.context_limit()}

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> JSONResponse:
        check_model(model_id)
        return JSONResponse(model_card())

    def check_model(name: str) -> None:
        if name != service.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {service.model_name!r}",
                           param="model", code="model_not_found")

    def priority_of(body: Any) -> str:
        if not service.policy.qos.priority_scheduling:
            return "high"  # QoS off: every request is one class (admitted, served in arrival order)
        return body.priority or service.policy.qos.default_priority

    def tokenize(texts: list[str]) -> list[list[int]]:
        # with the tokenizer's special tokens (BOS for Llama-family models), as other OpenAI servers do
        return [service.tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]

    async def off_loop_if_long(chars: int, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Long text is tokenized off the event loop (it must not stall every other stream); short text
        on it (it must not wait behind long text in the thread pool)."""
        if chars <= INLINE_TOKENIZE_CHARS:
            return fn(*args, **kwargs)
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def prompt_ids_of(prompt: Any) -> list[list[int]]:
        texts = [prompt] if isinstance(prompt, str) else prompt
        if not texts:
            raise APIError(400, "the prompt is empty", param="prompt")
        if all(isinstance(t, int) for t in texts):
            return [list(texts)]
        if all(isinstance(t, str) for t in texts):
            for text in texts:
                service.check_text_fits(len(text), "prompt")
            return await off_loop_if_long(sum(map(len, texts)), tokenize, texts)
        return [list(p) for p in texts]

    def max_tokens_of(body: Any, prompt_len: int, default: int | None) -> int:
        # chat only: a completion request's unknown fields are kept untyped, so it must not read one
        value = body.max_completion_tokens if isinstance(body, ChatCompletionRequest) else None
        if value is None:
            value = body.max_tokens
        if value is None:
            return default if default is not None else max(1, service.context_limit() - prompt_len)
        return value

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        body.check_supported()
        prompts = await prompt_ids_of(body.prompt)
        params = [service.validate(p, body.sampling(max_tokens_of(body, len(p), 16))) for p in prompts]
        return await respond(request, "text_completion", prompts, params, priority_of(body), body.streaming,
                             body.include_usage, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        body.check_supported()
        # "developer" is OpenAI's newer name for "system"; chat templates only know the latter
        messages = [{"role": "system" if msg.role == "developer" else msg.role, "content": msg.text()}
                    for msg in body.messages]
        # every message costs template text too (role markers, separators): 100k empty messages are
        # megabytes to render and tokenize, which must be refused or done off the event loop like text
        chars = sum(len(msg["content"]) + MESSAGE_OVERHEAD_CHARS for msg in messages)
        service.check_text_fits(chars, "messages")
        try:
            ids = await off_loop_if_long(chars, service.tokenizer.apply_chat_template, messages, tokenize=True,
                                         add_generation_prompt=True)
        except Exception as exc:
            raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        prompt = list(ids)
        params = service.validate(prompt, body.sampling(max_tokens_of(body, len(prompt), None)), "messages")
        return await respond(request, "chat.completion", [prompt], [params], priority_of(body), body.streaming,
                             body.include_usage, chat=True)

    async def respond(request: Request, kind: str, prompts: list[list[int]], params: list[Any], priority: str,
                      stream: bool, include_usage: bool, chat: bool) -> Response:
        admitted = service.admit(prompts, priority)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        results = [StreamResult() for _ in prompts]
        streams = [service.generate(p, a, sp, priority, r, "messages" if chat else "prompt")
                   for p, a, sp, r in zip(prompts, admitted, params, results, strict=True)]

        async def collect(first: Any, s: AsyncIterator[Any]) -> str:
            parts = [first.text] if first is not None else []
            async for msg in s:
                parts.append(msg.text)
            return "".join(parts)

        try:
            # The first message of every choice (all prompts at once) before answering, so admission
            # and routing errors become proper HTTP errors (429/503/400) rather than a broken stream.
            firsts = await _unless_disconnected(request, _all_or_nothing([anext(s, None) for s in streams]))
            if not stream:
                texts = await _unless_disconnected(request, _all_or_nothing(
                    [collect(f, s) for f, s in zip(firsts, streams, strict=True)]))
        except ClientDisconnected:
            for s in streams:
                await s.aclose()
            m.ROUTER_REQUESTS.labels(route_label(request), "499").inc()
            return Response(status_code=499)  # nobody reads it: the client is gone
        except BaseException:
            for s in streams:
                await s.aclose()
            raise
        if not stream:
            m.ROUTER_REQUESTS.labels(route_label(request), "200").inc()
            total = _total(results)
            choices = [({"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                         "finish_reason": r.finish_reason} if chat else
                        {"index": i, "text": t, "logprobs": None, "finish_reason": r.finish_reason})
                       for i, (t, r) in enumerate(zip(texts, results, strict=True))]
            return JSONResponse({"id": rid, "object": kind, "created": created, "model": service.model_name,
                                 "choices": choices, "usage": _usage(total)})
        m.ROUTER_REQUESTS.labels(route_label(request), "200").inc()
        return StreamingResponse(sse_events(rid, created, firsts, streams, results, chat, include_usage,
                                            route_label(request)),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def sse_events(rid: str, created: int, firsts: list[Any], streams: list[AsyncIterator[Any]],
                         results: list[StreamResult], chat: bool, include_usage: bool, endpoint: str
                         ) -> AsyncIterator[bytes]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> bytes:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                    {"content": text} if text else {})
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            return _sse({"id": rid, "object": kind, "created": created, "model": service.model_name,
                         "choices": [choice]})

        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        async def pump(i: int, first: Any, s: AsyncIterator[Any]) -> None:
            try:
                if first is not None:
                    await queue.put((i, first))
                async for msg in s:
                    await queue.put((i, msg))
                await queue.put((i, None))
            except APIError as exc:
                await queue.put((i, exc))
            except Exception as exc:
                await queue.put((i, internal_error(exc, "a completion stream")))
            except asyncio.CancelledError:  # never leave the reader waiting for an end that will not come
                queue.put_nowait((i, APIError(502, "the stream was cancelled", "server_error")))
                raise

        tasks = [asyncio.create_task(pump(i, f, s)) for i, (f, s) in enumerate(zip(firsts, streams, strict=True))]
        try:
            if chat:
                yield chunk(0, None, None, role=True)
            open_streams = len(tasks)
            while open_streams:
                i, item = await queue.get()
                if item is None:
                    open_streams -= 1
                    continue
                if isinstance(item, APIError):
                    # the response was counted as a 200 when it began: its failure is counted here
                    m.ROUTER_STREAM_ERRORS.labels(endpoint, str(item.status)).inc()
                    yield _sse(error_body(item.message, item.type, item.param, item.code))
                    open_streams -= 1
                    continue
                if item.text or item.finished:
                    yield chunk(i, item.text, item.finish_reason or None if item.finished else None)
            if include_usage:
                total = _total(results)
                yield _sse({"id": rid, "object": kind, "created": created, "model": service.model_name,
                            "choices": [], "usage": _usage(total)})
            yield _sse("[DONE]")
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # before closing the streams they iterate
            for s in streams:
                await s.aclose()

    return app
