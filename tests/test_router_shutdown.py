"""The router's shutdown, with a real router process on 127.0.0.1 over a scripted decode worker (an
in-process gRPC server that streams a token every 50 ms; the engine is not what is tested here).

On SIGTERM the router takes no new connection and lets the streams it holds finish, for up to
``--shutdown-timeout`` seconds; past that it cuts them, and a cut stream never ends with ``[DONE]``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest

from disagg_worker.launcher import free_port
from disagg_worker.rpc import pb, pb_grpc
from tests.conftest import serve_scripted_worker

TOKENS = 40
TOKEN_INTERVAL = 0.05  # so a stream lasts 2 s


class SlowWorker(pb_grpc.WorkerServicer, pb_grpc.DecodeServicer):
    async def GetLoad(self, request: pb.LoadRequest, context: grpc.aio.ServicerContext) -> pb.LoadReport:
        return pb.LoadReport(role="decode", model="tiny-llama", max_model_len=2048)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        for i in range(TOKENS):
            await asyncio.sleep(TOKEN_INTERVAL)
            last = i == TOKENS - 1
            yield pb.GenerateResponse(token_ids=[100 + i], text=f"t{i} ", output_tokens=i + 1, finished=last,
                                      finish_reason="length" if last else "")


@contextlib.asynccontextmanager
async def routers(*shutdown_timeouts: float) -> AsyncIterator[list[tuple[asyncio.subprocess.Process, str]]]:
    """Router processes over one slow scripted worker, one per shutdown timeout, started together (each
    takes seconds to import its tokenizer): [(the process, its base URL)]; all stopped afterwards."""
    server, address = await serve_scripted_worker(SlowWorker())
    started: list[tuple[asyncio.subprocess.Process, str]] = []
    try:
        for timeout in shutdown_timeouts:
            port = free_port()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "disagg_worker.cli", "router", "--model", "tiny-llama", "--decode-workers",
                address, "--host", "127.0.0.1", "--port", str(port), "--shutdown-timeout", str(timeout),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            started.append((proc, f"http://127.0.0.1:{port}"))
        async with httpx.AsyncClient(timeout=5) as client:
            for proc, url in started:
                for _ in range(600):
                    with contextlib.suppress(httpx.TransportError):
                        if (await client.get(f"{url}/ready")).status_code == 200:
                            break
                    assert proc.returncode is None, "a router exited while starting"
                    await asyncio.sleep(0.1)
                else:
                    pytest.fail("a router did not become ready in 60 s")
        yield started
    finally:
        for proc, _ in started:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        await server.stop(None)


async def stream_through_sigterm(proc: asyncio.subprocess.Process, url: str) -> tuple[list[str], bool, bool]:
    """Start a streamed completion, SIGTERM the router after its first token, and read on: (the texts,
    whether it ended with [DONE], whether a new connection was refused meanwhile)."""
    texts, done, refused = [], False, False
    body = {"model": "tiny-llama", "prompt": "hello", "max_tokens": TOKENS, "stream": True}
    async with httpx.AsyncClient(timeout=30) as client, client.stream("POST", f"{url}/v1/completions",
                                                                     json=body) as response:
        assert response.status_code == 200
        with contextlib.suppress(httpx.TransportError):  # a cut stream: the connection closes mid-body
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                texts.append(json.loads(line[6:])["choices"][0]["text"])
                if len(texts) == 1:
                    proc.send_signal(signal.SIGTERM)
                    await asyncio.sleep(0.3)
                    try:
                        async with httpx.AsyncClient(timeout=2) as other:
                            await other.get(f"{url}/health")
                    except httpx.ConnectError:
                        refused = True
    return texts, done, refused


async def test_sigterm_lets_the_streams_in_flight_finish_until_the_shutdown_timeout() -> None:
    async with routers(30, 0.5) as [(patient, patient_url), (hasty, hasty_url)]:
        (texts, done, refused), (cut_texts, cut_done, _) = await asyncio.gather(
            stream_through_sigterm(patient, patient_url), stream_through_sigterm(hasty, hasty_url))
        # within the timeout: the whole stream, and no new connection meanwhile
        assert done and "".join(texts) == "".join(f"t{i} " for i in range(TOKENS))
        assert refused
        assert await asyncio.wait_for(patient.wait(), 10) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
        # past it: cut, and a cut stream never ends with [DONE]
        assert not cut_done and 1 <= len(cut_texts) < TOKENS
        await asyncio.wait_for(hasty.wait(), 10)
