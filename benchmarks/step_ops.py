"""Ops per decode step on the torch attention path: a proxy for a GPU step's launch cost, measured on a CPU.

On a GPU at small and medium model sizes a step's time is mostly per-op overhead (a kernel launch and
the Python around it), so the number of aten ops a step dispatches predicts it. This builds a model
with TinyLlama-1.1B's 22 layers but tiny widths (so compute is negligible), prefills 64 requests of
16-1024 tokens, then counts the ops of one decode step and times a few, with the CPU's per-row decode
grouping and with the wide grouping a GPU uses.

    PYTHONPATH=worker .venv/bin/python benchmarks/step_ops.py --out benchmarks/out
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM

from disagg_worker.bench.report import print_table, write_json
from disagg_worker.engine.engine import EngineConfig, LLMEngine
from disagg_worker.models.loader import LoadedModel, load_model


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def narrow_model(layers: int) -> LoadedModel:
    base = load_model("tiny-llama", "cpu", "float32")
    cfg = AutoConfig.for_model(**{**base.model.config.to_dict(), "num_hidden_layers": layers, "hidden_size": 64,
                                  "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                                  "head_dim": 16})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    return LoadedModel(name=f"narrow-{layers}", model=model, tokenizer=base.tokenizer, device=torch.device("cpu"),
                       dtype=torch.float32)


def measure(lm: LoadedModel, wide: bool, requests: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    engine = LLMEngine(EngineConfig(num_kv_blocks=requests * 80, cpu_kernels=False, max_num_batched_tokens=2048,
                                    max_num_seqs=256), lm)
    engine.runner.wide_decode_groups = wide
    for i in range(requests):
        prompt = [rng.randrange(3, 1000) for _ in range(rng.randint(16, 1024))]
        engine.add_request(str(i), prompt, {"max_tokens": 200, "temperature": 0, "ignore_eos": True})
    sched = engine.scheduler
    while sched.num_waiting or any(r.num_tokens - r.num_computed_tokens > 1 for r in sched.running):
        engine.step()  # every prompt prefilled: from here on every step is decode-only
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    counter = OpCounter()
    with counter:
        engine.step()
    return {"grouping": "wide (GPU)" if wide else "per row (CPU)", "decode_rows": len(sched.running),
            "aten_ops": sum(counter.ops.values()), "cpu_step_ms": statistics.median(times) * 1000,
            "top_ops": dict(counter.ops.most_common(12))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lm = narrow_model(args.layers)
    rows = [measure(lm, wide, args.requests, args.seed) for wide in (False, True)]
    print_table(f"One decode step, {args.layers} layers, torch attention path",
                ["decode grouping", "decode rows", "aten ops", "CPU ms (padding costs here, not on a GPU)"],
                [[r["grouping"], r["decode_rows"], r["aten_ops"], r["cpu_step_ms"]] for r in rows])
    print(f"wrote {write_json(args.out, 'step-ops', {'args': vars(args), 'steps': rows})}")


if __name__ == "__main__":
    main()
