"""The sampler's cost per step: 64 rows of logits over a 152k vocabulary (Qwen2's), per setting.

    PYTHONPATH=worker .venv/bin/python benchmarks/sampler.py --out benchmarks/out
"""

from __future__ import annotations

import argparse
import time

import torch

from disagg_worker.bench.report import print_table, write_json
from disagg_worker.engine.request import Request, SamplingParams
from disagg_worker.engine.sampler import Sampler

SETTINGS: dict[str, dict] = {
    "greedy": {"temperature": 0},
    "temperature 1": {"temperature": 1.0},
    "temperature 1, seeded": {"temperature": 1.0, "seed": 3},
    "temperature 0.7, top-k 50": {"temperature": 0.7, "top_k": 50},
    "temperature 0.7, top-p 0.9": {"temperature": 0.7, "top_p": 0.9},
    "greedy, repetition penalty 1.05, 2k context": {"temperature": 0, "repetition_penalty": 1.05},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    # logits spread like a trained model's: a few hundred plausible tokens per row
    logits = torch.randn(args.rows, args.vocab, generator=g) * 3
    prompt = torch.randint(0, args.vocab, (2048,), generator=g).tolist()
    results = []
    for name, params in SETTINGS.items():
        sampler = Sampler(torch.device("cpu"))
        reqs = [Request(request_id=str(i), prompt_token_ids=prompt, params=SamplingParams(max_tokens=8, **params))
                for i in range(args.rows)]
        sampler.sample(logits, reqs)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            sampler.sample(logits, reqs)
        results.append({"setting": name, "ms_per_step": (time.perf_counter() - t0) / args.repeats * 1000})
    print_table(f"Sampler, {args.rows} rows x {args.vocab} vocabulary, CPU ({args.repeats} steps each)",
                ["setting", "ms per step"], [[r["setting"], r["ms_per_step"]] for r in results])
    print(f"wrote {write_json(args.out, 'sampler', {'args': vars(args), 'results': results})}")


if __name__ == "__main__":
    main()
