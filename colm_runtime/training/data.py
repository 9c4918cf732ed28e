"""Training data: read text files, tokenise, pack into fixed-length sequences, batch by position.

Every file is one document; documents are joined with the end-of-sequence token and cut into
windows of seq_len + 1 tokens (inputs and shifted targets), stride seq_len. The order of windows in
an epoch is a permutation drawn from (seed, epoch), so a data position (epoch, offset) names the next
batch exactly: that is what `--resume` stores, and how ranks of a distributed run split the data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from colm_runtime.tokenizer import Tokenizer

TEXT_SUFFIXES = (".txt", ".md", ".rst")


class CorpusError(ValueError):
    """Training text is missing or empty; the message names the path."""


def list_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expand files and directories (recursively: *.txt, *.md, *.rst) into a sorted file list."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
            if not found:
                raise CorpusError(f"{p}: directory holds no text files ({', '.join(TEXT_SUFFIXES)})")
            files.extend(found)
        else:
            raise CorpusError(f"{p}: no such file or directory")
    return files


def read_documents(paths: Sequence[str | Path]) -> list[str]:
    """The non-empty documents of the given files, in a stable order: a text file is one document, a
    .jsonl file one per line (its "text" field, as in lm-evaluation-harness task files)."""
    docs = []
    for f in list_files(paths):
        text = f.read_text(encoding="utf-8", errors="replace")
        if f.suffix == ".jsonl":
            try:
                docs.extend(str(json.loads(line)["text"]) for line in text.splitlines() if line.strip())
            except (ValueError, KeyError, TypeError) as e:
                raise CorpusError(f"{f}: every line must be a JSON object with a \"text\" field ({e})") from None
        else:
            docs.append(text)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CorpusError(f"empty corpus: no text in {', '.join(str(p) for p in paths)}")
    return docs


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Hold out documents by a hash of their text (stable across machines and file orders)."""
    val = [d for d in docs if int(hashlib.sha1(d.encode()).hexdigest(), 16) % 10_000 < val_fraction * 10_000]
    train = [d for d in docs if int(hashlib.sha1(d.encode()).hexdigest(), 16) % 10_000 >= val_fraction * 10_000]
    if not val and len(train) > 1:
        val = [train.pop()]  # tiny corpora: still hold out one document
    if not train:
        raise CorpusError("corpus too small: nothing left to train on after the validation split")
    return train, val


def tokenize(docs: list[str], tok: Tokenizer) -> torch.Tensor:
    """One stream of token ids: each document followed by EOS. [N] int64."""
    out: list[int] = []
    for ids in tok.encode_batch(docs):
        out.extend(ids)
        out.append(tok.eos_token_id)
    return torch.tensor(out, dtype=torch.long)


@dataclass(frozen=True)
class DataPosition:
    """The next batch to read: window `offset` of the permutation of epoch `epoch`."""

    epoch: int = 0
    offset: int = 0


class PackedDataset:
    """Fixed-length windows over a token stream. windows: [N, seq_len + 1]."""

    def __init__(self, stream: torch.Tensor, seq_len: int):
        n = (stream.numel() - 1) // seq_len
        if n < 1:
            raise CorpusError(f"corpus too small: {stream.numel()} tokens, need more than seq_len={seq_len}")
        idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]
        self.windows = stream[idx]
        self.seq_len = seq_len

    def __len__(self) -> int:
        return self.windows.shape[0]

    @property
    def num_tokens(self) -> int:
        return len(self) * self.seq_len

    def permutation(self, seed: int, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))

    def batches(self, batch_size: int, seed: int, pos: DataPosition, rank: int = 0, world: int = 1
                ) -> Iterator[tuple[torch.Tensor, DataPosition]]:
        """Endless global batches of batch_size * world windows from `pos`; each rank gets its slice.
        Yields (windows [batch_size, seq_len + 1], the position after this batch)."""
        glob = batch_size * world
        if glob > len(self):
            raise CorpusError(f"corpus too small: {len(self)} sequences of {self.seq_len} tokens, "
                              f"a batch needs {glob}")
        epoch, offset = pos.epoch, pos.offset
        perm = self.permutation(seed, epoch)
        while True:
            if offset + glob > len(self):  # drop the ragged tail; a new epoch reshuffles
                epoch, offset = epoch + 1, 0
                perm = self.permutation(seed, epoch)
            ids = perm[offset + rank * batch_size : offset + (rank + 1) * batch_size]
            offset += glob
            yield self.windows[ids], DataPosition(epoch, offset)

    def eval_batches(self, batch_size: int, max_tokens: int | None = None) -> Iterator[torch.Tensor]:
        """The windows in order (no shuffling), up to max_tokens tokens."""
        n = len(self) if max_tokens is None else max(1, min(len(self), max_tokens // self.seq_len))
        for i in range(0, n, batch_size):
            yield self.windows[i : min(i + batch_size, n)]
