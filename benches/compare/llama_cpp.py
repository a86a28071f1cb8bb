#!/usr/bin/env python3
"""gpt2-rs against llama.cpp on the same random GPT-2 124M checkpoint, in one run.

llama.cpp is the CPU peer to beat. Build it from the source package PyPI ships (its sdist vendors
llama.cpp), then point this script at the vendored tree:

    pip download --no-deps --no-binary :all: llama_cpp_python   # or fetch the sdist by URL
    tar xzf llama_cpp_python-*.tar.gz && cd llama_cpp_python-*/vendor/llama.cpp
    cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF && cmake --build build -j \
        --target llama-batched-bench llama-bench
    python benches/compare/llama_cpp.py --llama-cpp <that directory> --model-dir <checkpoint>

(`pip download --no-binary :all:` also builds the sdist's build requirements, cmake among them,
from source just to read its metadata; fetching the .tar.gz that https://pypi.org/pypi/
llama_cpp_python/json lists is much quicker.)

Steps:
  1. convert the checkpoint to GGUF (f32, q8_0, bf16: the --formats) with llama.cpp's
     convert_hf_to_gguf.py (skipped when the files exist); it needs torch, transformers and
     llama.cpp's gguf-py, so run this script with a Python that has torch and transformers.
     Our --dtype bf16 is compared with llama.cpp's bf16 (--bf16-peer f16 for its f16 instead).
  2. per weight format and batch (--sequences: 1, 3, 16; prompt 5 tokens, 95 generated each),
     --rounds times, the two engines alternating (llama.cpp, then ours) so both see the same
     machine state:
       llama-batched-bench -m GGUF -npp 5 -ntg 95 -npl B -t T -tb T
       RAYON_NUM_THREADS=T target/release/gpt2 bench --dtype D --request R --runs 1 --warmup 1
     where R is the contract's request with that many sequences (greedy for 1, the default
     sample-top-p request for 3, 16 sample-top-p sequences for 16); llama-batched-bench decodes
     without sampling, so gpt2-rs does slightly more work per token. Each cell is the median
     over the rounds of generated tokens/s (all sequences, prompt processing included).
  3. per weight format, prompt processing (--pp-tokens, 512; 0 skips it), --rounds times,
     alternating:
       llama-bench -m GGUF -p 512 -n 0 -t T -r 1 -o jsonl           (its pp512 t/s; it warms up)
       RAYON_NUM_THREADS=T target/release/gpt2 bench --dtype D --runs 1 --warmup 1 --request
           '{"input": <a text of exactly 512 tokens>, "mode": "greedy",
             "num_return_sequences": 1, "max_new_tokens": 1}'
     ours is 512 / the request's wall time: tokenizing, the 512-token prefill and picking one
     token, so a little more than llama-bench's prefill alone. The cell is the median.
     Every measurement also records the share of the CPUs that other processes used meanwhile
     (/proc/stat less our children's CPU time); with --quiet-below SHARE each one first waits
     (up to --quiet-wait-s) until other processes keep the CPUs at most that busy. On a 2-CPU
     machine a parallel compile shows up at once: llama.cpp's spinning thread pool loses far
     more to a third runnable process than rayon does.
  4. print the CPU, the llama.cpp build, and a markdown table of both engines' median rates, the
     ratio gpt2-rs / llama.cpp (above 1: gpt2-rs is faster), the same ratio of the best rounds
     (less sensitive to other load on a small machine) and every round's figure.

Only the standard library is used here.
"""

import argparse
import datetime
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

from run import cpu_model  # noqa: E402

PROMPT = "This is an input text"
GENERATED = 95
BATCHES = {
    1: {"input": PROMPT, "mode": "greedy", "num_return_sequences": 1, "seed": 1},
    3: {"input": PROMPT, "seed": 1},
    16: {"input": PROMPT, "num_return_sequences": 16, "seed": 1},
}
# Our --dtype -> the GGUF type llama.cpp runs against it (convert_hf_to_gguf.py --outtype).
LLAMA_TYPE_OF_DTYPE = {"f32": "f32", "q8_0": "q8_0", "bf16": "bf16"}
# Words that are one GPT-2 token each (with their leading space), cycled into a long prompt.
PP_WORDS = ("The quick brown fox jumps over the lazy dog while the old man reads a long book "
            "about the history of the city and its people").split()


def fail(message: str, output: str = "") -> None:
    print(f"[llama_cpp] error: {message}", file=sys.stderr)
    if output:
        print(output[-4000:], file=sys.stderr)
    sys.exit(1)


def log(message: str) -> None:
    print(f"[llama_cpp] {message}", file=sys.stderr, flush=True)


def run(cmd, env=None) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        fail(f"{' '.join(str(c) for c in cmd)} exited {proc.returncode}", proc.stdout + proc.stderr)
    return proc.stdout + proc.stderr


# GGUFs llama.cpp ran with its weight repacking off, because it died with it on.
REPACK_OFF = set()


def run_llama(cmd) -> str:
    """A llama.cpp benchmark run. Its weight repacking (on by default: AMX and other re-laid-out
    weights) dies on some CPUs: on a Sapphire Rapids Xeon, q8_0 killed llama-batched-bench with
    SIGSEGV and llama-bench with SIGILL (llama_cpp_python 0.3.36). A run killed by a signal is
    tried once more with repacking off (llama-bench `--repack 0`, llama-batched-bench
    `LLAMA_ARG_REPACK=false`), and the report says so."""
    cmd = [str(c) for c in cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode < 0 or proc.returncode > 128:
        gguf = cmd[cmd.index("-m") + 1]
        log(f"{Path(cmd[0]).name} on {Path(gguf).name} died (exit {proc.returncode}); "
            "again with weight repacking off")
        REPACK_OFF.add(Path(gguf).name)
        if Path(cmd[0]).name == "llama-bench":
            return run(cmd + ["--repack", "0"])
        return run(cmd, env=dict(os.environ, LLAMA_ARG_REPACK="false"))
    if proc.returncode != 0:
        fail(f"{' '.join(cmd)} exited {proc.returncode}", proc.stdout + proc.stderr)
    return proc.stdout + proc.stderr


def convert(llama_dir: Path, model_dir: Path, out_dir: Path, outtype: str) -> Path:
    """The checkpoint as GGUF of `outtype` (f32, f16, bf16, q8_0; an our-side --dtype name is
    mapped through LLAMA_TYPE_OF_DTYPE), converted once into out_dir."""
    outtype = LLAMA_TYPE_OF_DTYPE.get(outtype, outtype)
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
        log(f"converting {model_dir} to GGUF {outtype}")
        run([sys.executable, llama_dir / "convert_hf_to_gguf.py", tmp, "--outtype", outtype,
             "--outfile", out], env=env)
    return out


def llama_tokens_per_s(bench: Path, gguf: Path, batch: int, threads: int) -> float:
    """Generated tokens/s of one llama-batched-bench run (prompt processing included)."""
    out = run_llama([bench, "-m", gguf, "-c", str(batch * (5 + GENERATED) + 16), "-npp", "5",
               "-ntg", str(GENERATED), "-npl", str(batch), "-t", str(threads), "-tb", str(threads)])
    # Table rows: | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and cells[0] == "5" and cells[2] == str(batch):
            total_s = float(cells[8])
            return batch * GENERATED / total_s
    fail(f"no result row in llama-batched-bench output (batch {batch})", out)
    return 0.0


def llama_pp_tokens_per_s(llama_bench: Path, gguf: Path, tokens: int, threads: int) -> float:
    """llama-bench's prompt-processing rate (tokens/s) for a `tokens`-token prompt, one rep."""
    out = run_llama([llama_bench, "-m", gguf, "-p", str(tokens), "-n", "0", "-t", str(threads),
               "-r", "1", "-o", "jsonl"])
    for line in out.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            if row.get("n_prompt") == tokens and row.get("n_gen") == 0:
                return float(row["avg_ts"])
    fail(f"no pp{tokens} row in llama-bench output", out)
    return 0.0


def ours_bench(gpt2: Path, model_dir: Path, dtype: str, request: dict, threads: int,
               runs: int = 1) -> dict:
    """`gpt2 bench`'s JSON line for one request (--runs runs after one warmup run)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(request, f)
        request_file = f.name
    try:
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
        out = run([gpt2, "bench", "--model", model_dir, "--request", request_file, "--runs",
                   str(runs), "--warmup", "1", "--dtype", dtype], env=env)
    finally:
        os.unlink(request_file)
    return json.loads([l for l in out.splitlines() if l.startswith("{")][-1])


def pp_prompt(gpt2: Path, model_dir: Path, tokens: int) -> str:
    """A text that the checkpoint's tokenizer turns into exactly `tokens` tokens."""
    words = [PP_WORDS[i % len(PP_WORDS)] for i in range(tokens)]
    text = " ".join(words)
    ids = json.loads(run([gpt2, "tokenize", "--model", model_dir, text]).strip().splitlines()[-1])
    if len(ids) != tokens:
        fail(f"the {tokens}-word prompt is {len(ids)} tokens, not {tokens}")
    return text


def llama_version(bench: Path) -> str:
    proc = subprocess.run([str(bench), "--version"], capture_output=True, text=True)
    lines = [l for l in (proc.stdout + proc.stderr).splitlines() if l.startswith("version")]
    return lines[0] if lines else "unknown"


def median(values):
    return statistics.median(values)


def busy_cpu_s() -> float:
    """CPU seconds all CPUs have spent busy since boot (/proc/stat; steal counts as busy)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def others_share(call):
    """(call(), the share of the machine's CPU time that processes other than call's children
    used while it ran): how disturbed the measurement was, 0 on an idle machine."""
    wall, busy, ours = time.monotonic(), busy_cpu_s(), children_cpu_s()
    value = call()
    wall, busy, ours = time.monotonic() - wall, busy_cpu_s() - busy, children_cpu_s() - ours
    return value, max(0.0, busy - ours) / (wall * (os.cpu_count() or 1))


def wait_for_quiet(threshold: float, max_wait_s: float) -> None:
    """Waits (up to max_wait_s) until other processes keep the CPUs at most `threshold` busy
    over a 2 s sample; a no-op for threshold >= 1."""
    if threshold >= 1:
        return
    deadline = time.monotonic() + max_wait_s
    while True:
        busy = busy_cpu_s()
        time.sleep(2)
        share = (busy_cpu_s() - busy) / (2 * (os.cpu_count() or 1))
        if share <= threshold:
            return
        if time.monotonic() > deadline:
            log(f"not quiet after {max_wait_s:.0f} s (CPUs {share:.0%} busy); measuring anyway")
            return
        log(f"waiting for quiet: CPUs {share:.0%} busy")
        time.sleep(5)


def csv_ints(text: str):
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, required=True,
                    help="llama.cpp source tree with convert_hf_to_gguf.py and build/bin")
    ap.add_argument("--model-dir", type=Path, default=REPO_ROOT / "target" / "bench" / "gpt2-124m")
    ap.add_argument("--gguf-dir", type=Path, default=REPO_ROOT / "target" / "bench")
    ap.add_argument("--gpt2", type=Path, default=REPO_ROOT / "target" / "release" / "gpt2",
                    help="our binary (default: target/release/gpt2; pass a copy to keep a "
                         "concurrent cargo build from swapping it mid-run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", default="f32,q8_0,bf16",
                    help="our --dtype values, comma-separated (default: f32,q8_0,bf16)")
    ap.add_argument("--sequences", default="1,3,16",
                    help=f"batch sizes, comma-separated, of {sorted(BATCHES)} (default: 1,3,16)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternating runs of both engines per cell; the median counts (default 3)")
    ap.add_argument("--pp-tokens", type=int, default=512,
                    help="prompt length of the prompt-processing rows (0: no such rows)")
    ap.add_argument("--quiet-below", type=float, default=1.0, metavar="SHARE",
                    help="before each measurement, wait until other processes keep the CPUs at "
                         "most this busy (e.g. 0.1; default 1: never wait)")
    ap.add_argument("--quiet-wait-s", type=float, default=120,
                    help="longest wait for quiet before each measurement (default 120 s)")
    ap.add_argument("--nice", type=int, default=0,
                    help="add this to the niceness of this script and both engines, and set it as "
                         "the session's autogroup niceness (e.g. -10 on a shared machine, as "
                         "root: both engines then win the CPUs from other work alike; default 0)")
    ap.add_argument("--bf16-peer", choices=["bf16", "f16"], default="bf16",
                    help="llama.cpp's weight type against our bf16 (f16 where its CPU backend "
                         "lacks bf16)")
    args = ap.parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    for fmt in formats:
        if fmt not in LLAMA_TYPE_OF_DTYPE:
            ap.error(f"--formats: {fmt!r} is none of {list(LLAMA_TYPE_OF_DTYPE)}")
    sequences = csv_ints(args.sequences)
    for batch in sequences:
        if batch not in BATCHES:
            ap.error(f"--sequences: {batch} is none of {sorted(BATCHES)}")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    peer = dict(LLAMA_TYPE_OF_DTYPE, bf16=args.bf16_peer)
    if args.nice:
        try:
            os.nice(args.nice)
            # With the kernel's autogroups (sched_autogroup_enabled), niceness only counts
            # within this session's group; the group's own niceness sets its share against
            # the other sessions' work.
            autogroup = Path("/proc/self/autogroup")
            if autogroup.exists():
                autogroup.write_text(str(args.nice))
        except OSError as e:
            fail(f"--nice {args.nice}: {e}")

    bench = args.llama_cpp / "build" / "bin" / "llama-batched-bench"
    llama_bench = args.llama_cpp / "build" / "bin" / "llama-bench"
    gpt2 = args.gpt2
    needed = [bench, gpt2, args.model_dir / "config.json"]
    if args.pp_tokens:
        needed.append(llama_bench)
    for path in needed:
        if not path.exists():
            fail(f"{path} is missing (see --help)")
    args.gguf_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now().astimezone()
    pp_request = None
    if args.pp_tokens:
        pp_request = {"input": pp_prompt(gpt2, args.model_dir, args.pp_tokens), "mode": "greedy",
                      "num_return_sequences": 1, "max_new_tokens": 1}
    ggufs = {fmt: convert(args.llama_cpp, args.model_dir, args.gguf_dir, peer[fmt])
             for fmt in formats}

    def measure(call):
        wait_for_quiet(args.quiet_below, args.quiet_wait_s)
        return others_share(call)

    def llama_pp(fmt):
        return llama_pp_tokens_per_s(llama_bench, ggufs[fmt], args.pp_tokens, args.threads)

    def ours_pp(fmt):
        return args.pp_tokens / ours_bench(gpt2, args.model_dir, fmt, pp_request,
                                           args.threads)["median_s"]

    cells = []  # (ours dtype, what, llama.cpp's measurement, ours)
    for fmt in formats:
        for batch in sequences:
            cells.append((fmt, f"{batch}",
                          lambda f=fmt, b=batch: llama_tokens_per_s(bench, ggufs[f], b,
                                                                    args.threads),
                          lambda f=fmt, b=batch: ours_bench(gpt2, args.model_dir, f, BATCHES[b],
                                                            args.threads)["tokens_per_s"]))
        if pp_request is not None:
            cells.append((fmt, f"pp{args.pp_tokens}", lambda f=fmt: llama_pp(f),
                          lambda f=fmt: ours_pp(f)))
    rows = []  # (ours dtype, llama type, what, [theirs], [ours], max others' CPU share)
    for fmt, what, llama_call, ours_call in cells:
        theirs, ours, disturbed = [], [], []
        for r in range(args.rounds):
            value, share = measure(llama_call)
            theirs.append(value)
            disturbed.append(share)
            value, share2 = measure(ours_call)
            ours.append(value)
            disturbed.append(share2)
            log(f"{fmt} x {what} round {r + 1}: llama.cpp {theirs[-1]:.1f} tok/s (others' CPU "
                f"{share:.0%}), gpt2-rs {ours[-1]:.1f} tok/s (others' CPU {share2:.0%})")
        rows.append((fmt, peer[fmt], what, theirs, ours, max(disturbed)))

    print(f"\n{started:%Y-%m-%d %H:%M %Z}; CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; "
          f"{args.threads} threads for both")
    group = Path("/proc/self/autogroup")
    group = f", {group.read_text().strip()}" if group.exists() else ""
    print(f"llama.cpp: {llama_version(bench)}; niceness {os.nice(0)}{group} for both engines")
    pp_note = (f" pp rows: prompt tokens/s of a {args.pp_tokens}-token prompt."
               if args.pp_tokens else "")
    print(f"median of {args.rounds} alternating rounds per cell. Sequence rows: prompt 5 tokens, "
          f"{GENERATED} generated per sequence, generated tokens/s (prompt processing included)."
          f"{pp_note}\n")
    print("| weights (gpt2-rs / llama.cpp) | sequences | gpt2-rs tok/s | llama.cpp tok/s "
          "| gpt2-rs / llama.cpp | best: gpt2-rs / llama.cpp | gpt2-rs runs | llama.cpp runs "
          "| others' CPU, worst run |")
    print("|---|---:|---:|---:|---:|---:|---|---|---:|")
    for fmt, theirs_type, what, theirs, ours, disturbed in rows:
        t, o = median(theirs), median(ours)
        weights = fmt if fmt == theirs_type else f"{fmt} / {theirs_type}"
        print(f"| {weights} | {what} | {o:.1f} | {t:.1f} | {o / t:.2f}× "
              f"| {max(ours):.1f} / {max(theirs):.1f} = {max(ours) / max(theirs):.2f}× "
              f"| {', '.join(f'{v:.1f}' for v in ours)} "
              f"| {', '.join(f'{v:.1f}' for v in theirs)} | {disturbed:.0%} |")
    if REPACK_OFF:
        print(f"\nllama.cpp died with its weight repacking on for {', '.join(sorted(REPACK_OFF))}; "
              "those runs had it off (`--no-repack`).")


if __name__ == "__main__":
    main()
