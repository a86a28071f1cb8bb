#!/usr/bin/env python3
"""Compare gpt2-rs with Hugging Face transformers on CPU, and sweep the server's concurrency.

Run from anywhere, with a Python that has torch, transformers, safetensors and matplotlib:

    /path/to/venv/bin/python benches/compare/run.py

Steps:
  1. cargo build --release -p gpt2-cli -p gpt2-server, and -p gpt2-benches --bin machine_probe
     (skip with --no-build)
  2. make_checkpoint.py --model-dir (random GPT-2 124M)     (skipped when it exists)
  2b. target/release/machine_probe --threads T: the CPU model and flags, read bandwidth and
     arithmetic peaks; with the checkpoint's config they give each shape's floor (see
     `floors()`): the fastest a request could possibly run on this machine. --probe-only stops
     here and prints the probe and the floors.
  3. per shape (default, beam, greedy), HF then ours, same thread count:
       hf_bench.py --model DIR --shape S --runs N --threads T
       RAYON_NUM_THREADS=T target/release/gpt2 bench --model DIR --request FILE --runs N --warmup 1
  4. concurrency sweep: start target/release/gpt2-server, N client threads POST the default
     request to /invocations; generated tokens come from the server's JSON log lines. Around
     each level, `machine_probe --peaks-only` (about a second) measures the arithmetic peaks
     again: a level's *steps % of peak* is taken against the mean of the two, the machine of
     that minute, not the first probe's (a 2-core Xeon's f32 peak read 200 and 286 GFLOP/s
     minutes apart, which put the same steps at 71% or 49% of the peak).
  4b. with --llama-cpp DIR: llama.cpp's llama-batched-bench on the same checkpoint (GGUF, same
     weight format) for the default (3 sequences) and greedy (1) shapes, via llama_cpp.py.
  4c. machine_probe again after the single requests (and llama.cpp's): the report says how far
     the read bandwidth and the format's peak moved, and warns above 10% (the floors stay those
     of the first probe).
  5. print a table; write docs/performance.md, docs/performance.png, docs/performance.json
     (or next to --output).

Only the standard library and matplotlib (for the sweep's plot) are used here.
"""
import argparse
import datetime as _dt
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
PROMPT = "This is an input text"

# The request bodies of each single-request shape, as our engine receives them. hf_bench.py
# builds the equivalent generate() call for the same shape name.
SHAPES = {
    # The contract's default: sample-top-p, top_k 50, top_p 0.92, max_length 100, 3 sequences.
    "default": {"input": PROMPT, "seed": 1},
    # 5 beams, no_repeat_ngram_size 2, 3 sequences returned.
    "beam": {"input": PROMPT, "mode": "beam"},
    "greedy": {"input": PROMPT, "mode": "greedy", "num_return_sequences": 1},
}
# Sequences decoded together in each step of a shape (beam search runs all 5 beams), and the
# sequences it returns (whose tokens `generated_tokens` sums).
ROWS_IN_FLIGHT = {"default": 3, "beam": 5, "greedy": 1}
RETURNED = {"default": 3, "beam": 3, "greedy": 1}
PROMPT_TOKENS = 5   # PROMPT in GPT-2's tokenizer
MAX_LENGTH = 100    # the contract's default max_length (prompt included)
# Bytes per stored weight of each --dtype: q8_0 is 32 int8 values and one f16 scale per block.
WEIGHT_BYTES = {"f32": 4.0, "bf16": 2.0, "q8_0": 34 / 32}
KV_BYTES = {"f32": 4, "f16": 2}
# Which probe peak bounds a format's matmuls (multiply-adds count 2 operations): f32 FMA; bf16
# on AMX tiles (tdpbf16ps) where the CPU has them and GPT2_ISA does not pin a lower level, else
# bf16 pairs (vdpbf16ps) where the CPU has them, else widening + f32 FMA; int8 dot products
# (vpdpbusd) for q8_0 where the CPU has them, else f32 FMA.
PEAK_OF_FORMAT = {"f32": ["f32_fma_gflops"],
                  "bf16": ["amx_bf16_gflops", "bf16_dot_gflops", "f32_fma_gflops"],
                  "q8_0": ["int8_vnni_gops", "f32_fma_gflops"]}
SHAPE_NOTES = {
    "default": "sample-top-p (top_k 50, top_p 0.92), max_length 100, 3 sequences",
    "beam": "5 beams, no_repeat_ngram_size 2, max_length 100, 3 returned",
    "greedy": "greedy, max_length 100, 1 sequence",
}


class BenchError(Exception):
    """A failure to report (with whatever output explains it) before exiting non-zero."""


def log(msg: str) -> None:
    print(f"[run] {msg}", file=sys.stderr, flush=True)


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


# --------------------------------------------------------------------------------------------
# Subprocesses


def run_checked(cmd, *, env=None, cwd=None, capture=True) -> subprocess.CompletedProcess:
    """Run cmd; on failure raise BenchError carrying its stderr."""
    shown = " ".join(str(c) for c in cmd)
    try:
        proc = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, text=True,
                              stdout=subprocess.PIPE if capture else None,
                              stderr=subprocess.PIPE if capture else None)
    except OSError as e:
        raise BenchError(f"could not start `{shown}`: {e}") from None
    if proc.returncode != 0:
        msg = f"`{shown}` exited with code {proc.returncode}"
        if capture:
            msg += f"\n--- its stderr ---\n{proc.stderr.rstrip()}\n--- end of stderr ---"
        raise BenchError(msg)
    return proc


def last_json_line(stdout: str, what: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    raise BenchError(f"{what}: no JSON result line on stdout; stdout was:\n{stdout}")


def build(args) -> None:
    cmds = [["cargo", "build", "--release", "-p", "gpt2-benches", "--bin", "machine_probe"]]
    if not args.probe_only:
        cmds.insert(0, ["cargo", "build", "--release", "-p", "gpt2-cli", "-p", "gpt2-server"])
    for cmd in cmds:
        log("building: " + " ".join(cmd))
        # cargo's output goes straight to the terminal so the (long) build shows progress.
        run_checked(cmd, cwd=REPO_ROOT, capture=False)


def ensure_checkpoint(model_dir: Path) -> None:
    needed = ["config.json", "model.safetensors", "tokenizer.json"]
    if all((model_dir / n).is_file() for n in needed):
        log(f"checkpoint {model_dir} exists")
        return
    log(f"creating the random GPT-2 124M checkpoint in {model_dir}")
    proc = run_checked([sys.executable, HERE / "make_checkpoint.py", model_dir])
    log(proc.stdout.strip())
    missing = [n for n in needed if not (model_dir / n).is_file()]
    if missing:
        raise BenchError(f"{model_dir} still lacks {missing} after make_checkpoint.py")


# --------------------------------------------------------------------------------------------
# The machine's floor


def run_probe(args, peaks_only: bool = False) -> dict:
    """machine_probe's JSON: CPU model and flags, read GB/s, f32 / bf16 / int8 peaks (with
    `peaks_only`, the peaks alone, in about a second)."""
    if not args.probe_bin.is_file():
        raise BenchError(f"{args.probe_bin} does not exist; build it (drop --no-build)")
    if not peaks_only:
        log(f"probing the machine ({args.threads} threads, loadavg {loadavg()})")
    proc = run_checked([args.probe_bin, "--threads", args.threads]
                       + (["--peaks-only"] if peaks_only else []))
    return last_json_line(proc.stdout, "machine_probe")


def model_sizes(model_dir: Path) -> dict:
    """What one decode step must read and compute, from config.json: the matmul weights (4
    linear layers per block and the LM head, tied to the token embeddings), which take the weight
    format, and the biases and layer norms, which stay f32. The embedding lookups read one row."""
    c = json.loads((model_dir / "config.json").read_text())
    d, layers, vocab = c["n_embd"], c["n_layer"], c["vocab_size"]
    inner = c.get("n_inner") or 4 * d
    per_layer = 4 * d * d + 2 * d * inner      # qkv (3 d²), attention out (d²), MLP up + down
    return {"n_layer": layers, "n_embd": d, "vocab": vocab,
            "layer_params": layers * per_layer, "head_params": vocab * d,
            "matmul_params": layers * per_layer + vocab * d,
            "small_params": layers * (5 * d + inner + 4 * d) + 2 * d}


def peak_for(probe: dict, dtype: str):
    """(peak in 10⁹ operations/s, the probe field it came from) for a weight format's matmuls."""
    amx_allowed = os.environ.get("GPT2_ISA", "").strip().lower() in ("", "amx")
    for key in PEAK_OF_FORMAT[dtype]:
        if key.startswith("amx_") and not amx_allowed:
            continue
        if probe.get(key):
            return float(probe[key]), key
    raise BenchError(f"the probe reported no usable peak for {dtype}: {probe}")


def step_floor(probe: dict, sizes: dict, dtype: str, kv_dtype: str, rows: int,
               positions: int, tokens: int = 1) -> dict:
    """Seconds one forward pass over `rows` sequences × `tokens` new positions must take at
    least: max(bytes read / read bandwidth, 2 · multiply-adds / arithmetic peak). Bytes are every
    weight once (its format's bytes per weight) plus the KV caches the rows attend over
    (`positions` each); multiply-adds are the matmul weights times the rows (times `tokens`
    for the blocks; the LM head runs on the last position only)."""
    bw = float(probe["read_gbs"]) * 1e9
    peak, peak_key = peak_for(probe, dtype)
    weight_bytes = sizes["matmul_params"] * WEIGHT_BYTES[dtype] + sizes["small_params"] * 4
    kv_bytes = rows * positions * sizes["n_layer"] * 2 * sizes["n_embd"] * KV_BYTES[kv_dtype]
    macs = rows * (sizes["layer_params"] * tokens + sizes["head_params"])
    t_bw = (weight_bytes + kv_bytes) / bw
    t_compute = 2 * macs / (peak * 1e9)
    return {"s": max(t_bw, t_compute), "bandwidth_s": t_bw, "compute_s": t_compute,
            "bound": "bandwidth" if t_bw >= t_compute else "compute",
            "weight_bytes": weight_bytes, "kv_bytes": kv_bytes, "peak_key": peak_key}


def decode_steps(shape: str, ours: dict):
    """Tokens of the longest sequence: `gpt2 bench`'s steps when it reports them; else the
    maximum when every returned sequence reached max_length; else (some ended at EOS) the fewest
    the longest one can have, ceil(generated / returned), so the floor stays a lower bound."""
    full = MAX_LENGTH - PROMPT_TOKENS
    if ours is None:
        return full, "max_length"
    raw = ours.get("raw", {})
    for key in ("decode_steps", "steps"):
        if isinstance(raw.get(key), int) and raw[key] > 0:
            return raw[key], "reported"
    generated = ours["generated_tokens"]
    if generated >= RETURNED[shape] * full:
        return full, "max_length"
    return max(1, -(-generated // RETURNED[shape])), "lower bound (EOS)"


def request_floor(probe: dict, sizes: dict, args, shape: str, ours=None) -> dict:
    """The fastest one request of `shape` can run here: the prefill (one pass over the prompt,
    which yields the first token) plus one decode step per further token, each at its
    step_floor with the rows in flight and the positions cached so far."""
    rows = ROWS_IN_FLIGHT[shape]
    steps, steps_from = decode_steps(shape, ours)
    prefill = step_floor(probe, sizes, args.dtype, args.kv_dtype, 1, 0, PROMPT_TOKENS)
    decode = [step_floor(probe, sizes, args.dtype, args.kv_dtype, rows, PROMPT_TOKENS + i)
              for i in range(1, steps)]
    total = prefill["s"] + sum(d["s"] for d in decode)
    first = decode[0] if decode else prefill
    out = {"rows_in_flight": rows, "steps": steps, "steps_from": steps_from,
           "prefill_s": prefill["s"], "step_s": first["s"],
           "step_bandwidth_s": first["bandwidth_s"], "step_compute_s": first["compute_s"],
           "bound": first["bound"], "weight_bytes": first["weight_bytes"],
           "peak_key": first["peak_key"], "floor_s": total}
    if ours is not None:
        out["ours_x_floor"] = ours["median_s"] / total
    return out


def sweep_floor(probe: dict, sizes: dict, args, clients: int) -> dict:
    """Aggregate tokens/s at the floor with every client's default request (3 sequences) in
    each step, mid-request (half of the positions cached); prefill ignored."""
    rows = ROWS_IN_FLIGHT["default"] * clients
    f = step_floor(probe, sizes, args.dtype, args.kv_dtype, rows, MAX_LENGTH // 2)
    return {"rows": rows, "step_s": f["s"], "bound": f["bound"], "tokens_per_s": rows / f["s"]}


# The probe fields a peaks-only probe around each sweep level measures again.
PEAK_KEYS = ("f32_fma_gflops", "int8_vnni_gops", "bf16_dot_gflops", "amx_bf16_gflops")


def peaks_around(before: dict, after: dict) -> dict:
    """The peaks of the probes just before and just after a sweep level, and their means."""
    around = {"before": {k: before.get(k) for k in PEAK_KEYS},
              "after": {k: after.get(k) for k in PEAK_KEYS}}
    around["mean"] = {k: (before[k] + after[k]) / 2 if before.get(k) and after.get(k) else None
                      for k in PEAK_KEYS}
    return around


def steps_peak_fraction(probe: dict, sizes: dict, args, steps: dict, around=None):
    """The fraction of the arithmetic peak the level's decode steps ran at: the compute floor of
    a step of their mean rows over their mean time, at the mean peak of the probes around the
    level when they ran (else the first probe's). Prompt chunks that ride in a step add work the
    floor does not count, so this is a lower bound."""
    if not steps.get("mean_step_s") or not steps.get("mean_rows"):
        return None
    peaks = dict(probe)
    if around:
        peaks.update({k: v for k, v in around["mean"].items() if v})
    compute = step_floor(peaks, sizes, args.dtype, args.kv_dtype, steps["mean_rows"],
                         MAX_LENGTH // 2)["compute_s"]
    return compute / steps["mean_step_s"]


def probe_cpu(probe: dict) -> str:
    signature = probe.get("cpu_signature")
    return probe.get("cpu_model", "?") + (f" ({signature})" if signature else "")


def probe_summary_rows(probe: dict):
    flags = [k for k, on in probe.get("features", {}).items() if on]
    amx = [f for f in probe.get("cpuinfo_flags", []) if f.startswith("amx")]
    return [
        ("CPU", probe_cpu(probe)),
        ("flags", ", ".join(flags + amx) or "none detected"),
        ("threads", f"{probe['threads']} of {probe.get('logical_cpus', '?')} logical CPUs"),
        ("read bandwidth", f"{probe['read_gbs']:.1f} GB/s with {probe['threads']} threads, "
                           f"{probe['read_gbs_1_thread']:.1f} GB/s with 1 "
                           f"({probe['buffer_mib']} MiB buffer, best of {probe.get('read_passes', '?')} "
                           "passes)"),
        ("f32 FMA peak", f"{probe['f32_fma_gflops']:.0f} GFLOP/s ({probe['f32_isa']}; "
                         f"{probe['f32_fma_gflops_1_thread']:.0f} with 1 thread)"),
        ("int8 dot peak", f"{probe['int8_vnni_gops']:.0f} GOPS (vpdpbusd)"
         if probe.get("int8_vnni_gops") else "– (no AVX-512 VNNI)"),
        ("bf16 dot peak", f"{probe['bf16_dot_gflops']:.0f} GFLOP/s (vdpbf16ps)"
         if probe.get("bf16_dot_gflops") else "– (no AVX-512 BF16)"),
        ("bf16 tile peak", f"{probe['amx_bf16_gflops']:.0f} GFLOP/s (AMX tdpbf16ps)"
         if probe.get("amx_bf16_gflops") else "– (no AMX-BF16)"),
    ]


# The probe figures compared before and after the single requests.
PROBE_MOVES = ("read_gbs", "f32_fma_gflops", "int8_vnni_gops", "bf16_dot_gflops",
               "amx_bf16_gflops")
# How far a probe figure may move during a run before the report warns about its floors.
PROBE_MOVE_WARN = 0.10


def probe_moves_markdown(probe: dict, args) -> list:
    """How far the read bandwidth and this format's peak moved between the first probe and the
    one after the single requests, with a warning when either moved by more than 10%."""
    after = probe.get("after_single_requests")
    if not after:
        return []
    _, peak_key = peak_for(probe, args.dtype)
    moves = []
    for key, label, unit in (("read_gbs", "read bandwidth", "GB/s"),
                             (peak_key, f"`{peak_key}`", "G operations/s")):
        before, later = probe.get(key), after.get(key)
        if before and later:
            moves.append((label, unit, before, later, later / before - 1))
    if not moves:
        return []
    said = ", ".join(f"{label} {before:.1f} → {later:.1f} {unit} ({move:+.0%})"
                     for label, unit, before, later, move in moves)
    parts = [f"The probe ran again after the single requests: {said}. The floors above use the "
             "first probe."]
    if any(abs(move) > PROBE_MOVE_WARN for *_, move in moves):
        parts[0] += (" **The machine's speed moved by more than 10% during the run**: the "
                     "*ours × floor* column is off by up to that much, and only runs that "
                     "alternate what they compare say more.")
    return parts + [""]


def floor_rows(floors: dict, shapes: dict):
    header = ["shape", "rows", "passes", "MB / step", "bandwidth ms / step",
              "compute ms / step", "bound", "floor s", "ours median s", "ours × floor"]
    rows = []
    for name, f in floors.items():
        ours = shapes.get(name, {}).get("ours")
        steps = str(f["steps"]) + ("" if f["steps_from"] in ("max_length", "reported") else "*")
        rows.append([name, str(f["rows_in_flight"]), steps, f"{f['weight_bytes'] / 1e6:.0f}",
                     f"{f['step_bandwidth_s'] * 1e3:.1f}", f"{f['step_compute_s'] * 1e3:.1f}",
                     f["bound"], fmt(f["floor_s"]), fmt(ours and ours["median_s"]),
                     fmt(f.get("ours_x_floor"), ".2f") + ("×" if f.get("ours_x_floor") else "")])
    return header, rows


def print_probe_and_floors(probe: dict, sizes: dict, args, floors: dict, shapes: dict) -> None:
    print(f"Machine (machine_probe, {probe.get('probe_s', '?')} s)")
    for k, v in probe_summary_rows(probe):
        print(f"  {k:15} {v}")
    print(f"  model          {sizes['matmul_params'] / 1e6:.1f} M matmul weights per step, "
          f"--dtype {args.dtype} ({WEIGHT_BYTES[args.dtype]:.4g} bytes each), "
          f"--kv-dtype {args.kv_dtype}")
    print()
    print("Floors: per step max((weight + KV bytes) / read bandwidth, "
          "2 · matmul weights · rows / peak)")
    print(text_table(*floor_rows(floors, shapes)))
    if args.clients:
        print()
        print("Sweep floors (every client's 3 sequences in each step)")
        print(text_table(["clients", "rows", "ms / step", "bound", "floor tok/s"],
                         [[str(c), str(f["rows"]), f"{f['step_s'] * 1e3:.1f}", f["bound"],
                           f"{f['tokens_per_s']:.0f}"]
                          for c, f in ((c, sweep_floor(probe, sizes, args, c))
                                       for c in args.clients)]))
    print()


# --------------------------------------------------------------------------------------------
# llama.cpp (optional; benches/compare/llama_cpp.py does the work)

# The shapes llama-batched-bench can run: sequences decoded together (it has no beam search).
LLAMA_BATCH_OF_SHAPE = {"default": 3, "greedy": 1}


def llama_bench(args) -> Path:
    return args.llama_cpp / "build" / "bin" / "llama-batched-bench"


def run_llama_cpp(args, shapes: dict) -> None:
    """Adds entry["llama_cpp"] (tokens/s) and entry["vs_llama_cpp"] (ours tok/s / theirs) to
    the default and greedy shapes, llama.cpp running the same weight format (GGUF f32, q8_0 or
    bf16 for --dtype f32, q8_0, bf16)."""
    sys.path.insert(0, str(HERE))
    import llama_cpp as lc  # benches/compare/llama_cpp.py
    bench = llama_bench(args)
    gguf_dir = REPO_ROOT / "target" / "bench"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    try:  # llama_cpp.py reports its failures and exits
        gguf = lc.convert(args.llama_cpp, args.model_dir, gguf_dir, args.dtype)
        for name, entry in shapes.items():
            batch = LLAMA_BATCH_OF_SHAPE.get(name)
            if batch is None:
                continue
            log(f"shape {name}: llama.cpp {args.dtype}, {batch} sequence(s)")
            theirs = lc.llama_tokens_per_s(bench, gguf, batch, args.threads)
            entry["llama_cpp"] = {"tokens_per_s": theirs, "sequences": batch,
                                  "weights": lc.LLAMA_TYPE_OF_DTYPE[args.dtype]}
            if lc.REPACK_OFF:
                entry["llama_cpp"]["repack"] = False
            if entry["ours"]["tokens_per_s"]:
                entry["vs_llama_cpp"] = entry["ours"]["tokens_per_s"] / theirs
    except SystemExit:
        raise BenchError("llama.cpp comparison failed (its output is above)") from None


# --------------------------------------------------------------------------------------------
# Single-request shapes


def summarize(raw: dict) -> dict:
    """Median (statistics.median, for both engines alike) and tokens/s from a result line."""
    runs = [float(t) for t in raw["runs"]]
    median = statistics.median(runs)
    tokens = int(raw["generated_tokens"])
    return {"runs_s": runs, "median_s": median, "generated_tokens": tokens,
            "tokens_per_s": tokens / median if median > 0 else None, "raw": raw}


def bench_hf(args, shape: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, HERE / "hf_bench.py", "--model", args.model_dir, "--shape", shape,
           "--runs", args.runs, "--threads", args.threads]
    proc = run_checked(cmd, env=env)
    return summarize(last_json_line(proc.stdout, f"hf_bench.py --shape {shape}"))


def bench_ours(args, shape: str, request_file: Path) -> dict:
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    cmd = [args.gpt2_bin, "bench", "--model", args.model_dir, "--request", request_file,
           "--runs", args.runs, "--warmup", "1", "--dtype", args.dtype, "--kv-dtype", args.kv_dtype]
    proc = run_checked(cmd, env=env)
    return summarize(last_json_line(proc.stdout, f"gpt2 bench ({shape})"))


def run_shapes(args, workdir: Path) -> dict:
    results = {}
    for shape in args.shapes:
        request_file = workdir / f"request-{shape}.json"
        request_file.write_text(json.dumps(SHAPES[shape]))
        entry = {"request": SHAPES[shape], "description": SHAPE_NOTES[shape]}
        if not args.skip_hf:
            log(f"shape {shape}: HF transformers ({args.runs} runs, loadavg {loadavg()})")
            entry["hf"] = bench_hf(args, shape)
            log(f"  HF   median {entry['hf']['median_s']:.3f} s")
        log(f"shape {shape}: gpt2-rs ({args.runs} runs, loadavg {loadavg()})")
        entry["ours"] = bench_ours(args, shape, request_file)
        log(f"  ours median {entry['ours']['median_s']:.3f} s")
        if "hf" in entry:
            entry["speedup"] = entry["hf"]["median_s"] / entry["ours"]["median_s"]
        results[shape] = entry
    return results


# --------------------------------------------------------------------------------------------
# Concurrency sweep


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values, q: float) -> float:
    """Linear-interpolation percentile (q in [0, 100]), like numpy's default."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class Server:
    """gpt2-server as a child process; its stderr log lines are collected by a reader thread."""

    def __init__(self, args):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.lines = []          # every stderr line, for error reports
        self.by_id = {}          # request_id -> parsed JSON invocation log line
        self.cond = threading.Condition()
        cmd = [str(args.server_bin), "--model", str(args.model_dir), "--host", "127.0.0.1",
               "--port", str(self.port), "--queue-capacity", "512", "--deadline-secs", "3600",
               "--log-format", "json", "--dtype", args.dtype, "--kv-dtype", args.kv_dtype]
        cmd += args.server_args.split()
        self.cmd = " ".join(cmd)
        env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
        env.pop("RUST_LOG", None)  # the invocation lines are logged at info
        log(f"starting: RAYON_NUM_THREADS={args.threads} {self.cmd}")
        try:
            self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         text=True)
        except OSError as e:
            raise BenchError(f"could not start `{self.cmd}`: {e}") from None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            with self.cond:
                self.lines.append(line)
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    obj = None
                if isinstance(obj, dict) and "request_id" in obj:
                    self.by_id[str(obj["request_id"])] = obj
                self.cond.notify_all()

    def stderr_tail(self, n=40) -> str:
        with self.cond:
            return "\n".join(self.lines[-n:])

    def fail(self, msg: str) -> BenchError:
        return BenchError(f"{msg}\n--- gpt2-server stderr (last lines) ---\n"
                          f"{self.stderr_tail()}\n--- end of stderr ---")

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.reader.join(timeout=2)
                raise self.fail(f"`{self.cmd}` exited with code {self.proc.returncode} "
                                "before answering /ping")
            try:
                with urllib.request.urlopen(self.base + "/ping", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise self.fail(f"gpt2-server did not answer GET /ping with 200 within {timeout_s:.0f} s")

    def log_lines_for(self, ids, timeout_s: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while True:
                missing = [i for i in ids if i not in self.by_id]
                if not missing:
                    return {i: self.by_id[i] for i in ids}
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(timeout=left)
        raise self.fail(f"no JSON log line for {len(missing)} request id(s), e.g. {missing[:3]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            log("stopping gpt2-server (SIGTERM)")
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                log("gpt2-server did not exit 60 s after SIGTERM; killing it")
                self.proc.kill()
                self.proc.wait()
        self.reader.join(timeout=5)


def post_invocation(base: str, body: dict, request_id: str):
    data = json.dumps(body).encode()
    req = urllib.request.Request(base + "/invocations", data=data, method="POST",
                                 headers={"Content-Type": "application/json",
                                          "X-Request-Id": request_id})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=3600) as r:
            payload = r.read()
            status, rid = r.status, r.headers.get("x-request-id")
    except urllib.error.HTTPError as e:
        payload = e.read()
        status, rid = e.code, e.headers.get("x-request-id")
    latency = time.perf_counter() - t0
    return status, rid, payload, latency


def post_streamed(base: str, body: dict, request_id: str):
    """POSTs `body` with `"stream": true`; returns (time to the first `data:` event, time to
    `data: [DONE]`, number of token events), all client-side."""
    import http.client
    from urllib.parse import urlparse
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=3600)
    t0 = time.perf_counter()
    conn.request("POST", "/invocations", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json", "X-Request-Id": request_id})
    response = conn.getresponse()
    if response.status != 200:
        raise BenchError(f"streamed request: HTTP {response.status}: {response.read()[:300]!r}")
    first, tokens = None, 0
    while True:
        line = response.readline()
        if not line:
            raise BenchError("streamed request: the stream ended without data: [DONE]")
        if not line.startswith(b"data: "):
            continue
        if first is None:
            first = time.perf_counter() - t0
        if line.strip() == b"data: [DONE]":
            break
        tokens += b'"token"' in line
    total = time.perf_counter() - t0
    conn.close()
    return first, total, tokens


def streamed_first_token(server: Server, runs: int) -> dict:
    """Time to first token of the streamed default request, alone on the server."""
    firsts, totals = [], []
    for i in range(runs):
        first, total, tokens = post_streamed(server.base, {"input": PROMPT, "seed": 500 + i},
                                             f"bench-stream-{i}")
        firsts.append(first)
        totals.append(total)
    return {"runs": runs, "first_token_s": firsts, "total_s": totals,
            "median_first_token_s": statistics.median(firsts),
            "median_total_s": statistics.median(totals)}


def decode_step_totals(server: Server) -> dict:
    """The server's decode-step counters from `GET /metrics`: steps run, their seconds, and the
    sequences they carried."""
    with urllib.request.urlopen(server.base + "/metrics", timeout=30) as r:
        text = r.read().decode()
    wanted = {"gpt2_decode_step_duration_seconds_count": "steps",
              "gpt2_decode_step_duration_seconds_sum": "seconds",
              "gpt2_decode_batch_rows_sum": "rows"}
    totals = {key: 0.0 for key in wanted.values()}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        key = wanted.get(name.split("{", 1)[0])
        if key is not None:
            totals[key] = float(value)
    return totals


def sweep_level(server: Server, clients: int, per_client: int, seed_base: int) -> dict:
    before = decode_step_totals(server)
    barrier = threading.Barrier(clients + 1)
    results = [[] for _ in range(clients)]
    errors = []

    def client(c: int):
        barrier.wait()
        for j in range(per_client):
            seed = seed_base + c * per_client + j
            rid = f"bench-n{clients}-c{c}-r{j}"
            try:
                status, got_id, payload, latency = post_invocation(
                    server.base, {"input": PROMPT, "seed": seed}, rid)
            except Exception as e:  # connection refused, reset, timeout...
                errors.append(f"client {c} request {j}: {type(e).__name__}: {e}")
                return
            if status != 200:
                errors.append(f"client {c} request {j}: HTTP {status}: "
                              f"{payload.decode(errors='replace')[:500]}")
                return
            results[c].append({"request_id": got_id or rid, "seed": seed,
                               "latency_s": latency})

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise server.fail(f"{len(errors)} request(s) failed at {clients} clients:\n"
                          + "\n".join(errors[:10]))

    after = decode_step_totals(server)
    steps = after["steps"] - before["steps"]
    requests = [r for per in results for r in per]
    logs = server.log_lines_for([r["request_id"] for r in requests])
    for r in requests:
        line = logs[r["request_id"]]
        if line.get("status") != 200 or "generated_tokens" not in line:
            raise server.fail(f"unexpected log line for {r['request_id']}: {line}")
        r["generated_tokens"] = int(line["generated_tokens"])
        for k in ("queue_ms", "first_token_ms", "generation_ms", "total_ms"):
            r[k] = line.get(k)
    lat = [r["latency_s"] for r in requests]
    tokens = sum(r["generated_tokens"] for r in requests)
    return {
        "clients": clients,
        "requests_per_client": per_client,
        "requests": requests,
        "wall_s": wall,
        "generated_tokens": tokens,
        "aggregate_tokens_per_s": tokens / wall,
        "p50_latency_s": percentile(lat, 50),
        "p99_latency_s": percentile(lat, 99),
        "mean_queue_ms": statistics.mean(r["queue_ms"] or 0 for r in requests),
        "p50_first_token_s": percentile([(r["first_token_ms"] or 0) / 1000 for r in requests], 50),
        "decode_steps": {
            "steps": steps,
            "mean_step_s": (after["seconds"] - before["seconds"]) / steps if steps else None,
            "mean_rows": (after["rows"] - before["rows"]) / steps if steps else None,
        },
    }


def run_sweep(args) -> tuple:
    server = Server(args)
    levels = []
    try:
        server.wait_ready()
        log(f"gpt2-server ready on {server.base}")
        streamed = streamed_first_token(server, max(args.runs, 3))
        log(f"streamed default request: first token after {streamed['median_first_token_s']:.3f} s "
            f"(median), whole answer {streamed['median_total_s']:.3f} s")
        seed_base = 1000
        for n in args.clients:
            per_client = max(args.requests_per_client, 3) if n == 1 else args.requests_per_client
            log(f"sweep: {n} client(s) x {per_client} request(s) (loadavg {loadavg()})")
            before = run_probe(args, peaks_only=True)
            level = sweep_level(server, n, per_client, seed_base)
            level["peaks_around"] = peaks_around(before, run_probe(args, peaks_only=True))
            seed_base += n * per_client
            _, peak_key = peak_for(level["peaks_around"]["mean"], args.dtype)
            log(f"  {level['aggregate_tokens_per_s']:.1f} tok/s aggregate, "
                f"p50 {level['p50_latency_s']:.3f} s, p99 {level['p99_latency_s']:.3f} s; "
                f"{peak_key} {level['peaks_around']['before'][peak_key]:.0f} before the level, "
                f"{level['peaks_around']['after'][peak_key]:.0f} after")
            levels.append(level)
    finally:
        server.stop()
    base = next((lv for lv in levels if lv["clients"] == 1), None)
    for lv in levels:
        lv["throughput_vs_1_client"] = (lv["aggregate_tokens_per_s"] / base["aggregate_tokens_per_s"]
                                        if base else None)
        lv["p50_vs_lone_request"] = (lv["p50_latency_s"] / base["p50_latency_s"]
                                     if base else None)
    return levels, streamed


# --------------------------------------------------------------------------------------------
# Reporting


def cpu_model() -> str:
    """The CPU's model name, with its family and model numbers where /proc/cpuinfo has them:
    "AMD EPYC" alone names Zen 4 and Zen 5 alike (family 25 and 26)."""
    fields = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            fields.setdefault(key.strip().lower(), value.strip())
            if not line.strip():
                break
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def pkg_version(name: str) -> str:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return "not installed"


def cmd_output(cmd) -> str:
    try:
        out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(args) -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": pkg_version("torch"),
        "transformers": pkg_version("transformers"),
        "rustc": cmd_output(["rustc", "--version"]),
        "git_commit": cmd_output(["git", "rev-parse", "--short", "HEAD"]),
        "threads": args.threads,
        "loadavg_at_start": loadavg(),
        "model": model_info(args.model_dir),
    }


def model_info(model_dir: Path) -> str:
    try:
        c = json.loads((model_dir / "config.json").read_text())
        return (f"{model_dir.name}: n_layer {c.get('n_layer')}, n_head {c.get('n_head')}, "
                f"n_embd {c.get('n_embd')}, vocab {c.get('vocab_size')}, "
                f"n_positions {c.get('n_positions')}")
    except (OSError, ValueError) as e:
        return f"{model_dir} (config.json unreadable: {e})"


def fmt(x, spec=".3f", missing="–") -> str:
    return missing if x is None else format(x, spec)


def times(x, spec=".2f") -> str:
    return fmt(x, spec) + ("×" if x is not None else "")


def shapes_rows(shapes: dict, floors: dict, llama_ran: bool):
    header = ["shape", "HF median s", "ours median s", "speed-up (HF/ours)",
              "HF tok/s", "ours tok/s", "HF tokens", "ours tokens", "ours × floor",
              "ours / llama.cpp"]
    rows = []
    for name, e in shapes.items():
        hf, ours = e.get("hf"), e["ours"]
        if not llama_ran:
            llama = "not run"
        elif name not in LLAMA_BATCH_OF_SHAPE:
            llama = "–"
        else:
            llama = times(e.get("vs_llama_cpp"))
        rows.append([name, fmt(hf and hf["median_s"]), fmt(ours["median_s"]),
                     times(e.get("speedup")),
                     fmt(hf and hf["tokens_per_s"], ".1f"), fmt(ours["tokens_per_s"], ".1f"),
                     fmt(hf and hf["generated_tokens"], "d"), str(ours["generated_tokens"]),
                     times(floors.get(name, {}).get("ours_x_floor")), llama])
    return header, rows


def peaks_cell(around, args) -> str:
    """The format's peak in the probes before and after a level: "before / after"."""
    if not around:
        return "–"
    _, key = peak_for(around["mean"], args.dtype)
    return f"{around['before'][key]:.0f} / {around['after'][key]:.0f}"


def sweep_rows(levels: list, args):
    header = ["clients", "requests", "aggregate tok/s", "vs 1 client", "p50 latency s",
              "p99 latency s", "p50 / lone request", "p50 first token s", "floor tok/s",
              "× floor", "rows / step", "ms / step", "peak around", "steps % of peak"]
    rows = []
    for lv in levels:
        fl = lv.get("floor") or {}
        st = lv.get("decode_steps") or {}
        rows.append([str(lv["clients"]), str(len(lv["requests"])),
                     fmt(lv["aggregate_tokens_per_s"], ".1f"),
                     times(lv["throughput_vs_1_client"]),
                     fmt(lv["p50_latency_s"]), fmt(lv["p99_latency_s"]),
                     times(lv["p50_vs_lone_request"]),
                     fmt(lv.get("p50_first_token_s")), fmt(fl.get("tokens_per_s"), ".0f"),
                     times(fl.get("tokens_per_s") and
                           fl["tokens_per_s"] / lv["aggregate_tokens_per_s"]),
                     fmt(st.get("mean_rows"), ".1f"),
                     fmt(st.get("mean_step_s") and st["mean_step_s"] * 1000, ".1f"),
                     peaks_cell(lv.get("peaks_around"), args),
                     fmt(st.get("peak_fraction") and st["peak_fraction"] * 100, ".0f")])
    return header, rows


def text_table(header, rows) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def md_table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def hf_default_tps(shapes: dict):
    e = shapes.get("default")
    return e["hf"]["tokens_per_s"] if e and "hf" in e else None


def make_plot(levels: list, hf_tps, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [lv["clients"] for lv in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(xs, [lv["aggregate_tokens_per_s"] for lv in levels], "o-", label="gpt2-server")
    if hf_tps is not None:
        left.plot([1], [hf_tps], "s", color="tab:red", label="HF transformers (1 client)")
    left.set_xscale("log", base=2)
    left.set_xticks(xs, [str(x) for x in xs])
    left.set_xlabel("concurrent clients")
    left.set_ylabel("aggregate generated tokens/s")
    left.set_title("Throughput (default request)")
    left.set_ylim(bottom=0)
    left.grid(True, alpha=0.3)
    left.legend()

    right.plot(xs, [lv["p50_latency_s"] for lv in levels], "o-", label="p50")
    right.plot(xs, [lv["p99_latency_s"] for lv in levels], "^--", label="p99")
    right.set_xscale("log", base=2)
    right.set_xticks(xs, [str(x) for x in xs])
    right.set_xlabel("concurrent clients")
    right.set_ylabel("request latency (s)")
    right.set_title("Latency (default request)")
    right.set_ylim(bottom=0)
    right.grid(True, alpha=0.3)
    right.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def floors_markdown(probe: dict, sizes: dict, args, floors: dict, shapes: dict) -> list:
    parts = ["## Machine and floors", "",
             "`target/release/machine_probe` (benches/src/bin/machine_probe.rs) measured, just "
             "before the runs:", "", "| | |", "|---|---|"]
    parts += [f"| {k} | {v} |" for k, v in probe_summary_rows(probe)]
    peak, peak_key = peak_for(probe, args.dtype)
    parts += [
        "",
        f"Each decode step reads every weight once: {sizes['matmul_params'] / 1e6:.1f} M matmul "
        f"weights (12 d² per block and the tied LM head) at {WEIGHT_BYTES[args.dtype]:.4g} bytes "
        f"each for `--dtype {args.dtype}` (f32 4, bf16 2, q8_0 34/32), biases and layer norms in "
        "f32, plus the KV caches it attends over; and it computes 2 operations per weight per "
        "row in flight (sequences: 3 default, 5 beam, 1 greedy). So a step takes at least",
        "",
        "    floor_step = max((weight bytes + KV bytes) / read bandwidth, "
        "2 · matmul weights · rows / peak)",
        "",
        f"with the read bandwidth of {probe['threads']} threads and, for {args.dtype}, the "
        f"`{peak_key}` peak ({peak:.0f} G operations/s). A request's floor is the prefill (one pass over the "
        f"{PROMPT_TOKENS}-token prompt, which yields the first token) plus one floor_step per "
        "further token of the longest sequence (94 when every sequence reaches max_length 100); "
        "*passes* counts those forward passes; *ours × floor* is the measured median over "
        "the floor (1.00× would be the machine's limit). The probe is only as good as the moment "
        "it ran: on a shared machine it under-measures, and a ratio below 1.00× says it did.",
        "",
        md_table(*floor_rows(floors, shapes)),
        "",
    ]
    parts += probe_moves_markdown(probe, args)
    if any(f["steps_from"] not in ("max_length", "reported") for f in floors.values()):
        parts += ["\\* some sequences ended at EOS: passes = ceil(generated tokens / returned "
                  "sequences), the fewest the longest one can have.", ""]
    return parts


def write_markdown(path: Path, png: Path, jsn: Path, meta: dict, args, shapes: dict,
                   levels, streamed, command: str, probe: dict, sizes: dict,
                   floors: dict) -> None:
    m = meta
    parts = [
        "# Performance: gpt2-rs vs Hugging Face transformers (CPU)",
        "",
        "Generated by `benches/compare/run.py`; raw numbers in "
        f"[{jsn.name}]({jsn.name}). The model is a GPT-2 124M checkpoint with random weights "
        "(`benches/compare/make_checkpoint.py`), float32, so speed is what is compared, not text.",
        "",
        "Reproduce from the repository root:",
        "",
        "```sh",
        command,
        "```",
        "",
        "| | |",
        "|---|---|",
        f"| date | {m['date']} |",
        f"| machine | {m['cpu']}, {m['logical_cpus']} logical CPUs ({m['usable_cpus']} usable), {m['os']} |",
        f"| versions | gpt2-rs `{m['git_commit']}`, {m['rustc']}, transformers {m['transformers']}, "
        f"torch {m['torch']}, Python {m['python']} |",
        f"| model | {m['model']}, float32 |",
        f"| gpt2-rs storage | `--dtype {args.dtype} --kv-dtype {args.kv_dtype}` (HF runs float32) |",
        f"| threads | {m['threads']} per engine (`RAYON_NUM_THREADS` for ours, "
        "`torch.set_num_threads` for HF) |",
        f"| runs | {args.runs} timed runs per shape after 1 warm-up, median reported |",
        f"| load average at start | {m['loadavg_at_start']} |",
        "",
    ]
    parts += floors_markdown(probe, sizes, args, floors, shapes)
    parts += ["## Single requests", ""]
    if shapes:
        parts += [md_table(*shapes_rows(shapes, floors, args.llama_cpp is not None)), ""]
        parts += ["Shapes (prompt `\"This is an input text\"`, 5 tokens): "
                  + "; ".join(f"`{n}`: {SHAPE_NOTES[n]}" for n in shapes) + "."]
        parts += [
            "",
            "Columns: *median s* is the median wall time of one `generate` call (model loading "
            "excluded; HF times `model.generate()`, ours `gpt2 bench`); *speed-up* is HF median / "
            "ours median (above 1 means gpt2-rs is faster); *tok/s* is generated tokens (summed "
            "over returned sequences, up to and including EOS) / median; *tokens* is that count. "
            "Sampled shapes use different random streams in each engine, so token counts may differ. "
            "*ours × floor*: see Machine and floors above. *ours / llama.cpp* is our tok/s over "
            "llama.cpp's (`llama-batched-bench`, same checkpoint as GGUF in the same weight "
            "format, same threads; 3 sequences for default, 1 for greedy, no beam search), "
            "above 1 means gpt2-rs is faster; *not run* without `--llama-cpp DIR`.",
            "",
        ]
        if any(e.get("llama_cpp", {}).get("repack") is False for e in shapes.values()):
            parts += ["llama.cpp died with its weight repacking on (its AMX and repacked "
                      "kernels), so its runs here had it off (`--no-repack`); see "
                      "`benches/compare/llama_cpp.py`.", ""]
    else:
        parts += ["(not run)", ""]
    parts += ["## Concurrency (gpt2-server)", ""]
    if levels:
        parts += [
            f"![throughput and latency vs clients]({png.name})",
            "",
            md_table(*sweep_rows(levels, args)),
            "",
        ]
        hf = hf_default_tps(shapes)
        if hf is not None:
            parts += [f"HF transformers, 1 client, default request (from the table above): "
                      f"{hf:.1f} tok/s.", ""]
        parts += [
            "Each client thread POSTs the default request (`{\"input\": \"This is an input "
            "text\", \"seed\": <distinct>}`) to `/invocations` "
            f"{args.requests_per_client} time(s) in a row ({max(args.requests_per_client, 3)} "
            "at 1 client), all clients starting together; the server runs with `--queue-capacity 512 --deadline-secs 3600`.",
            "",
            "Columns: *aggregate tok/s* is the generated tokens of all the level's requests (from "
            "the server's JSON log line of each request) / the level's wall time; *vs 1 client* "
            "is that divided by the 1-client value; *p50* / *p99 latency* are client-side request "
            "latencies; *p50 / lone request* is the p50 divided by the 1-client p50; *p50 first "
            "token* is the median time from admission to the first token (`first_token_ms` of the "
            "server's log lines); *floor tok/s* is the aggregate at the floor with every client's 3 "
            "sequences in each step (floor_step above at 3 × clients rows, 50 positions cached), "
            "and *× floor* is that over the measured aggregate. *rows / step* and *ms / step* are "
            "the mean sequences and duration of the level's decode steps (the server's "
            "`gpt2_decode_step_duration_seconds` and `gpt2_decode_batch_rows` from `GET /metrics`, "
            "read before and after the level; a step's time includes sampling its rows and any "
            "prompt chunk riding in it); *peak around* is the format's arithmetic peak (G "
            "operations/s) that `machine_probe --peaks-only` measured just before and just "
            "after the level; *steps % of peak* is the compute floor of a step of those rows (2 "
            "operations per matmul weight per row at the mean of those two peaks) over that "
            "time, a lower bound since the chunks' work is not counted.",
            "",
        ]
        if streamed:
            parts += [
                "Time to first token of the streamed default request (`\"stream\": true`), alone "
                f"on the server, client-side: **{streamed['median_first_token_s']:.3f} s** (median "
                f"of {streamed['runs']}; the whole answer took {streamed['median_total_s']:.3f} s).",
                "",
            ]
    else:
        parts += ["(not run)", ""]
    parts += ["## Notes", "", "(analysis written by hand after each run)", ""]
    path.write_text("\n".join(parts))


def reproduce_command(args) -> str:
    cmd = "/path/to/venv-with-torch/bin/python benches/compare/run.py"
    defaults = {"threads": 2, "runs": 3, "requests_per_client": 2}
    extra = []
    for k, v in defaults.items():
        if getattr(args, k) != v:
            extra.append(f"--{k.replace('_', '-')} {getattr(args, k)}")
    if args.shapes != list(SHAPES):
        extra.append("--shapes " + ",".join(args.shapes))
    if args.clients != [1, 4, 16, 64]:
        extra.append("--clients " + ",".join(map(str, args.clients)))
    for flag in ("skip_hf", "skip_sweep"):
        if getattr(args, flag):
            extra.append("--" + flag.replace("_", "-"))
    if args.dtype != "f32" or args.kv_dtype != "f32":
        extra.append(f"--dtype {args.dtype} --kv-dtype {args.kv_dtype}")
    if args.llama_cpp is not None:
        extra.append("--llama-cpp /path/to/llama.cpp")
    return " ".join([cmd] + extra)


# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES),
                    help="comma-separated single-request shapes (default: %(default)s)")
    ap.add_argument("--skip-hf", action="store_true", help="time only gpt2-rs")
    ap.add_argument("--skip-sweep", action="store_true", help="skip the server concurrency sweep")
    ap.add_argument("--clients", default="1,4,16,64",
                    help="comma-separated client counts for the sweep (default: %(default)s)")
    ap.add_argument("--requests-per-client", type=int, default=2,
                    help="requests per client per level; the 1-client level does at least 3")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per shape and engine")
    ap.add_argument("--threads", type=int, default=2, help="compute threads for each engine")
    ap.add_argument("--model-dir", type=Path, default=REPO_ROOT / "target" / "bench" / "gpt2-124m")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build")
    ap.add_argument("--server-args", default="", metavar="ARGS",
                    help="extra gpt2-server flags for the sweep, e.g. \"--max-batch-rows 4096\"")
    ap.add_argument("--probe-only", action="store_true",
                    help="probe the machine, print the probe and each shape's floor, and stop")
    ap.add_argument("--llama-cpp", type=Path, default=None, metavar="DIR",
                    help="llama.cpp tree with build/bin/llama-batched-bench (see llama_cpp.py): "
                         "adds the ours / llama.cpp column")
    ap.add_argument("--dtype", default="f32", choices=list(WEIGHT_BYTES),
                    help="weight format of gpt2-rs (HF always runs f32)")
    ap.add_argument("--kv-dtype", default="f32", choices=list(KV_BYTES),
                    help="KV cache format of gpt2-rs")
    ap.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "performance.md",
                    help="markdown report; the .png and .json go next to it with the same stem")
    args = ap.parse_args(argv)

    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shape(s) {unknown}; choose from {list(SHAPES)}")
    try:
        args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--clients must be comma-separated integers, got {args.clients!r}")
    if any(c < 1 for c in args.clients):
        ap.error("--clients values must be >= 1")
    args.clients = sorted(set(args.clients))
    for name in ("requests_per_client", "runs", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    args.model_dir = args.model_dir.expanduser().resolve()
    args.output = args.output.expanduser().resolve()
    args.gpt2_bin = REPO_ROOT / "target" / "release" / "gpt2"
    args.server_bin = REPO_ROOT / "target" / "release" / "gpt2-server"
    args.probe_bin = REPO_ROOT / "target" / "release" / "machine_probe"
    if args.llama_cpp is not None:
        args.llama_cpp = args.llama_cpp.expanduser().resolve()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sweep = not (args.probe_only or args.skip_sweep or not args.clients)
    if sweep:  # the sweep's plot; fail before the long runs, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchError(f"matplotlib is missing from {sys.executable}; "
                             f"install it: {sys.executable} -m pip install matplotlib "
                             "(or pass --skip-sweep)") from None
    if not (args.skip_hf or args.probe_only):
        for pkg in ("torch", "transformers", "safetensors"):
            if pkg_version(pkg) == "not installed":
                raise BenchError(f"{pkg} is missing from {sys.executable} (needed for the HF "
                                 "side; use a venv with torch, transformers and safetensors, "
                                 "or pass --skip-hf)")

    if not args.no_build:
        build(args)
    if not args.probe_only:
        for b in (args.gpt2_bin, args.server_bin):
            if not b.is_file():
                raise BenchError(f"{b} does not exist; build it (drop --no-build)")
        if args.llama_cpp is not None and not llama_bench(args).is_file():
            raise BenchError(f"{llama_bench(args)} does not exist (build llama.cpp as "
                             "benches/compare/llama_cpp.py --help says, or drop --llama-cpp)")
    if args.probe_only and not (args.model_dir / "config.json").is_file():
        raise BenchError(f"{args.model_dir / 'config.json'} is missing (the floors need the "
                         "model's shape; run once without --probe-only to create the checkpoint)")
    if not args.probe_only:
        ensure_checkpoint(args.model_dir)

    # The probe runs first, on an idle machine, before either engine has loaded anything.
    probe = run_probe(args)
    sizes = model_sizes(args.model_dir)
    log(f"{probe_cpu(probe)}: read {probe['read_gbs']:.1f} GB/s, f32 FMA "
        f"{probe['f32_fma_gflops']:.0f} GFLOP/s, int8 {probe.get('int8_vnni_gops')} GOPS, "
        f"bf16 {probe.get('bf16_dot_gflops')} GFLOP/s, AMX bf16 {probe.get('amx_bf16_gflops')} "
        f"GFLOP/s ({probe.get('probe_s')} s)")
    if args.probe_only:
        floors = {name: request_floor(probe, sizes, args, name) for name in args.shapes}
        print_probe_and_floors(probe, sizes, args, floors, {})
        return 0

    meta = machine_info(args)
    log(f"{meta['cpu']}, {meta['usable_cpus']} usable CPUs, threads={args.threads}, "
        f"commit {meta['git_commit']}, loadavg {meta['loadavg_at_start']}")

    with tempfile.TemporaryDirectory(prefix="gpt2-bench-") as tmp:
        shapes = run_shapes(args, Path(tmp)) if args.shapes else {}
    if args.llama_cpp is not None and shapes:
        run_llama_cpp(args, shapes)
    if shapes:
        # A shared VM's speed can move by half within minutes (a 2-core Xeon read 16.5 to
        # 24.7 GB/s in one evening): probe again after the single requests, and the report says
        # how far the machine moved under the floors it gives.
        again = run_probe(args)
        probe["after_single_requests"] = {key: again.get(key) for key in PROBE_MOVES}
        log(f"probe again after the single requests: read {again['read_gbs']:.1f} GB/s "
            f"({again['read_gbs'] / probe['read_gbs'] - 1:+.0%} from the first probe)")
    floors = {name: request_floor(probe, sizes, args, name, shapes.get(name, {}).get("ours"))
              for name in args.shapes}
    levels, streamed = run_sweep(args) if sweep else ([], None)
    for lv in levels:
        lv["floor"] = sweep_floor(probe, sizes, args, lv["clients"])
        lv["decode_steps"]["peak_fraction"] = steps_peak_fraction(
            probe, sizes, args, lv["decode_steps"], lv.get("peaks_around"))
        lv["decode_steps"]["peak_fraction_first_probe"] = steps_peak_fraction(
            probe, sizes, args, lv["decode_steps"])

    out_md = args.output
    out_png = out_md.with_suffix(".png")
    out_json = out_md.with_suffix(".json")
    out_md.parent.mkdir(parents=True, exist_ok=True)

    print()
    print_probe_and_floors(probe, sizes, args, floors, shapes)
    if shapes:
        print(f"Single requests ({args.threads} threads, median of {args.runs} runs)")
        print(text_table(*shapes_rows(shapes, floors, args.llama_cpp is not None)))
        print()
    if levels:
        print("Concurrency sweep (gpt2-server, default request)")
        print(text_table(*sweep_rows(levels, args)))
        print(f"Streamed default request alone: first token after "
              f"{streamed['median_first_token_s']:.3f} s (median of {streamed['runs']})")
        hf = hf_default_tps(shapes)
        if hf is not None:
            print(f"HF transformers, 1 client, default request: {hf:.1f} tok/s")
        print()

    command = reproduce_command(args)
    raw = {"meta": meta, "command": command,
           "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "probe": probe, "model_sizes": sizes, "floors": floors,
           "shapes": shapes,
           "sweep": {"levels": levels, "hf_default_1_client_tokens_per_s": hf_default_tps(shapes),
                     "streamed_default_request": streamed}}
    out_json.write_text(json.dumps(raw, indent=2) + "\n")
    if levels:
        make_plot(levels, hf_default_tps(shapes), out_png)
    write_markdown(out_md, out_png, out_json, meta, args, shapes, levels, streamed, command,
                   probe, sizes, floors)
    log(f"wrote {out_md}, {out_json}" + (f", {out_png}" if levels else ""))
    return 0


def exit_with(main) -> None:
    """Runs a script's `main` and exits with its code: 1 with one line on stderr on a
    BenchError, 130 on Ctrl-C (shared with ab.py)."""
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    exit_with(main)
