"""Byte-level BPE tokenizer (Hugging Face tokenizers), stored as tokenizer.json in a model directory.

Convention: the special token "<|endoftext|>" ends a document and is the end-of-sequence token.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
SPECIAL_TOKENS = (EOS,)


class Tokenizer:
    """Thin wrapper: encode/decode plus the end-of-sequence id."""

    def __init__(self, tok: HFTokenizer):
        self.hf = tok
        eos = tok.token_to_id(EOS)
        if eos is None:
            raise ValueError(f"tokenizer has no {EOS!r} token")
        self.eos_token_id: int = eos

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # the Rust side raises a generic Exception on a corrupt file
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, path: str | Path) -> None:
        self.hf.save(str(path))


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style pre-tokenisation, all 256 bytes in the alphabet)."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)
