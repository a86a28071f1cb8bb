#!/usr/bin/env python3
"""Time HF transformers generate() on CPU (f32) for the comparison benchmark.

Usage: hf_bench.py --model DIR --shape {default,beam,greedy,batch8} --runs N --threads T

DIR holds config.json, model.safetensors and tokenizer.json (see
make_checkpoint.py). One warm-up run is excluded from timing; each timed run
wraps only model.generate() with time.perf_counter(). Prints exactly one JSON
line on stdout:

  {"engine": "hf", "shape": ..., "runs": [...], "median_s": ...,
   "generated_tokens": ..., "tokens_per_s": ...}

generated_tokens counts, over all returned sequences, the tokens after the
prompt up to and including the first EOS (padding after EOS is not counted).
tokens_per_s = generated_tokens / median_s. Everything else goes to stderr.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

EOS_ID = 50256
PROMPT = "This is an input text"  # 5 GPT-2 tokens

# Fixed prompts for the batch8 shape (each 4-8 GPT-2 tokens, different lengths).
BATCH_PROMPTS = [
    "The weather today is",
    "Once upon a time there was",
    "My favourite food is pizza because",
    "In the year 2050, cars will",
    "The best way to learn programming is",
    "She opened the door and saw",
    "Scientists have recently discovered",
    "Here is a short story about a dog",
]

SHAPES = ("default", "beam", "greedy", "batch8")


def load_tokenizer(model_dir: Path):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    tok.eos_token = "<|endoftext|>"
    tok.bos_token = "<|endoftext|>"
    tok.pad_token = "<|endoftext|>"
    assert tok.eos_token_id == EOS_ID and tok.pad_token_id == EOS_ID
    return tok


def build_request(shape: str, tok):
    """Return (encoded inputs, generate kwargs, needs_seed)."""
    common = dict(pad_token_id=EOS_ID, eos_token_id=EOS_ID)
    if shape == "batch8":
        tok.padding_side = "left"
        enc = tok(BATCH_PROMPTS, return_tensors="pt", padding=True)
        kw = dict(do_sample=False, num_beams=1, max_new_tokens=70, **common)
        return enc, kw, False
    enc = tok([PROMPT], return_tensors="pt")
    if shape == "default":
        kw = dict(do_sample=True, top_k=50, top_p=0.92, temperature=1.0,
                  max_length=100, num_return_sequences=3, **common)
        return enc, kw, True
    if shape == "beam":
        kw = dict(do_sample=False, num_beams=5, no_repeat_ngram_size=2,
                  early_stopping=True, num_return_sequences=3, max_length=100,
                  **common)
        return enc, kw, False
    if shape == "greedy":
        kw = dict(do_sample=False, num_beams=1, max_length=100, **common)
        return enc, kw, False
    raise ValueError(shape)


def count_generated(sequences, prompt_len: int) -> int:
    """Tokens after the (padded) prompt, up to and including the first EOS."""
    total = 0
    for row in sequences[:, prompt_len:].tolist():
        n = 0
        for t in row:
            n += 1
            if t == EOS_ID:
                break
        total += n
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--shape", required=True, choices=SHAPES)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be >= 1")

    import torch
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model)
    model = GPT2LMHeadModel.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    enc, kw, needs_seed = build_request(args.shape, tok)
    input_ids = enc["input_ids"]
    attention_mask = enc["attention_mask"]
    prompt_len = input_ids.shape[1]
    try:
        load = open("/proc/loadavg").read().split()[:3]
    except OSError:
        load = "?"
    print(f"[hf_bench] loadavg {load} (CPU contention badly distorts multi-thread timings)",
          file=sys.stderr)
    print(f"[hf_bench] torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"shape={args.shape}, input={tuple(input_ids.shape)}, kwargs={kw}",
          file=sys.stderr)

    def one_run():
        torch.manual_seed(0)
        t0 = time.perf_counter()
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kw)
        dt = time.perf_counter() - t0
        return dt, out

    times = []
    gen_counts = []
    with torch.inference_mode():
        dt, out = one_run()  # warm-up, excluded
        print(f"[hf_bench] warm-up {dt:.3f}s, output {tuple(out.shape)}", file=sys.stderr)
        for i in range(args.runs):
            dt, out = one_run()
            times.append(dt)
            gen_counts.append(count_generated(out, prompt_len))
            print(f"[hf_bench] run {i}: {dt:.3f}s, output {tuple(out.shape)}, "
                  f"generated {gen_counts[-1]}", file=sys.stderr)

    median_s = statistics.median(times)
    # Every run is seeded identically, so counts match; use the median anyway.
    generated = int(statistics.median(gen_counts))
    result = {
        "engine": "hf",
        "shape": args.shape,
        "runs": [round(t, 6) for t in times],
        "median_s": round(median_s, 6),
        "generated_tokens": generated,
        "tokens_per_s": round(generated / median_s, 3),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
