#!/usr/bin/env bash
# Issue 24: idem's DynamoDB store side by side with AWS Powertools' idempotency utility, in
# one run, against the same local DynamoDB server (moto) behind the same counting proxy.
#
#   benches/powertools_dynamodb/run.sh [N]            # N misses and N hits per side (200)
#   IDEM_SIDE=0 benches/powertools_dynamodb/run.sh    # the Powertools side only
#
# Round trips are counted at the server side: count_proxy.py (loopback, in front of moto)
# counts each request by its X-Amz-Target. Times are ns per call, and a ratio to each side's
# own baseline measured in the same run (a raw GetItem from the same client, through the same
# proxy): context only, moto is not DynamoDB.
#
# Uses moto at 127.0.0.1:${MOTO_PORT:-8000} if one answers there, else starts one (and stops
# it at the end). The Python side runs in a virtualenv at ${PT_VENV:-target/powertools-venv},
# made from requirements.txt on first use. Every step is bounded in time; everything is on
# 127.0.0.1; the script stops the processes it started.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
n="${1:-200}"
moto_port="${MOTO_PORT:-8000}"
proxy_port="${PROXY_PORT:-8024}"
venv="${PT_VENV:-$root/target/powertools-venv}"
out="$(mktemp -d)"
pids=()

cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    rm -rf "$out"
}
trap cleanup EXIT

answers() { curl -s -m 2 -o /dev/null "http://127.0.0.1:$1/"; }

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    timeout 600 "$venv/bin/pip" install -q -r "$here/requirements.txt"
fi
py="$venv/bin/python"

if ! answers "$moto_port"; then
    echo "starting moto_server on 127.0.0.1:$moto_port" >&2
    "$venv/bin/moto_server" -H 127.0.0.1 -p "$moto_port" >"$out/moto.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 50); do answers "$moto_port" && break; sleep 0.2; done
    answers "$moto_port" || { echo "moto did not start" >&2; cat "$out/moto.log" >&2; exit 1; }
fi

# The proxy exits by itself after 15 minutes whatever happens to this script.
"$py" "$here/count_proxy.py" "$proxy_port" "$moto_port" 900 >"$out/proxy.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do curl -s -m 1 -o /dev/null "http://127.0.0.1:$proxy_port/__counts" && break; sleep 0.1; done
endpoint="http://127.0.0.1:$proxy_port"

run_id="$(date +%s)"
echo "Powertools side: $n misses, $n hits" >&2
timeout 300 "$py" "$here/powertools.py" --endpoint "$endpoint" \
    --table "powertools_issue24_$run_id" --n "$n" >"$out/powertools.json"

sides=("$out/powertools.json")
if [ "${IDEM_SIDE:-1}" != 0 ]; then
    echo "idem side: $n misses, $n hits" >&2
    (cd "$root" && timeout 1800 cargo build -q --release --example dynamodb_vs_powertools --features dynamodb)
    timeout 300 "$root/target/release/examples/dynamodb_vs_powertools" --endpoint "$endpoint" \
        --table "idem_issue24_$run_id" --n "$n" >"$out/idem.json"
    sides+=("$out/idem.json")
fi

curl -s -m 2 -o /dev/null "$endpoint/__quit" || true
"$py" "$here/table.py" "${sides[@]}"
if [ "${IDEM_SIDE:-1}" != 0 ]; then
    echo "idem: aws-sdk-dynamodb $(awk '/^name = "aws-sdk-dynamodb"$/ { getline; gsub(/[^0-9.]/, ""); print }' "$root/Cargo.lock") (Cargo.lock), release build"
fi
echo "server: the one on 127.0.0.1:$moto_port (requirements.txt pins moto[server] 5.2.5), through count_proxy.py on :$proxy_port"
