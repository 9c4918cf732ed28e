"""Importers: dense Llama-family checkpoints (Hugging Face directories, GGUF files) as one-chain CoLM
checkpoints, and the reverse export to a Hugging Face Llama directory. docs/models.md describes them."""

from colm_runtime.importers.llama import ImportRefused, LlamaArch

__all__ = ["ImportRefused", "LlamaArch"]
