#!/usr/bin/env python3
"""gpt2-rs against llama.cpp on the same random GPT-2 124M checkpoint, in one run.

llama.cpp is the CPU peer to beat. Build it from the source package PyPI ships (its sdist vendors
llama.cpp), then point this script at the vendored tree:

    pip download --no-deps --no-binary :all: llama_cpp_python   # or fetch the sdist by URL
    tar xzf llama_cpp_python-*.tar.gz && cd llama_cpp_python-*/vendor/llama.cpp
    cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF && cmake --build build -j \
        --target llama-batched-bench
    python benches/compare/llama_cpp.py --llama-cpp <that directory>

Steps:
  1. convert the checkpoint to GGUF (f32 and q8_0) with llama.cpp's convert_hf_to_gguf.py
     (skipped when the files exist); it needs torch, transformers and llama.cpp's gguf-py.
  2. per precision and batch (1, 3, 16 sequences; prompt 5 tokens, 95 generated each):
       llama-batched-bench -m GGUF -npp 5 -ntg 95 -npl B -t T
       RAYON_NUM_THREADS=T target/release/gpt2 bench --dtype D --request R
     where R is the contract's request with that many sequences (greedy for 1, the default
     sample-top-p request for 3, 16 sample-top-p sequences for 16); llama-batched-bench decodes
     without sampling, so gpt2-rs does slightly more work per token.
  3. print a table of generated tokens/s (all sequences, prompt processing included) and the
     ratio gpt2-rs / llama.cpp.

Only the standard library is used here.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
PROMPT = "This is an input text"
GENERATED = 95
BATCHES = {
    1: {"input": PROMPT, "mode": "greedy", "num_return_sequences": 1, "seed": 1},
    3: {"input": PROMPT, "seed": 1},
    16: {"input": PROMPT, "num_return_sequences": 16, "seed": 1},
}


def fail(message: str, output: str = "") -> None:
    print(f"[llama_cpp] error: {message}", file=sys.stderr)
    if output:
        print(output[-4000:], file=sys.stderr)
    sys.exit(1)


def run(cmd, env=None) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        fail(f"{' '.join(str(c) for c in cmd)} exited {proc.returncode}", proc.stdout + proc.stderr)
    return proc.stdout + proc.stderr


def convert(llama_dir: Path, model_dir: Path, out_dir: Path, outtype: str) -> Path:
    out = out_dir / f"{model_dir.name}-{outtype}.gguf"
    if out.exists():
        return out
    # convert_hf_to_gguf.py wants GPT-2's n_ctx and the vocab.json/merges.txt pair, which HF's own
    # GPT2Config and a tokenizer.json-only directory do not have.
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = json.loads((model_dir / "config.json").read_text())
        config.setdefault("n_ctx", config.get("n_positions", 1024))
        (tmp / "config.json").write_text(json.dumps(config))
        for item in model_dir.iterdir():
            if item.name != "config.json":
                (tmp / item.name).symlink_to(item.resolve())
        for name in ["vocab.json", "merges.txt"]:
            if not (tmp / name).exists():
                shutil.copy(REPO_ROOT / "fixtures" / "gpt2-tokenizer" / name, tmp / name)
        env = dict(os.environ, PYTHONPATH=str(llama_dir / "gguf-py"))
        run([sys.executable, llama_dir / "convert_hf_to_gguf.py", tmp, "--outtype", outtype,
             "--outfile", out], env=env)
    return out


def llama_tokens_per_s(bench: Path, gguf: Path, batch: int, threads: int) -> float:
    out = run([bench, "-m", gguf, "-c", str(batch * (5 + GENERATED) + 16), "-npp", "5",
               "-ntg", str(GENERATED), "-npl", str(batch), "-t", str(threads), "-tb", str(threads)])
    # Table rows: | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and cells[0] == "5" and cells[2] == str(batch):
            total_s = float(cells[8])
            return batch * GENERATED / total_s
    fail(f"no result row in llama-batched-bench output (batch {batch})", out)
    return 0.0


def ours_tokens_per_s(gpt2: Path, model_dir: Path, dtype: str, batch: int, threads: int) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(BATCHES[batch], f)
        request = f.name
    try:
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
        out = run([gpt2, "bench", "--model", model_dir, "--request", request, "--runs", "3",
                   "--dtype", dtype], env=env)
    finally:
        os.unlink(request)
    line = [l for l in out.splitlines() if l.startswith("{")][-1]
    return json.loads(line)["tokens_per_s"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, required=True,
                    help="llama.cpp source tree with convert_hf_to_gguf.py and build/bin")
    ap.add_argument("--model-dir", type=Path, default=REPO_ROOT / "target" / "bench" / "gpt2-124m")
    ap.add_argument("--gguf-dir", type=Path, default=REPO_ROOT / "target" / "bench")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    bench = args.llama_cpp / "build" / "bin" / "llama-batched-bench"
    gpt2 = REPO_ROOT / "target" / "release" / "gpt2"
    for needed in [bench, gpt2, args.model_dir / "config.json"]:
        if not needed.exists():
            fail(f"{needed} is missing (see --help)")
    args.gguf_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for llama_type, ours_dtype in [("f32", "f32"), ("q8_0", "q8_0")]:
        gguf = convert(args.llama_cpp, args.model_dir, args.gguf_dir, llama_type)
        for batch in BATCHES:
            print(f"[llama_cpp] {llama_type}, {batch} sequence(s)", file=sys.stderr)
            theirs = llama_tokens_per_s(bench, gguf, batch, args.threads)
            ours = ours_tokens_per_s(gpt2, args.model_dir, ours_dtype, batch, args.threads)
            rows.append((llama_type, batch, theirs, ours))
    print(f"\n{args.threads} threads, prompt 5 tokens, {GENERATED} generated per sequence")
    print("| weights | sequences | llama.cpp tok/s | gpt2-rs tok/s | gpt2-rs / llama.cpp |")
    print("|---|---:|---:|---:|---:|")
    for llama_type, batch, theirs, ours in rows:
        print(f"| {llama_type} | {batch} | {theirs:.1f} | {ours:.1f} | {ours / theirs:.2f}× |")


if __name__ == "__main__":
    main()
