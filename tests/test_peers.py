"""The router's view of its workers (``PeerPool``) against real in-process gRPC servers on 127.0.0.1:
a worker that leaves DNS stops getting new requests but finishes the streams it has, and requests
routed while a load report is in flight stay counted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from disagg_worker.rpc import pb, pb_grpc
from disagg_worker.server import peers as peers_mod
from disagg_worker.server.peers import PeerPool
from tests.conftest import serve_scripted_worker


class FakeWorker(pb_grpc.WorkerServicer, pb_grpc.DecodeServicer):
    """A decode worker's gRPC surface with scripted answers (the engine is not what is tested here)."""

    def __init__(self, on_load: Callable[[], None] = lambda: None) -> None:
        self.on_load = on_load

    async def GetLoad(self, request: pb.LoadRequest, context: grpc.aio.ServicerContext) -> pb.LoadReport:
        self.on_load()
        await asyncio.sleep(0.05)
        return pb.LoadReport(role="decode", num_waiting=1, model="m", max_model_len=64)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        for i in range(10):
            await asyncio.sleep(0.05)
            yield pb.GenerateResponse(token_ids=[i], text=str(i), finished=i == 9, finish_reason="length" * (i == 9))


def test_a_worker_leaving_dns_finishes_its_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    async def run() -> None:
        old, old_addr = await serve_scripted_worker(FakeWorker())
        new, new_addr = await serve_scripted_worker(FakeWorker())
        answer = [old_addr]
        monkeypatch.setattr(peers_mod, "resolve", lambda host, port: list(answer))
        pool = PeerPool("decode", "workers.example:1", poll_interval=60)
        try:
            await pool.start()
            assert [p.endpoint for p in pool.healthy()] == [old_addr]
            call = pool.get(old_addr).decode.Generate(pb.GenerateRequest(request_id="r"))
            first = await anext(aiter(call))
            answer[:] = [new_addr]  # the pod left the Service (scale-down, drain)
            await pool._refresh_endpoints()
            await pool.poll_once()
            assert [p.endpoint for p in pool.healthy()] == [new_addr]  # no new requests go there
            rest = [msg async for msg in call]  # ...but the stream it has runs to its end
            assert [m.token_ids[0] for m in [first, *rest]] == list(range(10)) and rest[-1].finished
        finally:
            await pool.stop()
            await old.stop(None)
            await new.stop(None)

    asyncio.run(run())


def test_requests_routed_during_a_load_report_stay_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    async def run() -> None:
        pool = PeerPool("decode", "workers.example:1", poll_interval=60)

        def route_two_meanwhile() -> None:
            if pool.peers:
                next(iter(pool.peers.values())).load.pending += 2

        server, addr = await serve_scripted_worker(FakeWorker(on_load=route_two_meanwhile))
        monkeypatch.setattr(peers_mod, "resolve", lambda host, port: [addr])
        try:
            await pool.start()
            peer = pool.get(addr)
            peer.load.pending = 3  # routed before the report was asked for: the report covers them
            await pool.poll_once()
            assert peer.load.pending == 2 and peer.load.num_waiting == 1
            assert peer.load.queue_length == 3  # one the worker reported + two it cannot know of yet
        finally:
            await pool.stop()
            await server.stop(None)

    asyncio.run(run())


def test_a_name_that_fails_to_resolve_keeps_its_endpoints_while_the_others_resolve(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A DNS hiccup for one of several names retired that name's workers (only all names failing at
    once kept them)."""
    answers = {"pf-a": ["127.0.0.1:1", "127.0.0.2:1"], "pf-b": ["127.0.0.3:2"]}
    monkeypatch.setattr(peers_mod, "resolve", lambda host, port: list(answers.get(host, [])))

    async def run() -> None:
        pool = PeerPool("prefill", "pf-a:1,pf-b:2")
        try:
            await pool._refresh_endpoints()
            assert sorted(pool.peers) == ["127.0.0.1:1", "127.0.0.2:1", "127.0.0.3:2"]
            answers["pf-a"] = []  # pf-a's lookup fails this round
            await pool._refresh_endpoints()
            assert sorted(pool.peers) == ["127.0.0.1:1", "127.0.0.2:1", "127.0.0.3:2"]
            answers["pf-b"] = ["127.0.0.4:2"]  # pf-b's pod was replaced: that one does move
            await pool._refresh_endpoints()
            assert sorted(pool.peers) == ["127.0.0.1:1", "127.0.0.2:1", "127.0.0.4:2"]
        finally:
            await pool.stop()

    asyncio.run(run())


def test_a_peer_that_hangs_does_not_hold_up_the_others_reports() -> None:
    """Polled in one gather, every round waited for the hung peer's timeout: the others' load reports
    went 8x staler (a stopped pod or a black-holed address)."""
    import socket

    async def run() -> None:
        calls = 0

        def count() -> None:
            nonlocal calls
            calls += 1

        server, addr = await serve_scripted_worker(FakeWorker(on_load=count))
        hole = socket.create_server(("127.0.0.1", 0))  # takes the connection, never speaks HTTP/2
        pool = PeerPool("decode", f"{addr},127.0.0.1:{hole.getsockname()[1]}", poll_interval=0.1, timeout=3)
        try:
            await pool.start()  # its first poll waits for both
            before = calls
            await asyncio.sleep(1.5)  # within one timeout of the hung peer
            assert calls - before >= 3, calls - before
            assert [p.endpoint for p in pool.healthy()] == [addr]
        finally:
            await pool.stop()
            await server.stop(None)
            hole.close()

    asyncio.run(run())
