#!/usr/bin/env bash
# GPU check: run on a machine with an NVIDIA GPU from a bundle made by `cargo xtask gpu-bundle`
# (the release binary with cuda + wgpu compiled in, this script and the tiny fixture).
# No Rust toolchain is needed there. Writes JSON results to $RESULTS (default ./gpu-results).
#
#   ./gpu-check.sh            # parity on CUDA (f32, flash, bf16, f16), then a 7B-shaped
#                             # random-weight benchmark in bf16 and f32
#
# Steps (each one's output is kept even when a later one fails):
#   1. hici devices            - what the binary sees
#   2. hici parity --device cuda  - the fixture's reference logits, merged + unmerged LoRA,
#                                   modes I / F / T, greedy decode. f32 with the exact
#                                   attention (max 1e-3) and with flash kernels (1e-2); bf16
#                                   (max 2.0, rms 0.15) and f16 (0.15, 0.02) on burn's fused
#                                   backend (--fusion auto = on; burn#5292 is fixed in
#                                   vendor/), and bf16 once more unfused (--fusion off) to
#                                   tell a fusion problem from a precision one. --attention
#                                   flash runs one square is_causal call per segment
#   3. hici bench --synthetic 7b  - 4K and 16K prompts, modes full and hici: prefill and
#                                   decode tok/s, time to first token, peak GPU memory; bf16
#                                   first (what a server runs), then f32
#   4. the same model with its linear weights quantized on the host (--quantize q8_0, q4_0)
#      and kept packed on the device: weight memory (device_bytes_after_load) and speed at a
#      4K prompt in mode hici
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
BIN=${HICI_BIN:-$here/hici}
[ -x "$BIN" ] || BIN=$here/../target/release/hici
FIXTURE=${HICI_FIXTURE:-$here/tiny-hici-a}
[ -d "$FIXTURE" ] || FIXTURE=$here/../tests/fixtures/tiny-hici-a
RESULTS=${RESULTS:-./gpu-results}
LENS=${HICI_BENCH_LENS:-4096,16384}
DEV=${HICI_DEVICE:-cuda}      # e.g. HICI_DEVICE=wgpu to try the script on another backend
SYNTH=${HICI_SYNTHETIC:-7b}   # e.g. HICI_SYNTHETIC=tiny HICI_BENCH_LENS=256 for a dry run
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
run parity_f32 "$BIN" parity --fixture "$FIXTURE" --device "$DEV" --json
run parity_f32_flash "$BIN" parity --fixture "$FIXTURE" --device "$DEV" --attention flash --json
run parity_bf16 "$BIN" parity --fixture "$FIXTURE" --device "$DEV" --dtype bf16 --json
run parity_f16 "$BIN" parity --fixture "$FIXTURE" --device "$DEV" --dtype f16 --json
run parity_bf16_unfused "$BIN" parity --fixture "$FIXTURE" --device "$DEV" --dtype bf16 --fusion off --json
run bench_bf16 "$BIN" bench --synthetic "$SYNTH" --device "$DEV" --dtype bf16 --prompt-len "$LENS" \
  --gen-len 32 --modes full,hici --warmup 1 --iters 2 --json
run bench_f32 "$BIN" bench --synthetic "$SYNTH" --device "$DEV" --prompt-len "$LENS" --gen-len 32 \
  --modes full,hici --warmup 1 --iters 2 --json
QLEN=${HICI_BENCH_QLEN:-4096}
for q in q8_0 q4_0; do
  run "bench_bf16_$q" "$BIN" bench --synthetic "$SYNTH" --device "$DEV" --dtype bf16 --quantize "$q" \
    --prompt-len "$QLEN" --gen-len 16 --modes hici --warmup 1 --iters 1 --json
done
echo "results in $RESULTS" >&2
exit $rc
