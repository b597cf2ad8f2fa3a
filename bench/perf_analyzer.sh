#!/usr/bin/env bash
# Triton's perf_analyzer against a running cnnserve, over the Open Inference Protocol (gRPC).
#
#   bench/perf_analyzer.sh [MODEL] [TARGET]        defaults: fashion 127.0.0.1:50051
#   bench/perf_analyzer.sh --setup                 set up only; prints "bin PATH" and "lib PATH"
#
#   BATCH_SIZES="1 32"        batch sizes to measure, one perf_analyzer run each
#   CONCURRENCY="1:4:1"       perf_analyzer --concurrency-range (start:end:step)
#   STREAMING=1               ModelStreamInfer instead of ModelInfer (--streaming): see below
#   REQUESTS=200              requests per measurement window (count_windows mode)
#   STABILITY=25              --stability-percentage (raise it on a busy machine)
#   PA_ARGS="..."             more perf_analyzer flags, e.g. "-f results.csv"
#
# Sets itself up once, idempotently, under ~/.cache/cnnserve/perf_analyzer (CNNSERVE_CACHE):
# - perf_analyzer from the tritonclient wheel pinned in requirements/constraints.txt (2.41.0:
#   the last wheel that carries the binary and runs on Debian 12's glibc 2.36; the newer PyPI
#   `perf-analyzer` builds need glibc 2.38);
# - libcudart.so.12, which the binary links even without a GPU, from the nvidia-cuda-runtime-cu12
#   wheel (only the one library is kept);
# - libb64.so.0d from Debian's libb64-0d when the system lacks it (apt-get download + dpkg -x,
#   no root needed).
# Inputs are zeros: perf_analyzer's random FP32 bytes include NaN and infinities, which the server
# refuses (INVALID_ARGUMENT), and the CNN's cost does not depend on pixel values.
#
# Streams: with --streaming perf_analyzer runs asynchronously, and each of its worker threads
# opens one stream (one client context per thread for a model without sequences) and keeps its
# share of the concurrency in flight on it; it starts min(concurrency, --max-threads) threads,
# and --max-threads defaults to 16. So concurrency 64 alone is 16 streams with 4 messages in
# flight on each (measured with the server's cnnserve_inflight_streams gauge). STREAMING=1 sets
# --max-threads to the top of CONCURRENCY, so that concurrency N is N streams with one message
# in flight on each. Without --streaming (synchronous calls), concurrency N is N threads with one
# call in flight each; the gRPC client shares one connection between up to 6 of them.
set -euo pipefail

SETUP_ONLY=0
if [[ ${1:-} == --setup ]]; then
  SETUP_ONLY=1
  shift
fi
MODEL=${1:-fashion}
TARGET=${2:-127.0.0.1:50051}
BATCH_SIZES=${BATCH_SIZES:-1 32}
CONCURRENCY=${CONCURRENCY:-1:4:1}
REQUESTS=${REQUESTS:-200}
STABILITY=${STABILITY:-25}
PA_ARGS=${PA_ARGS:-}
CUDART_VERSION=12.9.79

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
CACHE=${CNNSERVE_CACHE:-$HOME/.cache/cnnserve}/perf_analyzer
BIN=$CACHE/bin/perf_analyzer
LIB=$CACHE/lib

TRITONCLIENT_VERSION=$(sed -n 's/^tritonclient==//p' "$ROOT/requirements/constraints.txt")
if [[ -z $TRITONCLIENT_VERSION ]]; then
  echo "no tritonclient pin in requirements/constraints.txt" >&2
  exit 1
fi

# Extract the members of a wheel whose path matches a regular expression into a folder (flat).
extract() {
  "$PY" - "$@" <<'EOF'
import re, shutil, sys, zipfile
from pathlib import Path

wheel, pattern, dest = sys.argv[1], re.compile(sys.argv[2]), Path(sys.argv[3])
dest.mkdir(parents=True, exist_ok=True)
with zipfile.ZipFile(wheel) as zf:
    names = [n for n in zf.namelist() if pattern.search(n)]
    if not names:
        sys.exit(f"{wheel}: nothing matches {pattern.pattern}")
    for name in names:
        target = dest / Path(name).name
        with zf.open(name) as src, open(f"{target}.part", "wb") as out:
            shutil.copyfileobj(src, out)
        Path(f"{target}.part").chmod(0o755)
        Path(f"{target}.part").replace(target)
EOF
}

setup() {
  local tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  if [[ ! -x $BIN || $(cat "$CACHE/version" 2>/dev/null) != "$TRITONCLIENT_VERSION" ]]; then
    echo "perf_analyzer: from the tritonclient==$TRITONCLIENT_VERSION wheel" >&2
    "$PY" -m pip download --quiet --no-deps "tritonclient==$TRITONCLIENT_VERSION" -d "$tmp/tc"
    extract "$tmp"/tc/tritonclient-*.whl '\.data/data/bin/perf_analyzer$' "$CACHE/bin"
    echo "$TRITONCLIENT_VERSION" >"$CACHE/version"
  fi
  if [[ ! -e $LIB/libcudart.so.12 ]]; then
    echo "libcudart.so.12: from the nvidia-cuda-runtime-cu12==$CUDART_VERSION wheel" >&2
    "$PY" -m pip download --quiet --no-deps "nvidia-cuda-runtime-cu12==$CUDART_VERSION" -d "$tmp/cuda"
    extract "$tmp"/cuda/nvidia_cuda_runtime_cu12-*.whl '/lib/libcudart\.so\.12$' "$LIB"
  fi
  if ! ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d' && [[ ! -e $LIB/libb64.so.0d ]]; then
    echo "libb64.so.0d: from Debian's libb64-0d" >&2
    (cd "$tmp" && apt-get download libb64-0d >/dev/null)
    dpkg -x "$tmp"/libb64-0d_*.deb "$tmp/b64"
    cp -L "$tmp"/b64/usr/lib/*/libb64.so.0d "$LIB/"
  fi
}

setup
export LD_LIBRARY_PATH=$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
if missing=$(ldd "$BIN" | grep 'not found'); then
  echo "perf_analyzer still misses libraries:" >&2
  echo "$missing" >&2
  exit 1
fi
if ((SETUP_ONLY)); then
  echo "bin $BIN"
  echo "lib $LIB"
  exit 0
fi
"$BIN" --version

STREAM_ARGS=()
if [[ ${STREAMING:-0} == 1 ]]; then
  IFS=: read -r _ top _ <<<"$CONCURRENCY:"
  top=${top:-${CONCURRENCY%%:*}}
  STREAM_ARGS=(--streaming)
  if ((top > 0)); then  # 0: open-ended search; perf_analyzer's thread default then applies
    STREAM_ARGS+=(--max-threads "$top")
  fi
fi

for batch in $BATCH_SIZES; do
  echo
  echo "=== model $MODEL at $TARGET: batch $batch, concurrency $CONCURRENCY ${STREAM_ARGS[*]} ==="
  # shellcheck disable=SC2086  # PA_ARGS is a list of flags
  "$BIN" -m "$MODEL" -u "$TARGET" -i grpc -b "$batch" \
    --concurrency-range "$CONCURRENCY" --input-data zero \
    --measurement-mode count_windows --measurement-request-count "$REQUESTS" \
    --stability-percentage "$STABILITY" --max-trials 10 "${STREAM_ARGS[@]}" $PA_ARGS
done
