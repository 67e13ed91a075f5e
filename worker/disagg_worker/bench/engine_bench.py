"""``disagg bench engine``: this engine vs Hugging Face ``generate`` in static batches, and prefix-cache TTFT.

Each system runs in its own spawned process on the same model and the same seeded mixed-length
workload, so peak memory (max RSS) is measured per system. Output tokens/s counts the tokens each
request asked for; HF's static batches also compute padding and the tails of finished rows, which is
exactly the waste continuous batching removes.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from rich.console import Console

from disagg_worker.bench.report import print_table, write_json


@dataclass(frozen=True)
class Workload:
    num_requests: int = 64
    prompt_min: int = 16
    prompt_max: int = 1024
    output_min: int = 16
    output_max: int = 256
    seed: int = 0

    def build(self, vocab_size: int, avoid: set[int]) -> tuple[list[list[int]], list[int]]:
        rng = random.Random(self.seed)
        pool = [t for t in range(vocab_size) if t not in avoid]
        prompts = [[rng.choice(pool) for _ in range(rng.randint(self.prompt_min, self.prompt_max))]
                   for _ in range(self.num_requests)]
        outputs = [rng.randint(self.output_min, self.output_max) for _ in range(self.num_requests)]
        return prompts, outputs


def _setup(model: str, device: str, dtype: str, threads: int | None) -> Any:
    import torch

    from disagg_worker.models.loader import load_model

    if threads:
        torch.set_num_threads(threads)
    return load_model(model, device, dtype)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(lm: Any) -> None:
    """Wait for the device's queued work, so that a clock read after it times the work itself."""
    if lm.device.type == "cuda":
        import torch

        torch.cuda.synchronize(lm.device)


def _peak_gpu_mib(lm: Any) -> float | None:
    if lm.device.type != "cuda":
        return None
    import torch

    return torch.cuda.max_memory_allocated(lm.device) / 2**20


def _avoid(lm: Any) -> set[int]:
    return set(lm.eos_token_ids) | set(getattr(lm.tokenizer, "all_special_ids", []) or [])


def run_engine(model: str, device: str, dtype: str, threads: int | None, workload: Workload,
               engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    from disagg_worker.engine.engine import EngineConfig, LLMEngine

    lm = _setup(model, device, dtype, threads)
    prompts, outputs = workload.build(lm.config.vocab_size, _avoid(lm))
    kwargs = dict(engine_kwargs)
    if kwargs.get("num_kv_blocks") is None:  # room for the whole workload at once, so nothing is preempted
        kwargs["num_kv_blocks"] = sum(-(-(len(p) + m) // 16) for p, m in zip(prompts, outputs, strict=True)) + 64
    engine = LLMEngine(EngineConfig(model=model, device=device, dtype=dtype, **kwargs), lm)
    engine.generate([prompts[0][:32]], {"max_tokens": 4, "temperature": 0})  # warm-up (kernel load)
    engine.block_manager.reset_prefix_cache()
    steps0 = engine.steps
    _sync(lm)
    t0 = time.perf_counter()
    engine.generate(prompts, [{"max_tokens": m, "temperature": 0, "ignore_eos": True} for m in outputs])
    _sync(lm)
    wall = time.perf_counter() - t0
    return {
        "system": "disagg engine",
        "wall_seconds": wall,
        "output_tokens": sum(outputs),
        "output_tokens_per_s": sum(outputs) / wall,
        "steps": engine.steps - steps0,
        "preemptions": engine.scheduler.num_preemptions,
        "kv_pool_mib": engine.runner.kv.nbytes / 2**20,
        "cpu_kernel": engine.runner.kernel is not None,
        "peak_rss_mib": _peak_rss_mib(),
        "peak_gpu_mib": _peak_gpu_mib(lm),
    }


def run_hf(model: str, device: str, dtype: str, threads: int | None, workload: Workload,
           batch_size: int) -> dict[str, Any]:
    import torch

    lm = _setup(model, device, dtype, threads)
    prompts, outputs = workload.build(lm.config.vocab_size, _avoid(lm))
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    hf = lm.model
    with torch.inference_mode():  # untimed warm-up, as the engine gets one
        warm = torch.tensor([prompts[0][:32]], device=lm.device)
        hf.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=4, do_sample=False, pad_token_id=pad)
    _sync(lm)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i:i + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=lm.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=lm.device)
            n = max(outputs[i:i + batch_size])
            # min_new_tokens = max_new_tokens: every row runs to the batch's length (no early EOS stop)
            hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        pad_token_id=pad)
    _sync(lm)
    wall = time.perf_counter() - t0
    return {
        "system": f"HF generate, static batch {batch_size}",
        "wall_seconds": wall,
        "output_tokens": sum(outputs),
        "output_tokens_per_s": sum(outputs) / wall,
        "peak_rss_mib": _peak_rss_mib(),
        "peak_gpu_mib": _peak_gpu_mib(lm),
    }


def run_ttft(model: str, device: str, dtype: str, threads: int | None, prefix_len: int, repeats: int,
             seed: int) -> dict[str, Any]:
    import torch

    from disagg_worker.engine.engine import EngineConfig, LLMEngine

    lm = _setup(model, device, dtype, threads)
    engine = LLMEngine(EngineConfig(model=model, device=device, dtype=dtype, max_num_batched_tokens=2048), lm)
    rng = random.Random(seed)
    pool = [t for t in range(lm.config.vocab_size) if t not in _avoid(lm)]

    def ttft(prompt: list[int]) -> float:
        t0 = time.perf_counter()
        engine.add_request(f"ttft-{time.monotonic_ns()}", prompt, {"max_tokens": 1, "temperature": 0})
        while engine.has_unfinished():
            engine.step()
        return time.perf_counter() - t0

    ttft([rng.choice(pool) for _ in range(64)])  # warm-up
    cold, warm, hf = [], [], []
    for _ in range(repeats):
        prefix = [rng.choice(pool) for _ in range(prefix_len)]
        cold.append(ttft(prefix + [rng.choice(pool) for _ in range(16)]))
        warm.append(ttft(prefix + [rng.choice(pool) for _ in range(16)]))
        prompt = torch.tensor([prefix + [rng.choice(pool) for _ in range(16)]], device=lm.device)
        _sync(lm)
        t0 = time.perf_counter()
        lm.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1, do_sample=False)
        _sync(lm)
        hf.append(time.perf_counter() - t0)
    return {
        "prefix_tokens": prefix_len,
        "ttft_cold_ms": statistics.median(cold) * 1000,
        "ttft_warm_ms": statistics.median(warm) * 1000,
        "ttft_hf_ms": statistics.median(hf) * 1000,
        "cold_over_warm": statistics.median(cold) / statistics.median(warm),
        "prefix_hit_ratio": engine.block_manager.prefix_hit_ratio,
    }


def _in_subprocess(fn: Any, *args: Any) -> Any:
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="disagg bench engine", description=__doc__)
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prompt-len", default="16-1024", help="uniform range MIN-MAX")
    ap.add_argument("--output-len", default="16-256", help="uniform range MIN-MAX")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-batch-sizes", default="8,16", help="comma list of HF static batch sizes")
    ap.add_argument("--max-batch-tokens", type=int, default=1024)
    ap.add_argument("--max-batch-size", type=int, default=128)
    ap.add_argument("--kv-cache-blocks", type=int, default=None, help="default: enough for the whole workload")
    ap.add_argument("--no-cpu-kernels", action="store_true", help="use the pure-torch attention path")
    ap.add_argument("--prefix-len", type=int, default=1024)
    ap.add_argument("--ttft-repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/out", help="directory for engine.json")
    args = ap.parse_args(argv)

    pmin, pmax = (int(x) for x in args.prompt_len.split("-"))
    omin, omax = (int(x) for x in args.output_len.split("-"))
    workload = Workload(args.num_requests, pmin, pmax, omin, omax, args.seed)
    common = (args.model, args.device, args.dtype, args.threads)
    console = Console()
    engine_kwargs = {"max_num_batched_tokens": args.max_batch_tokens, "max_num_seqs": args.max_batch_size,
                     "cpu_kernels": not args.no_cpu_kernels, "num_kv_blocks": args.kv_cache_blocks}
    with console.status("engine: continuous batching run"):
        results = [_in_subprocess(run_engine, *common, workload, engine_kwargs)]
    for b in (int(x) for x in args.hf_batch_sizes.split(",") if x):
        with console.status(f"HF generate, static batches of {b}"):
            results.append(_in_subprocess(run_hf, *common, workload, b))
    with console.status("TTFT with a cold and a cached prefix"):
        ttft = _in_subprocess(run_ttft, *common, args.prefix_len, args.ttft_repeats, args.seed)

    best_hf = max((r for r in results[1:]), key=lambda r: r["output_tokens_per_s"], default=None)
    speedup = results[0]["output_tokens_per_s"] / best_hf["output_tokens_per_s"] if best_hf else None
    print_table(
        f"Throughput: {workload.num_requests} requests, prompts {pmin}-{pmax}, outputs {omin}-{omax} "
        f"({args.model}, {args.device}, {args.dtype})",
        ["system", "wall s", "output tok/s", "peak RSS MiB", "peak GPU MiB"],
        [[r["system"], r["wall_seconds"], r["output_tokens_per_s"], r["peak_rss_mib"],
          "-" if r["peak_gpu_mib"] is None else r["peak_gpu_mib"]] for r in results],
        console,
    )
    print_table(
        f"TTFT with a {args.prefix_len}-token prefix (median of {args.ttft_repeats})",
        ["case", "ms"],
        [["cold (no cache)", ttft["ttft_cold_ms"]], ["warm (prefix cached)", ttft["ttft_warm_ms"]],
         ["HF generate (no cache)", ttft["ttft_hf_ms"]], ["cold / warm", ttft["cold_over_warm"]]],
        console,
    )
    if speedup is not None:
        console.print(f"engine / best HF tokens/s: [bold]{speedup:.2f}x[/bold] (target >= 3x); "
                      f"cold / warm TTFT: [bold]{ttft['cold_over_warm']:.1f}x[/bold] (target >= 5x)")
    path = write_json(args.out, "engine", {
        "workload": asdict(workload), "engine_config": engine_kwargs, "throughput": results, "ttft": ttft,
        "speedup_vs_best_hf": speedup,
    })
    console.print(f"wrote {path}")
    return 0
