"""Our C kernels (colm_runtime/model/cpu_kernels.py) against the torch path each replaces, interleaved
round by round in one process, at SmolLM2's shapes (2 threads by default):

- decode attention of 32 sequences (9 query heads over 3 KV heads of 64, blocks of 16, contexts of
  half to all of L tokens, blocks scattered over the cache): gather + SDPA against paged_decode;
- bf16 products of 1-64 rows over all 30 layers' weights and the LM head (270 MB, read cold as a decode
  step reads them): ATen (`mv` at one row, oneDNN's GEMM above) against gemv_bf16 (1-8 rows) and
  gemm_amx_bf16 (4-64 rows) where the CPU has them.

  python benchmarks/cpu_kernels_ab.py [--threads 2] [--rounds 20]
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from colm_runtime.model import cpu_kernels

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--rounds", type=int, default=20)
a = ap.parse_args()
torch.set_num_threads(a.threads)
assert cpu_kernels.library() is not None, "the kernels did not build here (see the log)"


def ab(name: str, sides: dict, rounds: int) -> None:
    t = {k: [] for k in sides}
    for f in sides.values():
        f()
    for _ in range(rounds):
        for k, f in sides.items():
            s = time.perf_counter()
            f()
            t[k].append(time.perf_counter() - s)
    (ka, ma), *rest = ((k, statistics.median(v)) for k, v in t.items())
    print(f"{name}: {ka} {ma * 1e3:.2f} ms" + "".join(f", {k} {m * 1e3:.2f} ms, {ka}/{k} {ma / m:.2f}" for k, m in rest),
          flush=True)


B, Hq, Hk, hd, bs = 32, 9, 3, 64, 16
for dt in (torch.bfloat16, torch.float32):
    for L in (129, 256):
        nb, blocks = -(-L // bs), 4096
        kc, vc = torch.randn(blocks, bs, Hk, hd).to(dt), torch.randn(blocks, bs, Hk, hd).to(dt)
        idx = torch.randperm(blocks)[: B * nb].view(B, nb)
        q = torch.randn(B, Hq, hd).to(dt)
        lens = torch.randint(L // 2, L + 1, (B,))
        mask = (torch.arange(L)[None, :] < lens[:, None])[:, None, None, :]

        def gather_sdpa():
            K, V = (c.index_select(0, idx.flatten()).view(B, -1, Hk, hd)[:, :L] for c in (kc, vc))
            return F.scaled_dot_product_attention(q.unsqueeze(2), K.transpose(1, 2), V.transpose(1, 2),
                                                  attn_mask=mask, enable_gqa=True)

        ab(f"decode attention {str(dt)[6:]}, batch {B}, context {L}",
           {"gather+sdpa": gather_sdpa, "paged_decode": lambda: cpu_kernels.paged_decode(q, kc, vc, idx, lens, L)},
           a.rounds)

lib = cpu_kernels.library()
if lib.has_gemv or lib.has_amx:
    shapes = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # qkv, o, gate_up, down
    Ws = [[torch.randn(o, i).to(torch.bfloat16) for i, o in shapes] for _ in range(30)]
    Ws.append([torch.randn(49152, 576).to(torch.bfloat16)])  # the LM head
    for M in (1, 2, 4, 8, 16, 32, 64):
        xs = {i: torch.randn(M, i).to(torch.bfloat16) for i in (576, 1536)}

        def run(product):
            def all_weights():
                for ws in Ws:
                    for w in ws:
                        product(xs[w.shape[1]], w)
            return all_weights

        sides = {"aten": run(lambda x, w: torch.mv(w, x[0]) if M == 1 else F.linear(x, w))}
        if lib.has_gemv and M <= 8:
            sides["gemv_bf16"] = run(cpu_kernels.gemv_bf16)
        if lib.has_amx and M >= 4:
            sides["gemm_amx_bf16"] = run(cpu_kernels.gemm_amx_bf16)
        if len(sides) > 1:
            ab(f"bf16 products of {M} rows, every SmolLM2 weight", sides, max(5, a.rounds // 3))
else:
    print("bf16 products: this CPU has neither AVX-512 BF16 nor AMX")
