"""Every layer of a step in one C call (cpu_kernels.layers_step) is bit-identical to the Python loop of
forward_step, in fp32 and in bf16: same kernels, same order, same rows; and it follows the model's weights
when they change."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from colm_runtime.model import CoLMModel, cpu_kernels
from colm_runtime.testing import random_model, small_config
from tests.model._helpers import PagedRunner, rand_ids

pytestmark = pytest.mark.skipif(not (cpu_kernels.library() and cpu_kernels.library().has_f32),
                                reason="no AVX2 + FMA kernels on this CPU")


@pytest.fixture
def calls(monkeypatch):
    """Both paths on gemm_f32 (an AVX-512 CPU keeps fp32 products on MKL: the loop would then differ in
    rounding, not in kind), and a count of the fused calls."""
    monkeypatch.setattr(cpu_kernels, "has_f32_rows", lambda: True)
    n = [0]
    real = cpu_kernels.layers_step

    def counted(*args, **kwargs):
        n[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu_kernels, "layers_step", counted)
    return n


BF16 = pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(
    not cpu_kernels.has_bf16_widen(), reason="bf16 layers run in one call where gemm_bf16w runs (no bf16 dot product)"))
DTYPES = [pytest.param(torch.float32, id="fp32"), BF16]


def in_dtype(model: CoLMModel, dtype: torch.dtype) -> CoLMModel:
    return model if dtype == torch.float32 else model.to(dtype).column_major_head()


def run_both(model: CoLMModel, monkeypatch, script) -> tuple[list, list, PagedRunner, PagedRunner]:
    """Run script(runner) -> list of logits on two runners: the fused path, then the Python loop."""
    fused = PagedRunner(model, seed=5)
    got = script(fused)
    with monkeypatch.context() as m:
        m.setattr(CoLMModel, "_layers_in_c", lambda *a: False)
        loop = PagedRunner(model, seed=5)
        want = script(loop)
    return got, want, fused, loop


def assert_identical(got, want, fused: PagedRunner, loop: PagedRunner) -> None:
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=True):
            assert torch.equal(a, b)
    assert torch.equal(fused.cache.k_all, loop.cache.k_all) and torch.equal(fused.cache.v_all, loop.cache.v_all)


@pytest.mark.parametrize("setting", [dict(chains=(2, 2, 2)), dict(chains=(2, 2), kv_per_chain=2),
                                     dict(chains=(4, 4), head_dim=64), dict(chains=(4,), kv_per_chain=2)],
                         ids=["3x2", "2x2-kv2", "2x4-hd64", "dense"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_steps_equal_the_python_loop_bit_for_bit(setting, dtype, calls, monkeypatch):
    """Prefills (short enough to attend as pairs), decode steps at every chain pattern (all full, mixed
    with gaps, all at one chain, one row), and a prefill chunk joining decode rows."""
    cfg = small_config(**setting)
    model = in_dtype(random_model(cfg), dtype)
    n = cfg.n_chains
    chains = [n, 1, n, 1 + n // 2, 1, n]
    seqs = [(i, rand_ids(cfg, 9 + 4 * i, seed=30 + i), k) for i, k in enumerate(chains)]

    def script(run: PagedRunner) -> list:
        out = [run.step([(sid, ids[:-3], 0, k) for sid, ids, k in seqs])]
        for t in (3, 2, 1):
            items = [(sid, ids[-t : len(ids) - t + 1], len(ids) - t, k) for sid, ids, k in seqs]
            if t == 2:
                items.append((99, rand_ids(cfg, 6, seed=99), 0, n))  # a prefill among decodes
            out.append(run.step(items))
        out.append(run.step([(sid, ids[-1:], len(ids) - 1, n) for sid, ids, _ in seqs[:3]]))  # all full
        out.append(run.step([(sid, ids[-1:], len(ids) - 1, 1) for sid, ids, _ in seqs[3:4]]))  # one row, one chain
        return out

    before = calls[0]
    got, want, fused, loop = run_both(model, monkeypatch, script)
    assert calls[0] - before == 6, "every step of this script is one the fused path takes"
    assert_identical(got, want, fused, loop)


@pytest.mark.parametrize("dtype", DTYPES)
def test_biased_products_are_fused_too(dtype, calls, monkeypatch):
    cfg = small_config(chains=(2, 2, 2))
    model = random_model(cfg)
    with torch.no_grad():
        for blk in model.layers:
            for cl in (blk.attn.qkv, blk.attn.o, blk.ffn.gate_up, blk.ffn.down):
                for lin in cl._lins:
                    lin.bias = torch.nn.Parameter(torch.randn(lin.weight.shape[0]) * 0.1)
    model = in_dtype(model, dtype)
    ids = rand_ids(cfg, 12, seed=3)
    script = lambda run: [run.step([(0, ids[:8], 0, 3), (1, ids[:5], 0, 2), (2, ids[2:9], 0, 3)]),
                          run.step([(0, ids[8:9], 8, 3), (1, ids[5:6], 5, 2), (2, ids[9:10], 7, 3)])]
    got, want, fused, loop = run_both(model, monkeypatch, script)
    assert calls[0] == 2
    assert_identical(got, want, fused, loop)


def test_the_fused_path_follows_weights_that_were_replaced_or_moved(calls, monkeypatch):
    """The weight table is cached; load_state_dict(assign=True) replaces the Parameters and a dtype
    round trip moves them: the next step must read the new weights, not the old addresses."""
    cfg = small_config(chains=(2, 2, 2))
    model = random_model(cfg)
    ids = rand_ids(cfg, 10, seed=4)
    step = lambda run: run.step([(0, ids, 0, 3)])[0]
    first = step(PagedRunner(model))
    other = random_model(cfg, seed=123)
    model.load_state_dict({k: v.clone() for k, v in other.state_dict().items()}, assign=True)
    model.column_major_head()
    replaced = step(PagedRunner(model))
    assert not torch.equal(first, replaced)
    assert torch.equal(replaced, step(PagedRunner(other)))
    model.to(torch.float64).to(torch.float32)  # every weight at a new address, same values
    assert torch.equal(step(PagedRunner(model)), replaced)
    assert calls[0] == 4


def test_steps_the_kernel_cannot_take_keep_the_python_loop(calls):
    """Unequal chains and CoLM-Air (no plan of pairs) and fp16 run the loop; a long prefill attends
    through SDPA groups, so its step does too."""
    for setting in (dict(chains=(1, 3)), dict(chains=(2, 2), kv_sharing=True)):
        cfg = small_config(**setting)
        PagedRunner(random_model(cfg)).step([(0, rand_ids(cfg, 6, seed=1), 0, cfg.n_chains)])
    cfg = small_config(chains=(2, 2))
    PagedRunner(random_model(cfg).to(torch.float16)).step([(0, rand_ids(cfg, 6, seed=1), 0, 2)])
    assert calls[0] == 0
    model = random_model(cfg)
    PagedRunner(model, blocks=512).step([(0, rand_ids(cfg, 300, seed=2), 0, 2)])  # 300 x 300 > PAIRS_MAX_WORK
    assert calls[0] == 0


def test_fused_rows_never_read_the_chains_they_do_not_use(calls):
    """NaN in every weight of chains 2 and up, and in chain 2's K/V pool: rows at one chain still give
    exactly their logits from the clean model, in a batch with rows at every chain count."""
    cfg = small_config(chains=(2, 2, 2))
    clean, model = random_model(cfg), random_model(cfg)
    with torch.no_grad():
        for blk in model.layers:
            for cl in (blk.attn.qkv, blk.attn.o, blk.ffn.gate_up, blk.ffn.down):
                for lin in cl._lins[1:]:
                    lin.weight.fill_(float("nan"))
    ids = [rand_ids(cfg, 7 + i, seed=40 + i) for i in range(4)]
    chains = [3, 1, 2, 1]

    def script(m: CoLMModel) -> list:
        run = PagedRunner(m, seed=8)
        run.step([(i, x[:-1], 0, k) for i, (x, k) in enumerate(zip(ids, chains))])
        run.cache.k[1].fill_(float("nan"))
        return run.step([(i, x[-1:], len(x) - 1, k) for i, (x, k) in enumerate(zip(ids, chains))])

    got, want = script(model), script(clean)
    assert calls[0] == 4
    for i in (1, 3):
        assert torch.equal(got[i], want[i])
    assert torch.isnan(got[0]).any() and torch.isnan(got[2]).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("counts", [(12, 12, 12), (14, 9, 3), (30, 1, 1), (4, 9, 20), (2, 3, 30)],
                         ids=["12-12-12", "14-9-3", "30-1-1", "4-9-20", "2-3-30"])
def test_fused_decode_of_many_rows_equals_the_python_loop(counts, dtype, calls, monkeypatch):
    """Enough rows that chain blocks run on the tall kernel (>= cpu_kernels.F32_TALL_ROWS rows, in bf16
    BF16_TALL_ROWS) next to few-row ones in the same product (4-9-20: chain 3 on 4 rows; 2-3-30: chains 2
    and 3 on 5 and 2): rows at 3, 2 and 1 chains in these counts."""
    cfg = small_config(chains=(2, 2, 2), head_dim=64)
    model = in_dtype(random_model(cfg), dtype)
    chains = [3] * counts[0] + [2] * counts[1] + [1] * counts[2]
    seqs = [(i, rand_ids(cfg, 5 + i % 7, seed=60 + i), k) for i, k in enumerate(chains)]

    def script(run: PagedRunner) -> list:
        for sid, ids, k in seqs:
            run.step([(sid, ids[:-1], 0, k)])
        return [run.step([(sid, ids[-1:], len(ids) - 1, k) for sid, ids, k in seqs])]

    got, want, fused, loop = run_both(model, monkeypatch, script)
    assert calls[0] == len(seqs) + 1
    assert_identical(got, want, fused, loop)


@pytest.mark.skipif(not cpu_kernels.has_f32_rows(), reason="the one-call layers run on AVX2 CPUs without AVX-512")
def test_the_timing_build_reports_every_part_of_the_layers():
    """benchmarks/layer_parts.py builds the kernels with -DCOLM_LAYER_TIMING (a separate cached library)
    and reports each part's time for all chains, the equal mix and one chain; the normal build has no
    timers (PART is the statement alone)."""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "layer_parts.py"), "--random", "tiny", "--batch",
                          "8", "--rounds", "2"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    steps = [ln for ln in lines if re.match(r"^(4 chains|equal mix|1 chain): step", ln)]
    assert len(steps) == 3, out.stdout
    for name in ("qkv", "attn", "gate_up", "down"):
        times = [float(m) for m in re.findall(rf"\b{name} ([0-9.]+)", out.stdout)]
        assert len(times) == 3 and times[0] > 0, out.stdout
    assert not hasattr(cpu_kernels.library(), "layer_parts")


@pytest.mark.skipif(not cpu_kernels.has_f32_rows(), reason="chain_gemm_f32 runs on AVX2 CPUs without AVX-512")
def test_chain_map_parts_times_the_mix_and_each_of_its_parts():
    """benchmarks/chain_map_parts.py: one map at all chains, at the equal mix's rows and each part of the
    mix alone, with the mix's rows per chain from equal_mix (tiny: 8 rows over 4 chains -> 8, 6, 4, 2)."""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "chain_map_parts.py"), "--random", "tiny",
                          "--batch", "8", "--rounds", "2"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr
    assert "rows per chain [8, 6, 4, 2]" in out.stdout, out.stdout
    times = [float(t) for t in re.findall(r"^  .*?([0-9]+\.[0-9]+)$", out.stdout, re.M)]
    assert len(times) == 6 and all(t > 0 for t in times), out.stdout
    assert re.search(r"mix / all: [0-9.]+; mix / \(its parts alone\): [0-9.]+", out.stdout), out.stdout
