"""One bf16 / fp32 product at SmolLM2's layer and LM-head shapes, torch.mm vs F.linear vs oneDNN's prepacked linear,
interleaved. T=threads (default 1).

  T=1 python benchmarks/bf16_matmul.py
"""
import time, torch, statistics, os
import torch.nn.functional as F
torch.set_num_threads(int(os.environ.get("T", "1")))
shapes = [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152)]
for B in (1, 32):
    for dt in (torch.float32, torch.bfloat16):
        for i, o in shapes:
            x = torch.randn(B, i).to(dt); w = torch.randn(o, i).to(dt)
            wt = w.t()
            fns = {"mm(x,w.t())": lambda: torch.mm(x, wt), "F.linear": lambda: F.linear(x, w)}
            if dt == torch.bfloat16:
                packed = torch.ops.mkldnn._reorder_linear_weight(w, B) if hasattr(torch.ops.mkldnn, "_reorder_linear_weight") else None
                if packed is not None:
                    fns["mkldnn packed"] = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
                wc = wt.contiguous()
                fns["mm(x, w^T contiguous)"] = lambda: torch.mm(x, wc)
            t = {k: [] for k in fns}
            for k, f in fns.items(): f(); f()
            for _ in range(20):
                for k, f in fns.items():
                    s = time.perf_counter(); f(); t[k].append(time.perf_counter() - s)
            print(B, str(dt)[6:], (i, o), {k: round(statistics.median(v) * 1e6) for k, v in t.items()}, flush=True)
