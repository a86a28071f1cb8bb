#!/usr/bin/env python3
"""Create a GPT-2 124M-shaped checkpoint with random (HF-initialised) weights.

Usage: make_checkpoint.py OUT_DIR

Writes OUT_DIR/{config.json, model.safetensors, tokenizer.json}. The weights
come from GPT2LMHeadModel(GPT2Config()) after torch.manual_seed(0), i.e. HF's
own init (normal, std 0.02). generation_config.json is removed so engines see
only config.json. Skips everything if OUT_DIR/model.safetensors exists.
"""
import os
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_JSON = REPO_ROOT / "crates" / "gpt2-tokenizer" / "data" / "tokenizer.json"


def main() -> int:
    if len(sys.argv) != 2:
        print(f"usage: {sys.argv[0]} OUT_DIR", file=sys.stderr)
        return 2
    out = Path(sys.argv[1])
    weights = out / "model.safetensors"
    if weights.exists():
        print(f"{weights} already exists; skipping")
        return 0
    if not TOKENIZER_JSON.is_file():
        print(f"missing tokenizer: {TOKENIZER_JSON}", file=sys.stderr)
        return 1

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config()  # n_layer 12, n_head 12, n_embd 768, vocab 50257, n_positions 1024
    model = GPT2LMHeadModel(config)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    gen_cfg = out / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()
    shutil.copyfile(TOKENIZER_JSON, out / "tokenizer.json")

    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({n_params} parameters): "
          + ", ".join(sorted(os.listdir(out))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
