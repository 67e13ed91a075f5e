"""First-token time of a remote prefill whose KV is installed through the engine thread (the path of a
pool off the CPU, forced here on the CPU) while the decode engine is busy with 50 ms steps; 76 chunks.

    .venv/bin/python -m pytest -q -s benchmarks/measure_staged_import.py -p no:cacheprovider
"""

import asyncio
import time

from disagg_worker.rpc import pb
from tests.conftest import llama  # noqa: F401
from tests.test_remote_prefill_inprocess import _staged, pair  # noqa: F401


async def test_measure(pair, llama, monkeypatch):  # noqa: F811
    imports = _staged(pair, monkeypatch)
    eng = pair.decode_runtime.engine.engine
    real_exec = eng.runner.execute
    def slow(out):
        time.sleep(0.05)  # a 50 ms step, as a busy GPU decode worker's
        return real_exec(out)
    monkeypatch.setattr(eng.runner, "execute", slow)
    # keep the decode engine busy with a long local request
    busy = pb.GenerateRequest(request_id="busy", prompt_token_ids=[5, 6, 7], prefill_mode="local",
                              params=pb.SamplingParams(max_tokens=400, temperature=0, top_p=1, ignore_eos=True))
    async def run_busy():
        return [m async for m in pair.decode.Generate(busy, timeout=120)]
    bt = asyncio.create_task(run_busy())
    await asyncio.sleep(0.3)
    prompt = list(range(40, 340))
    t0 = time.perf_counter()
    request = pb.GenerateRequest(request_id="staged", prompt_token_ids=prompt, prefill_mode="remote",
                                 params=pb.SamplingParams(max_tokens=1, temperature=0, top_p=1))
    messages = [m async for m in pair.decode.Generate(request, timeout=60)]
    dt = time.perf_counter() - t0
    print(f"\nMEASURE remote={messages[0].remote_prefill} chunks={len(imports)} first token after {dt*1000:.0f} ms")
    bt.cancel()
