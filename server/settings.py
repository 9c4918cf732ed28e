"""ServerSettings: every knob of `colm serve`, from flags or COLM_* environment variables.

Validated once at start-up (pydantic-settings): a bad value stops the server with a message naming
the setting, before any model is loaded. Flags given on the command line override the environment.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from colm_runtime.paths import default_model_dir

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
          "mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "t": 1000**4, "tb": 1000**4,
          "tib": 1 << 40}


def parse_size(value: str | int) -> int:
    """'512MiB' | '2GB' | '1048576' -> bytes."""
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    unit = (m.group(2) or "").lower() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(f"not a size: {value!r} (examples: 1048576, 512MiB, 2GB)")
    return int(float(m.group(1)) * _UNITS[unit])


class ServerSettings(BaseSettings):
    """Settings of one server process (frozen once validated)."""

    model_config = SettingsConfigDict(env_prefix="COLM_", frozen=True, extra="forbid",
                                      protected_namespaces=())

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model: Path = Field(default_factory=default_model_dir, description="model directory")
    served_model_name: str | None = Field(None, description="base model id (default: the directory name)")
    # API keys: COLM_API_KEYS="k1,k2" and/or a file with one key a line. No keys: no authentication.
    api_keys: Annotated[tuple[str, ...], NoDecode] = ()
    api_key_file: Path | None = None
    metrics_auth: bool = Field(False, description="require an API key on /metrics too")
    # Queue, limits and degradation.
    max_waiting: int = Field(256, ge=1, description="requests queued before 429 (pinned requests)")
    degraded_queue_headroom: float = Field(0.5, ge=0, description="extra queue, as a fraction of "
                                           "max_waiting, open to unpinned requests degraded to 1 chain")
    degrade_queue_fraction: float = Field(0.5, ge=0, le=1, description="queue fill at which unpinned "
                                          "requests start losing chains")
    degrade_kv_watermark: float = Field(0.9, gt=0, le=1, description="pool usage above which unpinned "
                                        "requests avoid that chain's pool")
    degrade_utilization: float = Field(0.85, gt=0, description="share of the engine's time the recent load "
                                       "may take at a chain count before unpinned requests get fewer chains "
                                       "(above 1: only a growing queue degrades)")
    refuse_unreachable_budgets: bool = Field(False, description="429 for unpinned requests whose latency budget "
                                             "even 1 chain is predicted to miss")
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(512, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_prompt_tokens: int | None = Field(None, ge=1)
    max_stream_buffer: int = Field(1024, ge=1, description="stream outputs held for a client that is not "
                                   "reading; past that its request is aborted (bounded memory)")
    # Per-API-key rate limits (only with API keys): requests and tokens (prompt + max_tokens) a minute.
    rate_limit_rpm: int | None = Field(None, ge=1)
    rate_limit_tpm: int | None = Field(None, ge=1)
    max_model_len: int | None = Field(None, ge=2)
    # Tiers and default routing.
    tiers_file: Path | None = None
    default_tier: str = "premium"
    # Engine.
    kv_cache_memory: int | None = Field(None, ge=1, description="bytes for all KV pools (512MiB, 2GB)")
    block_size: int = Field(16, ge=1, le=1024)
    device: str = "auto"
    # auto: the fastest correct dtype here (bf16 on a GPU or an AMX CPU), reported at start-up. bf16 is not
    # bit-faithful to an fp32 checkpoint: tests that compare exact outputs pin --dtype float32.
    dtype: str = "auto"
    seed: int = 0
    num_speculative_tokens: int = Field(0, ge=0, le=16, description="self-speculative decoding: draft tokens "
                                        "per step at most (0: off)")
    speculative_draft_chains: int = Field(1, ge=1, description="chain count that drafts")
    step_time_target_ms: float | None = Field(None, gt=0, description="load policy: unpinned running requests "
                                              "step down a chain while a decode step takes longer")
    enable_prefix_caching: bool = Field(True, description="reuse the K/V of cached prompt prefixes, across "
                                        "chain counts (docs/engine.md)")
    warmup: bool = Field(True, description="run one tiny request per chain count before /ready")
    chat_template: Path | None = None
    # Lifecycle and logs.
    drain_timeout: float = Field(30.0, ge=0)
    log_level: str = "info"
    access_log: bool = True

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v):
        if isinstance(v, str):
            v = v.split(",")
        return tuple(k.strip() for k in v if k and k.strip())

    @field_validator("kv_cache_memory", "max_body_bytes", mode="before")
    @classmethod
    def _size(cls, v):
        return None if v is None or v == "" else parse_size(v)

    @field_validator("model", "api_key_file", "tiers_file", "chat_template")
    @classmethod
    def _exists(cls, v: Path | None, info):
        if v is not None and not v.exists():
            hint = " (train one with `colm train`, or pass --model)" if info.field_name == "model" else ""
            raise ValueError(f"{v} does not exist{hint}")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in ("auto", "checkpoint", "float32", "bfloat16", "float16"):
            raise ValueError("must be auto, checkpoint, float32, bfloat16 or float16")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:\d+)?|auto", v):
            raise ValueError("must be cpu, cuda, cuda:N or auto")
        return v

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.lower() not in ("critical", "error", "warning", "info", "debug"):
            raise ValueError("must be critical, error, warning, info or debug")
        return v.lower()

    @model_validator(mode="after")
    def _model_dir(self):
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            if not (self.model / name).is_file():
                raise ValueError(f"model directory {self.model} has no {name} "
                                 "(train one with `colm train`, or pass --model)")
        return self

    @property
    def all_api_keys(self) -> tuple[str, ...]:
        """Keys from COLM_API_KEYS and the key file together (blank lines and # comments skipped)."""
        keys = list(self.api_keys)
        if self.api_key_file is not None:
            for line in self.api_key_file.read_text().splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    keys.append(line.strip())
        return tuple(keys)

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.resolve().name

    @property
    def resolved_device(self) -> str:
        """--device, with auto resolved: CUDA when present, else the CPU."""
        from colm_runtime.engine.config import fastest_device

        return fastest_device() if self.device == "auto" else self.device

    @property
    def resolved_dtype(self) -> tuple[str | None, str]:
        """(dtype for the engine, None for the checkpoint's; why), with auto resolved to the fastest
        correct dtype on the resolved device."""
        from colm_runtime.engine.config import fastest_dtype

        if self.dtype == "auto":
            name, why = fastest_dtype(self.resolved_device)
            return name, f"auto: {why}"
        if self.dtype == "checkpoint":
            return None, "the checkpoint's"
        return self.dtype, "--dtype"

    @property
    def hard_queue_limit(self) -> int:
        """The engine's queue bound: max_waiting plus the headroom kept for degraded requests."""
        return self.max_waiting + int(self.max_waiting * self.degraded_queue_headroom)
