#!/usr/bin/env bash
# A/B two server configurations in alternating h2load turns, so that a noisy machine's drift hits
# both alike (single `make bench` points move by up to ±30 % here; see bench/PROFILE.md).
#
#   bench/ab.sh BATCH "CONCURRENCIES" TURNS "FLAGS_A" "FLAGS_B"
#   bench/ab.sh 32 "1 4 16" 3 "" "--concurrent-runs 1"
#
# Prints calls/s and the server's CPU (cores busy) per turn for A and B. Needs the request
# payloads `make bench` writes (bench/results/payload-cnnserve-b{1,32}.bin; PAYLOADS=dir to use
# others) and MODELS (default /tmp/shared-models, else models/). TREE_A / TREE_B: run that side's
# server from another checkout of the code (e.g. `git worktree add /tmp/base HEAD~1`), with
# this tree's .venv, to A/B two versions of the code instead of two sets of flags.
set -euo pipefail
cd "$(dirname "$0")/.."
batch=$1 concs=$2 turns=$3 flags_a=$4 flags_b=$5
payload=${PAYLOADS:-bench/results}/payload-cnnserve-b$batch.bin
models=${MODELS:-$( [ -d /tmp/shared-models ] && echo /tmp/shared-models || echo models)}
[ -f "$payload" ] || { echo "no $payload: run make bench first" >&2; exit 2; }
port_a=$((50000 + RANDOM % 5000)) port_b=$((55000 + RANDOM % 5000))
here=$(pwd)
start() {  # port, flags, tree
  # shellcheck disable=SC2086  # the flags are meant to split
  (cd "$3" && exec "$here/.venv/bin/python" -m serving --model-repository "$models" \
    --host 127.0.0.1 --port "$1" --metrics-port 0 --http-port 0 --poll-seconds 0 $2 > "/tmp/ab-$1.log" 2>&1) &
  echo $!
}
pid_a=$(start "$port_a" "$flags_a" "${TREE_A:-.}")
pid_b=$(start "$port_b" "$flags_b" "${TREE_B:-.}")
trap 'kill $pid_a $pid_b 2>/dev/null' EXIT
for port in "$port_a" "$port_b"; do
  until .venv/bin/python -m serving.client --target "127.0.0.1:$port" health >/dev/null 2>&1; do sleep 0.2; done
done
ticks() {  # pid -> utime + stime in clock ticks, of it and its children (the run process)
  local p total=0
  for p in "$1" $(pgrep -P "$1"); do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  echo "$total"
}
load() {  # port, concurrency, seconds, pid -> "calls/s@cores"
  local before after rate
  before=$(ticks "$4")
  rate=$(h2load -D "$3" -c "$2" -m 1 -t 1 -d "$payload" -H "content-type: application/grpc" \
    -H "te: trailers" "http://127.0.0.1:$1/cnnserve.v1.CnnServe/Predict" |
    grep -o "[0-9.]* req/s" | head -1 | cut -d' ' -f1)
  after=$(ticks "$4")
  echo "$rate@$(awk -v t=$((after - before)) -v hz="$(getconf CLK_TCK)" -v s="$3" \
    'BEGIN {printf "%.2f", t / hz / s}')"
}
for c in $concs; do load "$port_a" "$c" 1 "$pid_a" >/dev/null; load "$port_b" "$c" 1 "$pid_b" >/dev/null; done
for c in $concs; do
  a="" b=""
  for _ in $(seq "$turns"); do
    a="$a $(load "$port_a" "$c" 3 "$pid_a")"
    b="$b $(load "$port_b" "$c" 3 "$pid_b")"
  done
  echo "batch $batch, concurrency $c, calls/s@server cores  A (${TREE_A:-.} $flags_a):$a  B (${TREE_B:-.} $flags_b):$b"
done
