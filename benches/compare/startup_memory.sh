#!/usr/bin/env bash
# Startup time to the first `GET /ping` 200, and peak resident memory of gpt2-server while 16
# clients each send the contract's default request at once.
#   benches/compare/startup_memory.sh [MODEL_DIR] [f32|q8_0] [f32|f16 (KV cache)]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
model="${1:-$root/target/bench/gpt2-124m}"
dtype="${2:-f32}"
kv_dtype="${3:-f32}"
port="${PORT:-18555}"
server="$root/target/release/gpt2-server"
cat "$model"/*.safetensors > /dev/null   # warm page cache
start=$(date +%s.%N)
"$server" --model "$model" --port "$port" --host 127.0.0.1 --dtype "$dtype" --kv-dtype "$kv_dtype" 2>/dev/null &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true' EXIT
until [ "$(curl -s -o /dev/null -w '%{http_code}' "localhost:$port/ping" || true)" = 200 ]; do sleep 0.02; done
end=$(date +%s.%N)
echo "dtype=$dtype kv_dtype=$kv_dtype startup_to_ping_s=$(echo "$end - $start" | bc)"
echo "after start: $(grep VmRSS /proc/$pid/status)"
clients=()
for i in $(seq 1 16); do
    curl -s -X POST -H 'Content-Type: application/json' \
         --data "{\"input\": \"This is an input text\", \"seed\": $i}" \
         "localhost:$port/invocations" -o /dev/null &
    clients+=($!)
done
wait "${clients[@]}"
echo "after 16 concurrent default requests: $(grep VmHWM /proc/$pid/status)"
weights=$(du -cb "$model"/*.safetensors | tail -1 | cut -f1)
hwm_kb=$(grep VmHWM /proc/$pid/status | awk '{print $2}')
echo "peak RSS / weight bytes: $(echo "scale=2; $hwm_kb * 1024 / $weights" | bc)"
