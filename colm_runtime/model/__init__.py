"""The CoLM model: chain layers, the Transformer, step batches and paged K/V storage."""

from colm_runtime.model.batch import ForwardBatch, SeqSpec
from colm_runtime.model.kv_cache import ChainKVCache
from colm_runtime.model.transformer import CoLMModel

__all__ = ["ChainKVCache", "CoLMModel", "ForwardBatch", "SeqSpec"]
