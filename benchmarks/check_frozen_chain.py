"""Check that the first chains of a grown model are bit-identical to the model it was grown from.

python benchmarks/check_frozen_chain.py OLD_DIR NEW_DIR

OLD_DIR has n chains, NEW_DIR n + m (made by `colm expand` and trained with `--freeze-chains n`):
every Chain-of-Linear block of the old chains must be equal, the shared tensors (embedding, LM head,
norms) must hold the old ones as their leading columns, and the logits at n chains must be equal.
"""

from __future__ import annotations

import sys

import torch
from safetensors.torch import load_file

from colm_runtime.checkpoint import WEIGHTS, load_model


def main(old_dir: str, new_dir: str) -> int:
    old, new = load_file(f"{old_dir}/{WEIGHTS}"), load_file(f"{new_dir}/{WEIGHTS}")
    old.setdefault("lm_head.weight", old["embed.weight"])  # a tied head became an untied one
    width = old["embed.weight"].shape[1]
    for name, t in old.items():
        got = new[name] if ".chains." in name else new[name][..., :width]
        if not torch.equal(t, got):
            print(f"{name}: differs")
            return 1
    a, b = load_model(old_dir), load_model(new_dir)
    ids = torch.randint(0, a.cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    n = a.cfg.n_chains
    with torch.no_grad():
        diff = (a.logits(a(ids), n) - b.logits(b(ids), n)).abs().max().item()
    print(f"{len(old)} tensors of chains 1..{n} bit-identical; max |logit difference| at {n} chain(s): {diff}")
    return 0 if diff == 0 else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
