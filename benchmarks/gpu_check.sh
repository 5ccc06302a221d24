#!/usr/bin/env bash
# Every GPU figure of the pack in one run (about 7 minutes on one H100-class GPU): VideoCrafter2
# 320x512x16 end to end in fp16/bf16/fp8, VideoCrafter1 576x1024x16, a partial load with a 4 GiB
# budget, a 64-frame FreeNoise video, 4-step T2V-Turbo, attention over more than 2**15 batch rows.
# Writes one JSON (--out, default gpu_check.json in the current directory) plus a .txt table;
# details in benchmarks/gpu_check.py.
#
#   COMFYUI_PATH=/path/to/ComfyUI [COMFYUI_PYTHON=/path/to/python] benchmarks/gpu_check.sh [--dry-run] [--out FILE]
#
# --dry-run runs the same code on the CPU with tiny random models in about a minute.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
: "${COMFYUI_PATH:?set COMFYUI_PATH to a ComfyUI checkout (v0.8.0)}"
python="${COMFYUI_PYTHON:-python3}"
args=()
for arg in "$@"; do  # --out relative to where the script was called from
  if [[ "${prev:-}" == "--out" && "$arg" != /* ]]; then arg="$PWD/$arg"; fi
  args+=("$arg"); prev="$arg"
done
if [[ " ${args[*]:-} " != *" --out "* ]]; then args+=(--out "$PWD/gpu_check.json"); fi
cd "$COMFYUI_PATH"
PYTHONPATH="$COMFYUI_PATH:$repo/tests:$repo${PYTHONPATH:+:$PYTHONPATH}" exec "$python" "$here/gpu_check.py" "${args[@]}"
