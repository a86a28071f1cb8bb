#!/usr/bin/env python3
"""Compare builds (or settings) of gpt2-rs on one request shape, alternating them round by round.

On a shared VM the same binary's time moves by up to 2× within minutes (a 2-core Xeon ran the
same beam request in 0.98 s five times, then in 1.58-1.98 s), so two separate runs say little
about a change of a few percent. Here every round runs each variant once (`gpt2 bench`, RUNS
timed runs after a warm-up), the order rotating from round to round, and each variant is
compared with the first *within* each round, when the machine was the same:

    python3 benches/compare/ab.py --model /tmp/gpt2-124m --shape beam --dtype q8_0 --rounds 8 \\
        base=/tmp/gpt2-base new=target/release/gpt2 avx2=target/release/gpt2,GPT2_ISA=avx2

Each variant is NAME=BINARY, optionally followed by ,VAR=VALUE environment settings. The first
variant is the baseline. The report gives each variant's min / p25 / median over all timed runs,
and its per-round ratio to the baseline (median of the rounds' ratios, their range, and in how
many rounds it was faster). Sampled shapes use a fixed seed, so every variant that computes the
same bits generates the same token count; a count that differs from the baseline's is reported
(the variant changed the arithmetic, or the sampled path).

Only the standard library is used; `--output FILE` also writes the raw figures as JSON.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import SHAPES, BenchError, exit_with, last_json_line, run_checked  # noqa: E402


def log(msg: str) -> None:
    print(f"[ab] {msg}", file=sys.stderr, flush=True)


def parse_variant(text: str) -> dict:
    """NAME=BINARY[,VAR=VALUE...] into {name, binary, env}."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise BenchError(f"variant {text!r}: expected NAME=BINARY[,VAR=VALUE...]")
    binary, *settings = rest.split(",")
    env = {}
    for setting in settings:
        var, sep, value = setting.partition("=")
        if not sep or not var:
            raise BenchError(f"variant {name}: setting {setting!r} is not VAR=VALUE")
        env[var] = value
    path = Path(binary).expanduser().resolve()
    if not path.is_file():
        raise BenchError(f"variant {name}: {path} does not exist")
    return {"name": name, "binary": path, "env": env}


def bench_once(args, variant: dict, request_file: Path) -> dict:
    """One `gpt2 bench` of a variant: its timed runs and generated token count."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), **variant["env"])
    cmd = [variant["binary"], "bench", "--model", args.model, "--request", request_file,
           "--runs", args.runs, "--warmup", "1", "--dtype", args.dtype,
           "--kv-dtype", args.kv_dtype]
    result = last_json_line(run_checked(cmd, env=env).stdout, f"{variant['name']}: gpt2 bench")
    return {"runs_s": [float(t) for t in result["runs"]],
            "generated_tokens": int(result["generated_tokens"])}


def rotated(items: list, by: int) -> list:
    by %= len(items)
    return items[by:] + items[:by]


def quantile(sorted_values: list, q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def report(variants: list, rounds: list) -> list:
    """One summary per variant, from every round's results (name → bench_once result)."""
    base = variants[0]["name"]
    summaries = []
    for variant in variants:
        name = variant["name"]
        runs = sorted(t for r in rounds for t in r[name]["runs_s"])
        ratios = sorted(statistics.median(r[name]["runs_s"]) / statistics.median(r[base]["runs_s"])
                        for r in rounds)
        tokens = sorted({r[name]["generated_tokens"] for r in rounds})
        summaries.append({
            "name": name, "binary": str(variant["binary"]), "env": variant["env"],
            "min_s": runs[0], "p25_s": quantile(runs, 0.25), "median_s": statistics.median(runs),
            "ratio_median": statistics.median(ratios), "ratio_min": ratios[0],
            "ratio_max": ratios[-1], "rounds_faster": sum(x < 1 for x in ratios),
            "generated_tokens": tokens,
        })
    return summaries


def print_report(args, summaries: list, rounds: int) -> None:
    base = summaries[0]
    sequences = f" × {args.sequences} sequences" if args.sequences else ""
    print(f"{args.shape}{sequences}, --dtype {args.dtype} --kv-dtype {args.kv_dtype}, {rounds} rounds of "
          f"{args.runs} runs, {args.threads} threads; ratios are per round, against {base['name']}")
    header = ["variant", "min s", "p25 s", "median s", "× base (median of rounds)",
              "range", "faster in", "tokens"]
    rows = [[s["name"], f"{s['min_s']:.3f}", f"{s['p25_s']:.3f}", f"{s['median_s']:.3f}",
             f"{s['ratio_median']:.3f}", f"{s['ratio_min']:.3f}–{s['ratio_max']:.3f}",
             f"{s['rounds_faster']} / {rounds}", ",".join(map(str, s["generated_tokens"]))]
            for s in summaries]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))
    for s in summaries[1:]:
        if s["generated_tokens"] != base["generated_tokens"]:
            print(f"note: {s['name']} generated {s['generated_tokens']} tokens, "
                  f"{base['name']} {base['generated_tokens']}: not the same bits")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="+", metavar="NAME=BINARY[,VAR=VALUE...]",
                    help="the builds to compare; the first is the baseline")
    ap.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    ap.add_argument("--shape", default="default", choices=list(SHAPES))
    ap.add_argument("--sequences", type=int,
                    help="num_return_sequences for the shape's request (the contract allows up to 16; "
                         "beam: at most its 5 beams): 16 makes a decode step of 16 rows")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "q8_0"])
    ap.add_argument("--kv-dtype", default="f32", choices=["f32", "f16"])
    ap.add_argument("--rounds", type=int, default=6, help="rounds, each running every variant")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per variant per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", type=Path, help="also write the raw figures here as JSON")
    args = ap.parse_args(argv)
    for name in ("rounds", "runs", "threads", "sequences"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if not (args.model / "config.json").is_file():
        ap.error(f"{args.model} has no config.json")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    variants = [parse_variant(v) for v in args.variants]
    names = [v["name"] for v in variants]
    if len(set(names)) != len(names):
        raise BenchError(f"variant names repeat: {names}")
    request = dict(SHAPES[args.shape])
    if args.sequences is not None:
        request["num_return_sequences"] = args.sequences
    rounds = []
    with tempfile.TemporaryDirectory(prefix="gpt2-ab-") as tmp:
        request_file = Path(tmp) / f"{args.shape}.json"
        request_file.write_text(json.dumps(request))
        for r in range(args.rounds):
            results = {}
            for variant in rotated(variants, r):
                results[variant["name"]] = bench_once(args, variant, request_file)
            log(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{name} {statistics.median(results[name]['runs_s']):.3f} s" for name in names))
            rounds.append(results)
    summaries = report(variants, rounds)
    print_report(args, summaries, len(rounds))
    if args.output:
        args.output.write_text(json.dumps(
            {"shape": args.shape, "request": request, "dtype": args.dtype,
             "kv_dtype": args.kv_dtype, "runs": args.runs, "threads": args.threads,
             "summaries": summaries, "rounds": rounds}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    exit_with(main)
