#!/usr/bin/env python3
"""How much a long prompt's prefill delays the streams already running (issue 14, item 5).

For each --prefill-chunk-tokens value, starts target/release/gpt2-server, streams a greedy request
(the "running stream"), and once it is decoding sends a request with a long prompt. It records the
running stream's inter-token gaps before the long request (its normal pace) and while the long
prompt is prefilled, and prints, per setting: the normal p50 and p99 gap, the p99 and the longest
gap during the prefill, and their ratio to the normal p99 (the goal: ≤ 2).

    python3 benches/compare/prefill_stall.py --model-dir DIR [--chunks 64,8192] [--runs 3] [--stall-percent 50]
        [--dtype f32|bf16|q8_0] [--kv-dtype f32|f16]

--stall-percent is the server's --max-prefill-stall-percent: how much one chunk may lengthen a
decode step (the chunks are sized by measurement below the --prefill-chunk-tokens cap).

Only the standard library; the server binary must be built (cargo build --release -p gpt2-server).
"""
import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

from run import cpu_model  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def start_server(args, chunk: int):
    port = free_port()
    cmd = [str(args.server_bin), "--model", str(args.model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--log-format", "json", "--dtype", args.dtype,
           "--kv-dtype", args.kv_dtype,
           "--prefill-chunk-tokens", str(chunk),
           "--max-prefill-stall-percent", str(args.stall_percent)]
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/ping")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        if proc.poll() is not None:
            sys.exit(f"gpt2-server exited with {proc.returncode}: {' '.join(cmd)}")
        time.sleep(0.2)
    proc.kill()
    sys.exit("gpt2-server did not answer /ping within 120 s")


def post(port: int, body: dict, timeout=600) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/invocations", body=json.dumps(body),
                 headers={"Content-Type": "application/json"})
    return conn.getresponse()


def one_run(port: int, long_prompt: str, warm_tokens: int) -> dict:
    running = post(port, {"input": "The", "mode": "greedy", "num_return_sequences": 1,
                          "max_new_tokens": 400, "stream": True})
    arrivals = []
    long_window = {}

    def send_long():
        long_window["sent"] = time.perf_counter()
        response = post(port, {"input": long_prompt, "mode": "greedy",
                               "num_return_sequences": 1, "max_new_tokens": 1})
        response.read()
        long_window["done"] = time.perf_counter()
        long_window["status"] = response.status

    sender = None
    for raw in running:
        line = raw.decode().strip()
        if not line.startswith("data: {"):
            continue
        event = json.loads(line[6:])
        if "token" in event:
            arrivals.append(time.perf_counter())
        if len(arrivals) == warm_tokens and sender is None:
            sender = threading.Thread(target=send_long)
            sender.start()
        if sender is not None and not sender.is_alive() and len(arrivals) > warm_tokens + 20:
            break
    running.close()
    if sender is not None:
        sender.join()
    if long_window.get("status") != 200:
        sys.exit(f"the long request failed: {long_window}")
    gaps = [(b - a, b) for a, b in zip(arrivals, arrivals[1:])]
    normal = [g for g, at in gaps[5:warm_tokens - 1]]
    during = [g for g, at in gaps if long_window["sent"] < at <= long_window["done"] + 1e-3]
    # The gap that spans the long request's prefill ends after "done" only if no token came in
    # between; include the first gap that ends after it.
    after = [g for g, at in gaps if at > long_window["done"]]
    if after:
        during.append(after[0])
    return {"normal": normal, "during": during,
            "long_request_s": long_window["done"] - long_window["sent"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--server-bin", type=Path,
                    default=REPO_ROOT / "target" / "release" / "gpt2-server")
    ap.add_argument("--chunks", default="256,8192",
                    help="--prefill-chunk-tokens values to compare (8192: the whole prompt at once)")
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--kv-dtype", default="f32", help="the server's --kv-dtype (f32 or f16)")
    ap.add_argument("--stall-percent", type=int, default=50,
                    help="--max-prefill-stall-percent of the server (how much a chunk may add to a step)")
    args = ap.parse_args()

    # About 10 tokens per repetition with GPT-2's vocabulary.
    long_prompt = " ".join(["The quick brown fox jumps over the lazy dog."] *
                           max(1, args.prompt_tokens // 10))
    print(f"CPU: {cpu_model()}; {args.threads} threads; dtype {args.dtype}; "
          f"kv-dtype {args.kv_dtype}; "
          f"long prompt ~{args.prompt_tokens} tokens; "
          f"--max-prefill-stall-percent {args.stall_percent}", flush=True)
    rows = []
    for chunk in [int(c) for c in args.chunks.split(",")]:
        proc, port = start_server(args, chunk)
        try:
            normal, during, longs = [], [], []
            for _ in range(args.runs):
                result = one_run(port, long_prompt, warm_tokens=40)
                normal += result["normal"]
                during += result["during"]
                longs.append(result["long_request_s"])
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        n50, n99 = percentile(normal, 50), percentile(normal, 99)
        d99, dmax = percentile(during, 99), max(during)
        rows.append((chunk, n50, n99, d99, dmax, statistics.median(longs)))
        print(json.dumps({"prefill_chunk_tokens": chunk, "normal_p50_ms": round(n50 * 1e3, 1),
                          "normal_p99_ms": round(n99 * 1e3, 1),
                          "during_prefill_p99_ms": round(d99 * 1e3, 1),
                          "during_prefill_max_ms": round(dmax * 1e3, 1),
                          "p99_ratio": round(d99 / n99, 2), "max_ratio": round(dmax / n99, 2),
                          "long_request_s": round(statistics.median(longs), 3)}), flush=True)
    print()
    print("| --prefill-chunk-tokens | normal gap p50 | normal p99 | during prefill p99 | "
          "longest | p99 / normal p99 | long request |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for chunk, n50, n99, d99, dmax, longest in rows:
        print(f"| {chunk} | {n50 * 1e3:.1f} ms | {n99 * 1e3:.1f} ms | {d99 * 1e3:.1f} ms | "
              f"{dmax * 1e3:.1f} ms | {d99 / n99:.2f}× | {longest:.2f} s |")


if __name__ == "__main__":
    main()
