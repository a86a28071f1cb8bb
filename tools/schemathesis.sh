#!/usr/bin/env bash
# Runs schemathesis against a live gpt2-server from docs/openapi.yaml, bounded in examples and time.
#
#   tools/schemathesis.sh [BASE_URL] [EXTRA SCHEMATHESIS ARGS...]
#
# BASE_URL defaults to http://127.0.0.1:8080. The server must already be running. Start it with a
# short deadline, for example `gpt2-server --deadline-secs 2`: every generation then answers
# within about 2 s, with 504 `deadline_exceeded` (a described answer) when it would take longer,
# so no generated request (max_length up to 1024, 16 beams) makes the run slow.
#
# It fails (exit 1) on any 5xx other than 504 and on any answer that breaks the description:
# an undocumented status or content type, a missing or malformed documented header, a body (JSON,
# or each server-sent event of a stream) that does not match its schema, a request the
# description rules out (a wrong type, a bound crossed) that is not refused with a 4xx, and a
# method the description does not list that gets anything but 405 with an `Allow` header.
# (positive_data_acceptance is not run: a request the schema admits can still be refused by the
# rules JSON Schema cannot express, such as max_length against the prompt's tokens, or get 504.)
#
# Against a server started with --api-key, pass the key as an extra argument, for example
# `tools/schemathesis.sh http://127.0.0.1:8080 -H 'Authorization: Bearer KEY'`; without it every
# route but /ping answers the described 401.
#
# The response-stream route is run too; its AWS event-stream body is binary, so only its status,
# content type and headers are checked, not its frames (bins/gpt2-server/tests/streaming.rs and
# the boto3 client test check those).
#
# Environment:
#   GPT2_TEST_PYTHON               python with schemathesis installed (default: python3)
#   SCHEMATHESIS_MAX_EXAMPLES      test cases per operation in the examples and fuzzing phases
#                                  (default: 12); the coverage phase runs every case it derives
#                                  from the description (each bound, type and method)
#   SCHEMATHESIS_MAX_TIME          time budget, in seconds: the phases share it, and fuzzing repeats
#                                  until it is spent (default: none, the run ends when the examples
#                                  are done)
#   SCHEMATHESIS_TIME_LIMIT        hard bound on the whole run, in seconds; past it the run is
#                                  killed and fails (default: 600)
#   SCHEMATHESIS_REQUEST_TIMEOUT   per-request timeout, in seconds; keep it above the server's
#                                  --deadline-secs (default: 70, above the 60 s default deadline)
#   SCHEMATHESIS_SEED              seed, for a reproducible run (default: random; printed at the end)
#   SCHEMATHESIS_WORKERS           concurrent workers (default: 1)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
base_url="${1:-http://127.0.0.1:8080}"
shift || true
python="${GPT2_TEST_PYTHON:-python3}"
max_examples="${SCHEMATHESIS_MAX_EXAMPLES:-12}"
time_limit="${SCHEMATHESIS_TIME_LIMIT:-600}"
request_timeout="${SCHEMATHESIS_REQUEST_TIMEOUT:-70}"
workers="${SCHEMATHESIS_WORKERS:-1}"

if ! "$python" -c 'import schemathesis' >/dev/null 2>&1; then
    echo "schemathesis.sh: $python cannot import schemathesis (pip install schemathesis)" >&2
    exit 2
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# 504 is the described answer to a request that outlives --deadline-secs; every other 5xx fails.
cat >"$work/schemathesis.toml" <<'EOF'
[checks.not_a_server_error]
expected-statuses = ["2xx", "3xx", "4xx", "504"]
EOF

optional=()
if [ -n "${SCHEMATHESIS_SEED:-}" ]; then
    optional+=(--seed "$SCHEMATHESIS_SEED")
fi
if [ -n "${SCHEMATHESIS_MAX_TIME:-}" ]; then
    optional+=(--max-time "$SCHEMATHESIS_MAX_TIME")
fi

checks=(
    not_a_server_error
    status_code_conformance
    content_type_conformance
    response_headers_conformance
    response_schema_conformance
    negative_data_rejection
    unsupported_method
    allow_header_conformance
)

echo "schemathesis.sh: $base_url, $max_examples fuzzed examples per operation, ${time_limit}s at most" >&2
cd "$work"
status=0
timeout --signal=TERM --kill-after=10 "$time_limit" \
    "$python" -c 'import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())' \
    --config-file "$work/schemathesis.toml" \
    run "$root/docs/openapi.yaml" \
    --url "$base_url" \
    --phases examples,coverage,fuzzing \
    --checks "$(IFS=,; echo "${checks[*]}")" \
    --max-examples "$max_examples" \
    --workers "$workers" \
    --request-timeout "$request_timeout" \
    --generation-database none \
    --output-sanitize false \
    --no-color \
    ${optional[@]+"${optional[@]}"} \
    "$@" || status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "schemathesis.sh: the run did not finish within ${time_limit}s" >&2
fi
exit "$status"
