"""``disagg preset``: list the built-in presets or save one as an ordinary Hugging Face model directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from disagg_worker.models.presets import PRESETS, save_preset


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="disagg preset", description=__doc__)
    sub = ap.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="list the presets")
    save = sub.add_parser("save", help="write a preset to DIR (config.json, safetensors, tokenizer)")
    save.add_argument("name", choices=sorted(PRESETS))
    save.add_argument("directory", type=Path)
    args = ap.parse_args(argv)
    if args.action == "list":
        for p in PRESETS.values():
            print(f"{p.name:<14} {p.architecture:<8} hidden={p.hidden_size} layers={p.num_hidden_layers} "
                  f"heads={p.num_attention_heads}/{p.num_key_value_heads} ctx={p.max_position_embeddings}")
        return 0
    print(save_preset(args.name, args.directory))
    return 0
