"""The router against decode workers that fail a request: real in-process gRPC servers on 127.0.0.1
with scripted streams (the engine is not what is tested here).

A worker that fails a request before its first token (an error message, or a stream that ends early)
hands it to another worker; one that fails it midway is a 502 with an error id. The client never
sees a worker's address or its error text (device and library internals), and a stream cut short is
never answered as a success."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
import pytest

from disagg_worker.policy import parse_policy
from disagg_worker.router.openai_schema import APIError
from disagg_worker.router.service import RouterService, StreamResult
from disagg_worker.rpc import pb, pb_grpc
from disagg_worker.server.peers import PeerPool
from tests.conftest import serve_scripted_worker

SECRET = "CUDA error at /opt/private/kernel.cu"


class ScriptedWorker(pb_grpc.WorkerServicer, pb_grpc.DecodeServicer):
    """``mode``: ok (4 tokens, then finished), error_first (an error before any token), truncated_first
    (ends before any token), truncated (ends after 2 tokens, never finished), hung_first (sends nothing,
    as a worker whose device hung), hung (hangs after 2 tokens)."""

    def __init__(self, mode: str) -> None:
        self.mode, self.calls = mode, 0

    async def GetLoad(self, request: pb.LoadRequest, context: grpc.aio.ServicerContext) -> pb.LoadReport:
        return pb.LoadReport(role="decode", model="m", max_model_len=64)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        self.calls += 1
        if self.mode == "invalid":  # a field only the worker can check (the vocabulary)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt token id 99 is outside the vocabulary",
                                (("disagg-param", "prompt"),))
        if self.mode == "error_first":
            yield pb.GenerateResponse(finished=True, finish_reason="error", error=f"engine step failed: {SECRET}")
            return
        if self.mode == "truncated_first":
            return
        if self.mode == "hung_first":
            await asyncio.Event().wait()
        n = 2 if self.mode in ("truncated", "hung") else 4
        for i in range(n):
            yield pb.GenerateResponse(token_ids=[i], text=str(i), output_tokens=i + 1,
                                      finished=self.mode == "ok" and i == n - 1,
                                      finish_reason="length" if self.mode == "ok" and i == n - 1 else "")
        if self.mode == "hung":
            await asyncio.Event().wait()


class NoTokenizer:
    def get_vocab(self) -> dict[str, int]:
        return {"a": 0}


@contextlib.asynccontextmanager
async def router_over(modes: list[str], idle_timeout: float = 300.0
                      ) -> AsyncIterator[tuple[RouterService, list[ScriptedWorker], list[str]]]:
    """A RouterService over scripted decode workers in ``modes``: (service, workers, their addresses);
    everything stopped afterwards."""
    workers = [ScriptedWorker(mode) for mode in modes]
    servers = [await serve_scripted_worker(w) for w in workers]
    addresses = [addr for _, addr in servers]
    pool = PeerPool("decode", addresses, poll_interval=60)
    service = RouterService(parse_policy({}), NoTokenizer(), "m", 64, pool, PeerPool("prefill", None),
                            stream_idle_timeout=idle_timeout)
    try:
        await pool.start()
        yield service, workers, addresses
    finally:
        await pool.stop()
        for server, _ in servers:
            await server.stop(None)


async def generate(modes: list[str], idle_timeout: float = 300.0
                   ) -> tuple[list[str] | APIError, list[ScriptedWorker], list[str]]:
    """One request through a RouterService over workers in ``modes``: its texts (or the APIError), the
    workers, and their addresses."""
    async with router_over(modes, idle_timeout) as (service, workers, addresses):
        prompt = [5, 6, 7]
        params = service.validate(prompt, {"max_tokens": 4, "temperature": 0})
        [admitted] = service.admit([prompt], "high")
        texts: list[str] | APIError = []
        try:
            async for msg in service.generate(prompt, admitted, params, "high", StreamResult()):
                texts.append(msg.text)
        except APIError as exc:
            texts = exc
        return texts, workers, addresses


@pytest.mark.parametrize("first", ["error_first", "truncated_first"])
def test_a_request_failed_before_its_first_token_goes_to_another_worker(first: str) -> None:
    texts, workers, _ = asyncio.run(generate([first, "ok"]))
    assert texts == ["0", "1", "2", "3"]
    # routing is least-loaded with random ties, so the failing worker may or may not have been first
    assert workers[1].calls == 1 and workers[0].calls <= 1


def test_a_request_every_worker_fails_is_a_502_without_their_addresses_or_errors(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="disagg_worker.router.service"):
        error, workers, addresses = asyncio.run(generate(["error_first", "error_first"]))
    assert isinstance(error, APIError) and error.status == 502 and error.code == "worker_failed"
    assert SECRET not in error.message and not any(a in error.message for a in addresses)
    assert [w.calls for w in workers] == [1, 1]
    error_id = error.message.split("error ")[1].split(":")[0]
    assert any(error_id in r.getMessage() and SECRET in r.getMessage() for r in caplog.records)


def test_a_stream_cut_short_after_tokens_is_a_502_not_a_success() -> None:
    texts, _, _ = asyncio.run(generate(["truncated"]))
    assert isinstance(texts, APIError) and texts.status == 502


def test_a_worker_that_hangs_before_its_first_token_hands_the_request_on() -> None:
    # a hung device keeps the worker's connection and health answers alive: only silence tells
    texts, workers, _ = asyncio.run(generate(["hung_first", "ok"], idle_timeout=0.5))
    assert texts == ["0", "1", "2", "3"]
    assert workers[1].calls == 1 and workers[0].calls <= 1


def test_a_worker_that_hangs_midway_ends_the_request_with_a_502_not_a_hang() -> None:
    texts, _, _ = asyncio.run(asyncio.wait_for(generate(["hung"], idle_timeout=0.5), 30))
    assert isinstance(texts, APIError) and texts.status == 502 and texts.code == "worker_failed"


def test_every_worker_hung_is_a_502() -> None:
    error, workers, _ = asyncio.run(asyncio.wait_for(generate(["hung_first", "hung_first"], idle_timeout=0.5), 30))
    assert isinstance(error, APIError) and error.status == 502
    assert [w.calls for w in workers] == [1, 1]


def test_a_stream_that_fails_after_its_200_is_counted_as_a_stream_error() -> None:
    """A streamed response is counted as a 200 when it begins; a worker failing it later used to leave
    no trace in the router's metrics."""
    import httpx
    from prometheus_client import REGISTRY

    from disagg_worker.router.app import build_app

    def stream_errors() -> float:
        return REGISTRY.get_sample_value("disagg_router_stream_errors_total",
                                         {"endpoint": "/v1/completions", "status": "502"}) or 0.0

    async def run() -> str:
        async with router_over(["truncated"]) as (service, _, _), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=build_app(service)), base_url="http://router") as client:
            r = await client.post("/v1/completions", json={"model": "m", "prompt": [5, 6, 7], "max_tokens": 4,
                                                           "stream": True})
            assert r.status_code == 200
            return r.text

    before = stream_errors()
    body = asyncio.run(run())
    assert '"worker_failed"' in body
    assert stream_errors() == before + 1


@pytest.mark.parametrize("prompt_param", ["prompt", "messages"])
def test_a_400_the_worker_decides_names_the_field_as_the_client_sent_it(prompt_param: str) -> None:
    async def run() -> APIError:
        async with router_over(["invalid"]) as (service, _, _):
            params = service.validate([5, 6], {"max_tokens": 2})
            [admitted] = service.admit([[5, 6]], "high")
            with pytest.raises(APIError) as exc:
                async for _ in service.generate([5, 6], admitted, params, "high", StreamResult(), prompt_param):
                    pass
            return exc.value

    error = asyncio.run(run())
    assert (error.status, error.param) == (400, prompt_param)  # chat's prompt is its messages


async def test_a_cancel_that_arrives_as_a_message_does_is_not_swallowed() -> None:
    """The router reads each message under an idle timeout. With ``asyncio.wait_for`` (Python 3.11), a
    cancel arriving just as a read completed was dropped and the message returned: a router whose
    client had disconnected read a stream on to max_tokens (reproduced 1 run in ~15 under load), and
    the decode worker never saw a cancel. Here the message and the cancel land in the same pass of the
    loop, every time."""
    from disagg_worker.router.service import read_within

    class OneMessageCall:
        def __init__(self) -> None:
            self.ready = asyncio.Event()

        async def read(self) -> str:
            await self.ready.wait()
            return "message"

    call = OneMessageCall()
    reader = asyncio.ensure_future(read_within(call, 30))
    await asyncio.sleep(0)  # the read is waiting
    call.ready.set()  # the message arrives...
    reader.cancel()  # ...and the client leaves, in the same pass of the loop
    with pytest.raises(asyncio.CancelledError):
        await reader
    with pytest.raises(TimeoutError):  # and the idle timeout still works
        await read_within(OneMessageCall(), 0.05)
    unlimited = OneMessageCall()  # None (--stream-idle-timeout 0): no limit
    unlimited.ready.set()
    assert await read_within(unlimited, None) == "message"
