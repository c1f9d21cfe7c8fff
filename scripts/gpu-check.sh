#!/usr/bin/env bash
# GPU check: run on a machine with an NVIDIA GPU from a bundle made by `cargo xtask gpu-bundle`
# (the release binary with cuda + wgpu compiled in, this script and the tiny fixture).
# No Rust toolchain is needed there. Writes JSON results to $RESULTS (default ./gpu-results).
#
#   ./gpu-check.sh            # parity on CUDA (f32), then a 7B-shaped random-weight benchmark
#
# Steps (each one's output is kept even when a later one fails):
#   1. hici devices            - what the binary sees
#   2. hici parity --device cuda  - the fixture's reference logits, merged + unmerged LoRA,
#                                   modes I / F / T, greedy decode (tolerance 1e-3)
#   3. hici bench --synthetic 7b  - 4K and 16K prompts, modes full and hici: prefill and
#                                   decode tok/s, time to first token, peak GPU memory
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
BIN=${HICI_BIN:-$here/hici}
[ -x "$BIN" ] || BIN=$here/../target/release/hici
FIXTURE=${HICI_FIXTURE:-$here/tiny-hici-a}
[ -d "$FIXTURE" ] || FIXTURE=$here/../tests/fixtures/tiny-hici-a
RESULTS=${RESULTS:-./gpu-results}
LENS=${HICI_BENCH_LENS:-4096,16384}
mkdir -p "$RESULTS"
rc=0
run() { # name, command...
  local name=$1; shift
  echo "== $name: $*" >&2
  local t0=$SECONDS
  if "$@" > "$RESULTS/$name.json" 2> "$RESULTS/$name.log"; then
    echo "   ok ($((SECONDS - t0)) s)" >&2
  else
    echo "   FAILED ($((SECONDS - t0)) s), see $RESULTS/$name.log" >&2; tail -5 "$RESULTS/$name.log" >&2; rc=1
  fi
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$RESULTS/nvidia-smi.csv" 2>&1 || true
run devices "$BIN" devices --json
run parity_cuda_f32 "$BIN" parity --fixture "$FIXTURE" --device cuda --json
run bench_7b_cuda "$BIN" bench --synthetic 7b --device cuda --prompt-len "$LENS" --gen-len 32 \
  --modes full,hici --warmup 1 --iters 2 --json
echo "results in $RESULTS" >&2
exit $rc
