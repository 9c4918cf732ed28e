"""The inference engine: scheduler, block manager, sampler, and the async front (see types.py).

Imports are lazy so that `from colm_runtime.engine.types import ...` pulls in no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from colm_runtime.engine.async_engine import AsyncEngine
    from colm_runtime.engine.config import EngineConfig
    from colm_runtime.engine.llm_engine import LLMEngine

_LAZY = {"AsyncEngine": "async_engine", "EngineConfig": "config", "LLMEngine": "llm_engine"}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"colm_runtime.engine.{_LAZY[name]}"), name)
    raise AttributeError(name)
