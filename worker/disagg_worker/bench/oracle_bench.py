"""``disagg bench oracle``: how far the engine's greedy output agrees with Hugging Face ``generate``.

The tests hold the engine to HF token for token in fp32. This command measures the same thing for any
model, device and dtype a user runs (a local checkpoint on a GPU in bf16, say): a seeded batch of
mixed-length prompts, with a shared prefix so that prefix-cache hits are in it, goes through the engine
at once (continuous batching, chunked prefill); each prompt then goes through ``generate(do_sample=False)``
alone. The table gives the requests whose output is identical and, for the others, where they first
differ. In reduced precision a different order of the same sums can flip a near-tie between two
tokens, after which the continuations part; such a split says nothing by itself, so the logit margin
HF had at that position is recorded too.
"""

from __future__ import annotations

import argparse
import random
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from rich.console import Console

from disagg_worker.bench.report import print_table, write_json


@dataclass(frozen=True)
class Divergence:
    request: int
    prompt_tokens: int
    position: int  # index of the first output token that differs
    engine_token: int
    hf_token: int
    hf_margin: float | None  # HF's logit of its own choice minus its logit of the engine's there (None: one stopped)


def build_prompts(vocab: list[int], n: int, prompt_len: tuple[int, int], prefix_len: int,
                  seed: int) -> list[list[int]]:
    """``n`` seeded prompts; every other one starts with the same ``prefix_len`` tokens."""
    rng = random.Random(seed)
    prefix = [rng.choice(vocab) for _ in range(prefix_len)]
    prompts = []
    for i in range(n):
        body = [rng.choice(vocab) for _ in range(rng.randint(*prompt_len))]
        prompts.append(prefix + body if i % 2 else body)
    return prompts


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where ``a`` and ``b`` differ (a length difference counts), else None."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _hf_margin(lm: Any, prompt: list[int], hf_out: list[int], pos: int, engine_token: int) -> float | None:
    import torch

    if pos >= len(hf_out) or engine_token < 0:  # one side stopped there: no pair of tokens to compare
        return None
    ids = torch.tensor([prompt + hf_out[:pos]], device=lm.device)
    with torch.inference_mode():
        logits = lm.model(ids).logits[0, -1].float()
    return float(logits[hf_out[pos]] - logits[engine_token])


def run(model: str, device: str, dtype: str, num_requests: int, prompt_len: tuple[int, int], prefix_len: int,
        max_tokens: int, seed: int) -> dict[str, Any]:
    import torch

    from disagg_worker.engine.engine import EngineConfig, LLMEngine
    from disagg_worker.models.loader import load_model

    lm = load_model(model, device, dtype)
    avoid = set(lm.eos_token_ids) | set(getattr(lm.tokenizer, "all_special_ids", []) or [])
    vocab = [t for t in range(lm.config.vocab_size) if t not in avoid]
    prompts = build_prompts(vocab, num_requests, prompt_len, prefix_len, seed)
    engine = LLMEngine(EngineConfig(model=model, device=device, dtype=dtype, max_num_batched_tokens=512), lm)
    outs = engine.generate(prompts, {"max_tokens": max_tokens, "temperature": 0})
    divergences: list[Divergence] = []
    for i, (prompt, req) in enumerate(zip(prompts, outs, strict=True)):
        ids = torch.tensor([prompt], device=lm.device)
        with torch.inference_mode():
            hf = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                   do_sample=False)[0, len(prompt):].tolist()
        got = list(req.output_token_ids)
        pos = first_difference(got, hf)
        if pos is not None:
            mine = got[pos] if pos < len(got) else -1
            divergences.append(Divergence(i, len(prompt), pos, mine, hf[pos] if pos < len(hf) else -1,
                                          _hf_margin(lm, prompt, hf, pos, mine)))
    return {
        "model": model, "device": str(lm.device), "dtype": str(lm.dtype).removeprefix("torch."),
        "requests": num_requests, "identical": num_requests - len(divergences),
        "prefix_hit_ratio": engine.block_manager.prefix_hit_ratio,
        "divergences": [asdict(d) for d in divergences],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="disagg bench oracle", description=__doc__)
    ap.add_argument("--model", default="tiny-llama", help="preset name or local HF directory")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--prompt-len", default="8-400", help="uniform range MIN-MAX (after the shared prefix)")
    ap.add_argument("--prefix-len", type=int, default=64, help="shared prefix of every other prompt")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/out", help="directory for oracle.json")
    args = ap.parse_args(argv)
    lo, hi = (int(x) for x in args.prompt_len.split("-"))
    console = Console()
    with console.status("engine batch, then HF generate per prompt"):
        result = run(args.model, args.device, args.dtype, args.num_requests, (lo, hi), args.prefix_len,
                     args.max_tokens, args.seed)
    divs = result["divergences"]
    margins = [d["hf_margin"] for d in divs if d["hf_margin"] is not None]
    print_table(
        f"Greedy agreement with HF generate ({result['model']}, {result['device']}, {result['dtype']}, "
        f"{args.max_tokens} tokens each)",
        ["requests", "identical", "first difference at (median)", "HF margin there (median)", "prefix hit ratio"],
        [[result["requests"], result["identical"],
          statistics.median(d["position"] for d in divs) if divs else "-",
          statistics.median(margins) if margins else "-",
          result["prefix_hit_ratio"]]],
        console,
    )
    path = write_json(args.out, "oracle", {"args": vars(args), **result})
    console.print(f"wrote {path}")
    return 0 if result["identical"] == result["requests"] else 1
