"""Structured outputs: grammars compiled by llguidance, one matcher per sequence, packed token masks.

A GrammarSpec (JSON schema, any JSON object, regex or a fixed choice) compiles once into a
CompiledGrammar (the server compiles off the engine thread and caches by spec); each constrained
sequence gets its own matcher, a cheap copy of the compiled one, that advances with every token the
sequence keeps. Before sampling, a constrained row's allowed tokens are written as a packed bitmask
(one bit per vocabulary id, int32 words) that the sampler applies as one tensor op (sampler.py
`constrain`). Recompute preemption and chain switches keep a sequence's tokens, so its matcher stays
valid; speculative drafts are consumed while drafting and rolled back afterwards (speculative.py).

llguidance is imported lazily so that the engine runs without it; compiling then raises GrammarError
with the reason, which the server reports as a 400.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch

GrammarKind = Literal["json_object", "json_schema", "regex", "choice"]
# Compact JSON (no free whitespace): a small model can otherwise spend its whole budget on blanks.
JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """The grammar cannot be compiled (invalid schema or regex, or no grammar engine installed)."""


@dataclass(frozen=True)
class GrammarSpec:
    """What to constrain output to. value: the schema (canonical JSON), the regex, or the choices as a
    JSON list; empty for json_object."""

    kind: GrammarKind
    value: str = ""

    @property
    def key(self) -> str:
        """Cache key: two specs with the same canonical value compile to the same grammar."""
        return f"{self.kind}:{self.value}"

    def source(self) -> str:
        """The llguidance grammar text."""
        from llguidance import LLMatcher

        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(self.value, defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.value)
        choices = json.loads(self.value)  # lark string literals are JSON strings
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))


def canonical_json(value) -> str:
    """Compact JSON (key order kept: it is the order of the output's properties), the cache key."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class CompiledGrammar:
    """A compiled grammar; matcher() gives each sequence its own state."""

    def __init__(self, spec: GrammarSpec, template, vocab_size: int, eos: tuple[int, ...]):
        self.spec, self._template, self.vocab_size, self.eos = spec, template, vocab_size, frozenset(eos)

    def matcher(self) -> "Matcher":
        """A fresh matcher at the grammar's start (a copy of the compiled one: no recompilation)."""
        return Matcher(self._template.deep_copy(), self.eos)


class Matcher:
    """One sequence's grammar state: an llguidance LLMatcher fed the sequence's tokens except EOS.

    EOS is never fed: it ends the sequence (or, with ignore_eos, the grammar simply goes on), and
    llguidance does not count an EOS consumed after the grammar stopped, which would make rollback
    counts ambiguous."""

    def __init__(self, ll, eos: frozenset[int]):
        self.ll, self.eos = ll, eos

    def consume(self, token: int) -> int:
        """Advance by a token the sequence kept (always one its mask allowed); the tokens consumed (0: EOS)."""
        if token in self.eos:
            return 0
        if not self.ll.consume_token(token):
            raise RuntimeError(f"token {token} rejected by the grammar: {self.ll.get_error()[:200]}")
        return 1

    def rollback(self, n: int) -> None:
        """Forget the last n consumed tokens (a speculative draft)."""
        if n and not self.ll.rollback(n):
            raise RuntimeError(f"grammar rollback of {n} tokens failed: {self.ll.get_error()[:200]}")


class GrammarCompiler:
    """Compiles GrammarSpecs against one tokenizer (its tokenizer.json, byte-level BPE) and vocabulary
    size (the model's logits width, which may exceed the tokenizer's)."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._lltok = None

    def _ll_tokenizer(self):
        if self._lltok is None:
            from llguidance import LLTokenizer

            self._lltok = LLTokenizer(self.tokenizer.hf.to_str(), n_vocab=self.vocab_size,
                                      eos_token=list(eos_token_ids(self.tokenizer)))
        return self._lltok

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """Compile spec (blocking: milliseconds to, for huge schemas, a second); GrammarError if invalid."""
        try:
            from llguidance import LLMatcher
        except ImportError:
            raise GrammarError("structured outputs need the llguidance package, which is not installed") from None
        try:
            source = spec.source()
        except (ValueError, TypeError) as e:
            raise GrammarError(str(e)) from None
        tok = self._ll_tokenizer()
        try:  # a client's grammar: whatever the engine objects to is the client's error, with its reason
            error = LLMatcher.validate_grammar(source, tok)
            template = None if error else LLMatcher(tok, source, log_level=0)
        except Exception as e:  # noqa: BLE001
            error = f"{type(e).__name__}: {e}"
        if not error and template.is_error():
            error = template.get_error()
        if error:
            raise GrammarError((error.strip().splitlines() or ["invalid grammar"])[0][:500])
        return CompiledGrammar(spec, template, self.vocab_size, eos_token_ids(self.tokenizer))


def eos_token_ids(tokenizer) -> tuple[int, ...]:
    """The end-of-sequence ids the grammar may end with (one accessor, so that tokenizers with several
    EOS ids only change here)."""
    ids = getattr(tokenizer, "eos_token_ids", None)
    return tuple(ids) if ids else (tokenizer.eos_token_id,)


def fill_bitmask(matchers: list[Matcher], vocab_size: int) -> torch.Tensor:
    """The allowed tokens of each matcher's current state, packed. -> [R, ceil(V / 32)] int32 (CPU).

    What llguidance.torch.fill_next_token_bitmask does, without importing that module (it wraps a
    function in torch.compile at import, which costs seconds)."""
    bitmask = torch.full((len(matchers), (vocab_size + 31) // 32), -1, dtype=torch.int32)
    row_bytes = bitmask.shape[1] * bitmask.element_size()
    for i, m in enumerate(matchers):
        m.ll.unsafe_compute_mask_ptr(bitmask[i].data_ptr(), row_bytes)
    for i in (bitmask == 0).all(dim=1).nonzero()[:, 0].tolist():  # a grammar that allows nothing more (a
        eos = min(matchers[i].eos)  # client's unsatisfiable one): end the sequence rather than sample from -inf
        bitmask[i, eos // 32] |= 1 << (eos % 32) if eos % 32 < 31 else -(1 << 31)
    return bitmask


class MaskPrefetch:
    """Fills the grammar masks of the sequences a step will sample on a worker thread while the step's
    forward runs (llguidance and torch both release the GIL), so that constrained rows cost little
    more than free ones. Only the engine thread calls it, and it waits for the masks before any of
    those matchers is touched again."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[list[int], Future] | None = None

    def start(self, seqs: list) -> None:
        """Begin filling the masks of seqs (sequences with a matcher whose state is final for this step)."""
        if not seqs:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="colm-grammar")
        self._pending = ([s.seq_id for s in seqs], self._pool.submit(fill_bitmask, [s.matcher for s in seqs],
                                                                      self.vocab_size))

    def take(self) -> dict[int, torch.Tensor]:
        """The prefetched masks by seq_id ([W] each; empty if none were started); waits for them."""
        if self._pending is None:
            return {}
        ids, future = self._pending
        self._pending = None
        return dict(zip(ids, future.result()))

    def discard(self) -> None:
        """Wait for (so that no thread still reads the matchers) and drop the pending masks, if any."""
        if self._pending is not None:
            self._pending[1].exception()
            self._pending = None
