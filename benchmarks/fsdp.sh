#!/usr/bin/env bash
# `colm train --parallel fsdp` on CUDA (nccl, bf16 compute / fp32 reduce): the path CI cannot run.
# Trains a small CoLM on every visible GPU (torchrun), stops half-way, resumes, exports with
# `colm export checkpoint`, and compares its loss curve with one GPU's run of the same global batch
# (bf16: close, not equal) and the exported weights with the run's model directory (equal).
#
#   benchmarks/fsdp.sh                    # CUDA, all GPUs (at least 1)
#   benchmarks/fsdp.sh --device cpu       # dry run: 2 CPU processes (gloo), tiny model, ~1 minute
#
# Writes runs and logs under $OUT (default: bench-out/fsdp/) and prints a JSON summary.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
OUT=${OUT:-bench-out/fsdp}
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "usage: $0 [--device cuda|cpu] [--out DIR]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1
rm -rf "$OUT" && mkdir -p "$OUT/corpus"
"$PY" -c "
from pathlib import Path
from colm_runtime.testing import sample_text
for i, t in enumerate(sample_text()): Path('$OUT/corpus/doc%04d.txt' % i).write_text(t)"

if [ "$DEVICE" = cpu ]; then
  NPROC=2
  MODEL=(--vocab-size 320 --chains 2,2 --layers 2 --head-dim 8 --seq-len 32 --threads 1)
  PER_RANK=2
else
  NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  [ "$NPROC" -ge 1 ] || { echo "no CUDA device: run with --device cpu for a dry run" >&2; exit 1; }
  MODEL=(--vocab-size 4096 --chains 8,8 --layers 8 --head-dim 64 --seq-len 512)
  PER_RANK=8
fi
COMMON=(--data "$OUT/corpus" "${MODEL[@]}" --device "$DEVICE" --steps 40 --eval-every 5 --eval-tokens 16384
        --save-every 10 --warmup-steps 5 --lr 1e-3 --no-progress)
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC")

t0=$SECONDS
"${TORCHRUN[@]}" -m colm_runtime.cli train "${COMMON[@]}" --out "$OUT/fsdp" --parallel fsdp \
  --batch-size "$PER_RANK" --stop-at 20 >"$OUT/fsdp.log" 2>&1
"${TORCHRUN[@]}" -m colm_runtime.cli train --out "$OUT/fsdp" --resume --no-progress >>"$OUT/fsdp.log" 2>&1
FSDP_S=$((SECONDS - t0))
"$PY" -m colm_runtime.cli export checkpoint "$OUT/fsdp" "$OUT/exported" >>"$OUT/fsdp.log" 2>&1
t0=$SECONDS
"$PY" -m colm_runtime.cli train "${COMMON[@]}" --out "$OUT/one" --batch-size $((PER_RANK * NPROC)) \
  >"$OUT/one.log" 2>&1
ONE_S=$((SECONDS - t0))

"$PY" - "$OUT" "$NPROC" "$DEVICE" "$FSDP_S" "$ONE_S" <<'PYEOF'
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
out, nproc, device, fsdp_s, one_s = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
def losses(run):
    return torch.tensor([json.loads(l)["train_loss"] for l in (out / run / "train_log.jsonl").read_text().splitlines()])
a, b = losses("fsdp"), losses("one")
x, y = load_file(out / "fsdp" / "model.safetensors"), load_file(out / "exported" / "model.safetensors")
summary = {"device": device, "processes": nproc, "logged_steps": len(a),
           "max_abs_loss_diff_vs_one_process": float((a - b).abs().max()),
           "final_loss_fsdp": a[-1].tolist(), "final_loss_one_process": b[-1].tolist(),
           "export_equals_model_dir": x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x),
           "wall_s_fsdp_with_resume": fsdp_s, "wall_s_one_process": one_s}
print(json.dumps(summary, indent=2))
tol = 1e-5 if device == "cpu" else 5e-2  # fp32 on CPU; bf16 compute on CUDA
sys.exit(0 if summary["export_equals_model_dir"] and summary["max_abs_loss_diff_vs_one_process"] <= tol else 1)
PYEOF
