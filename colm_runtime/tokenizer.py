"""Byte-level BPE tokenizer (Hugging Face tokenizers), stored as tokenizer.json in a model directory.

Which tokens end a sequence is read from the model directory (docs/checkpoint-format.md):
generation_config.json's "eos_token_id" (an id or a list), and tokenizer_config.json's "eos_token",
"bos_token" and "add_bos_token". Without them the convention of the models this project trains holds:
"<|endoftext|>" ends a document and is the only end-of-sequence token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
SPECIAL_TOKENS = (EOS,)
TOKENIZER_CONFIG, GENERATION_CONFIG = "tokenizer_config.json", "generation_config.json"


class Tokenizer:
    """Thin wrapper: encode/decode plus the end-of-sequence ids.

    eos_token_ids: every id that ends a sequence (the first is the primary one, eos_token_id);
    bos_token: the text of the beginning-of-sequence token, if the model has one; add_bos: whether
    a raw prompt (not a chat template's output, which writes it itself) starts with it."""

    def __init__(self, tok: HFTokenizer, eos_token_ids: Iterable[int] | None = None,
                 bos_token: str | None = None, add_bos: bool = False):
        self.hf = tok
        if eos_token_ids is None:
            eos = tok.token_to_id(EOS)
            if eos is None:
                raise ValueError(f"tokenizer has no {EOS!r} token and the model names no eos_token_id")
            eos_token_ids = [eos]
        self.eos_token_ids: tuple[int, ...] = tuple(int(i) for i in eos_token_ids)
        if not self.eos_token_ids:
            raise ValueError("eos_token_id: at least one end-of-sequence id is needed")
        n = self.vocab_size
        bad = [i for i in self.eos_token_ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"eos_token_id {bad} outside the tokenizer's vocabulary (0..{n - 1})")
        self.eos_token_id: int = self.eos_token_ids[0]
        self.bos_token_id = tok.token_to_id(bos_token) if bos_token else None
        if bos_token and self.bos_token_id is None:
            raise ValueError(f"bos_token {bos_token!r} is not in the tokenizer")
        self.bos_token = bos_token
        self.add_bos = bool(add_bos and self.bos_token_id is not None)

    @property
    def eos_token(self) -> str:
        """Text of the primary end-of-sequence token (a chat template's `eos_token`)."""
        return self.hf.id_to_token(self.eos_token_id)

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """A bare tokenizer.json: "<|endoftext|>" is the end-of-sequence token."""
        return cls(_read_tokenizer(path))

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "Tokenizer":
        """tokenizer.json with the end-of-sequence ids and BOS of the model directory."""
        d = Path(model_dir)
        tok = _read_tokenizer(d / "tokenizer.json")
        gen, tcfg = read_json_object(d / GENERATION_CONFIG), read_json_object(d / TOKENIZER_CONFIG)
        eos = gen.get("eos_token_id")
        if eos is None and isinstance(tcfg.get("eos_token"), str):
            eos = tok.token_to_id(tcfg["eos_token"])
        if isinstance(eos, int):
            eos = [eos]
        if eos is not None and not (isinstance(eos, list) and all(isinstance(i, int) for i in eos)):
            raise ValueError(f"{d / GENERATION_CONFIG}: eos_token_id must be an id or a list of ids")
        bos = tcfg.get("bos_token")
        try:
            return cls(tok, eos, bos if isinstance(bos, str) else None, bool(tcfg.get("add_bos_token", False)))
        except ValueError as e:
            raise ValueError(f"{d}: {e}") from None

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of text; add_bos=True puts the BOS token first when the model wants one
        (self.add_bos), as for a raw completion prompt."""
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if add_bos and self.add_bos else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, path: str | Path) -> None:
        self.hf.save(str(path))


def _read_tokenizer(path: str | Path) -> HFTokenizer:
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a generic Exception on a corrupt file
        raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None


def read_json_object(path: Path) -> dict:
    """A JSON object file, or {} when it does not exist; ValueError naming the file otherwise."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


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
