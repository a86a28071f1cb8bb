#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for a bounded time: tools/fuzz.sh [SECONDS]
#
# SECONDS (default 60) is the total fuzzing time, split evenly between the targets. Each target
# starts from its committed seed corpus (fuzz/corpus/<target>, only read) plus the corpus earlier
# runs grew (fuzz/target/corpus-work/<target>, gitignored). Prints one summary line per target and
# exits non-zero when a target crashes (the reproducer is in fuzz/artifacts/<target>/).
#
# Works with the stable toolchain. By default the targets are built with libFuzzer's coverage
# instrumentation only (`--sanitizer none`: every flag it needs is stable), which runs about 7x
# more inputs per second than AddressSanitizer; GPT2_FUZZ_SANITIZER=address adds ASan, whose
# -Zsanitizer flag is nightly-only and is allowed on stable by RUSTC_BOOTSTRAP=1, set here for
# that case only. See docs/fuzzing.md.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

total="${1:-60}"
if ! [[ "$total" =~ ^[0-9]+$ ]] || [ "$total" -lt 1 ]; then
    echo "usage: tools/fuzz.sh [SECONDS]  (total fuzzing time, default 60)" >&2
    exit 2
fi
sanitizer="${GPT2_FUZZ_SANITIZER:-none}"
targets=(request tokenizer)
per_target=$((total / ${#targets[@]}))
[ "$per_target" -ge 1 ] || per_target=1

if [ "$sanitizer" != none ]; then
    export RUSTC_BOOTSTRAP=1
fi
export CARGO_TERM_COLOR=never
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    # About 1.5 minutes on 2 cores; the version these scripts were written against.
    cargo install --locked --version "${GPT2_CARGO_FUZZ_VERSION:-0.13.2}" cargo-fuzz
fi

# The committed fuzz/Cargo.lock is used as is (cargo fuzz has no --locked of its own): when the
# fuzzed crates gain a dependency, refresh it with `cargo fetch` in fuzz/ and commit it.
cargo fetch --locked --quiet
cargo fuzz build --sanitizer "$sanitizer"

status=0
summaries=()
for target in "${targets[@]}"; do
    work="target/corpus-work/$target"
    log="target/fuzz-$target.log"
    mkdir -p "$work" "artifacts/$target"
    echo "== fuzzing $target for ${per_target}s (sanitizer: $sanitizer)"
    started=$(date +%s)
    if cargo fuzz run --sanitizer "$sanitizer" "$target" "$work" "corpus/$target" -- \
        -max_total_time="$per_target" -timeout=30 -print_final_stats=1 >"$log" 2>&1; then
        outcome="no crash"
    else
        reproducer=$(ls -t "artifacts/$target" 2>/dev/null | head -n 1 || true)
        outcome="CRASH (log: fuzz/$log; reproducer: fuzz/artifacts/$target/$reproducer)"
        status=1
        tail -n 40 "$log" >&2
    fi
    elapsed=$(($(date +%s) - started))
    final_stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -n 1; }
    last_status=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
    field() { sed -nE "s/.* $1: ([^ ]+).*/\1/p" <<<"$last_status"; }
    summaries+=("fuzz $target: $(final_stat number_of_executed_units) executions in ${elapsed}s ($(final_stat average_exec_per_sec) exec/s), cov $(field cov), features $(field ft), corpus $(field corp), peak rss $(final_stat peak_rss_mb) MB: $outcome")
done

printf '%s\n' "${summaries[@]}"
exit "$status"
