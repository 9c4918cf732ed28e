"""EngineConfig: the cache and scheduler settings of one engine (frozen; derived values are properties).

The KV budget is split into pools (one per chain for plain CoLM, one for CoLM-Air). By default every
pool gets the same number of blocks, so requests at full chains can use the whole budget. Because
pool 0 is used by every request and pool p only by requests above p chains, pool 0 is then always
the fullest, and shrinking a request (which frees upper pools only) cannot relieve it. `pool_weights`
tapers the upper pools instead (for example (4, 3, 2, 1) for an even mix of chain counts): then
full-chain load fills the upper pools first and shrinking running requests relieves the pressure.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from colm_runtime.config import ModelConfig
from colm_runtime.model import cpu_kernels
from colm_runtime.model.kv_cache import ChainKVCache

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """'float32' | 'bfloat16' | 'float16' | None (the checkpoint's dtype)."""
    if name is None or name == "auto":
        return None
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {name!r}")
    return _DTYPES[name]


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles for bf16 (oneDNN then runs bf16 matmuls on them)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if probe is not None:
        return bool(probe())
    try:
        with open("/proc/cpuinfo") as f:  # older torch: the kernel's flags
            return " amx_bf16" in f.read()
    except OSError:
        return False


def fastest_dtype(device: str) -> tuple[str, str]:
    """The fastest correct dtype on `device`, and why: bfloat16 on a CUDA device that supports it and
    on a CPU with AMX (bf16 matmuls at several times the fp32 rate), else float32. On AVX2 without
    AVX-512 our kernels widen bf16 to fp32 (cpu_kernels.has_bf16_widen): that reads half the bytes and
    decodes 1.5-1.7x faster than fp32 at 1-4 rows, but runs 5-12% slower from 16 rows and in prefill
    (docs/performance.md, round 9), so a server under load is faster in fp32 there, and the reason says
    that `--dtype bfloat16` suits one that serves few requests at a time."""
    if torch.device(device).type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "CUDA device with bf16"
        return "float32", "CUDA device without bf16"
    if cpu_has_amx():
        return "bfloat16", "CPU with AMX bf16"
    if cpu_kernels.has_bf16_widen():
        return "float32", ("CPU without AMX; bf16, widened on AVX2, can be faster at a few concurrent requests: "
                           "--dtype bfloat16")
    return "float32", "CPU without AMX"


def fastest_device() -> str:
    """'cuda' when a CUDA device is present, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_kv_cache_memory(device: str) -> int:
    """A budget that fits the machine: CUDA: half of the free device memory; CPU: an eighth of RAM,
    at most 4 GiB (the CPU is shared with the tokenizer, the server and other processes)."""
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * 0.5)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # not POSIX
        ram = 8 << 30
    return int(min(ram // 8, 4 << 30))


@dataclass(frozen=True)
class EngineConfig:
    """Settings of one engine.

    kv_cache_memory: bytes for all K/V pools together (None: default_kv_cache_memory). The pools are
      never made larger than max_num_seqs full-length sequences need, so a tiny model does not take
      gigabytes for nothing.
    max_num_seqs: running sequences at most (n > 1 completions count one each).
    max_num_batched_tokens: tokens computed per step (decode tokens + prefill chunks).
    max_model_len: prompt + output tokens at most (None: the model's max_position_embeddings).
    max_waiting: requests queued before EngineOverloaded.
    pool_weights: relative block count of each pool (None: equal; see the module docstring).
    seed: seeds the sampling of requests without their own seed.
    cpu_threads: torch intra-op threads to use (process-wide; None: leave torch's setting). On a CPU
      shared with other processes, 1 avoids OpenMP spin-waiting (see docs/engine.md).
    air_prefill_one_chain: CoLM-Air only: compute prompt tokens at 1 chain (exact: the KV cache comes
      from chain 1), only each sequence's last prompt token at its chain count.
    num_speculative_tokens: self-speculative decoding: the most tokens a sequence drafts per step (its
      gamma adapts below this to the measured acceptance rate); 0 disables it on this engine.
    speculative_draft_chains: the chain count that drafts (sequences at more chains speculate).
    speculative_default: whether requests that do not say (EngineRequest.speculative None) speculate.
    step_time_target: load policy: when the average decode step takes longer (seconds), unpinned
      running sequences step down a chain, and back up when it falls (None: off; chain_switch.py).
    enable_prefix_caching: reuse the K/V of full blocks whose prefix was computed before, in every pool
      a request uses, whatever chain count computed it (prefix_cache.py).
    max_step_failures: steps in a row whose batched work raises (each fails its requests) before the
      engine reports itself unhealthy for good (EngineStats.healthy; /health answers 503).
    """

    block_size: int = 16
    kv_cache_memory: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    max_waiting: int = 1024
    device: str = "cpu"
    dtype: str | None = None
    pool_weights: tuple[float, ...] | None = None
    seed: int = 0
    cpu_threads: int | None = None
    air_prefill_one_chain: bool = True
    num_speculative_tokens: int = 0
    speculative_draft_chains: int = 1
    speculative_default: bool = True
    step_time_target: float | None = None
    enable_prefix_caching: bool = True
    max_step_failures: int = 3

    def __post_init__(self) -> None:
        assert self.block_size >= 1 and self.max_num_seqs >= 1 and self.max_num_batched_tokens >= 1
        assert self.max_waiting >= 0 and (self.cpu_threads is None or self.cpu_threads >= 1)
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError("kv_cache_memory must be positive")
        if self.pool_weights is not None:
            object.__setattr__(self, "pool_weights", tuple(float(w) for w in self.pool_weights))
            if any(w <= 0 for w in self.pool_weights):
                raise ValueError("pool_weights must be positive")
        parse_dtype(self.dtype)
        if self.num_speculative_tokens < 0 or self.speculative_draft_chains < 1:
            raise ValueError("num_speculative_tokens must be >= 0 and speculative_draft_chains >= 1")
        if self.max_step_failures < 1:
            raise ValueError("max_step_failures must be >= 1")
        if self.step_time_target is not None and self.step_time_target <= 0:
            raise ValueError("step_time_target must be positive")

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return parse_dtype(self.dtype)

    def model_len(self, cfg: ModelConfig) -> int:
        """The longest sequence (prompt + output) the engine accepts for this model."""
        limit = cfg.max_position_embeddings
        return limit if self.max_model_len is None else min(self.max_model_len, limit)

    def num_blocks(self, cfg: ModelConfig, dtype: torch.dtype) -> tuple[int, ...]:
        """Blocks of each pool under the memory budget."""
        weights = self.pool_weights or (1.0,) * cfg.n_kv_pools
        assert len(weights) == cfg.n_kv_pools, f"pool_weights needs {cfg.n_kv_pools} entries"
        budget = self.kv_cache_memory or default_kv_cache_memory(self.device)
        per_block = ChainKVCache.block_bytes(cfg, self.block_size, dtype)
        top = max(weights)
        # Blocks b_p = unit * w_p / max(w), with sum_p b_p * bytes_p <= budget.
        unit = budget / sum(w / top * b for w, b in zip(weights, per_block))
        cap = self.max_num_seqs * -(-self.model_len(cfg) // self.block_size)
        return tuple(max(1, min(cap, int(unit * w / top))) for w in weights)
