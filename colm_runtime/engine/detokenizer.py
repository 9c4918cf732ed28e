"""Incremental detokenization with stop strings.

Byte-level BPE tokens need not end on a character boundary: a token's text is known only once the
bytes of its last character are complete, so text is produced by decoding a short window of recent
tokens and taking what is new (the prefix/read offsets of Hugging Face's text streamer and vLLM),
never emitting a trailing U+FFFD. Stop strings may span tokens: the full output text is searched
around the new text, and text that might be the start of a stop string is held back until known.
"""

from __future__ import annotations

from colm_runtime.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one completion's tokens into text deltas; detects stop strings."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # all output text so far (cut at a stop string once one is found)
        self.emitted = 0  # characters of self.text already handed out
        self.stopped_by: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> None:
        """Append one token; its complete characters join self.text (and stop strings are checked)."""
        if self.stopped_by is not None:
            return
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return  # an incomplete character (or a special token): wait for more bytes
        new = full[len(prefix) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self._append(new)

    def _append(self, new: str) -> None:
        start = max(0, len(self.text) - self._hold)
        self.text += new
        if not self.stop:
            return
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            i, s = min(hits)
            self.text = self.text[:i]
            self.stopped_by = s

    def delta(self, final: bool) -> str:
        """New text to hand out; unless final, holding back a tail that may begin a stop string."""
        end = len(self.text)
        if not final and self.stopped_by is None and self.stop:
            end -= self._held_tail()
        end = max(end, self.emitted)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out

    def _held_tail(self) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        t = self.text
        for n in range(min(self._hold, len(t)), 0, -1):
            suffix = t[-n:]
            if any(s.startswith(suffix) for s in self.stop):
                return n
        return 0
