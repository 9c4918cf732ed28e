"""Incremental detokenization: multi-byte UTF-8 split over tokens, stop strings spanning tokens."""

from __future__ import annotations

from colm_runtime.engine.detokenizer import IncrementalDetokenizer
from colm_runtime.testing import small_tokenizer

TEXT = "A naïve café in 日本 sells crème brûlée 🎉 at a good price, then stops here for good."


def stream(text: str, stop=()) -> tuple[list[str], IncrementalDetokenizer]:
    tok = small_tokenizer()
    d = IncrementalDetokenizer(tok, tuple(stop))
    ids = tok.encode(text)
    deltas = []
    for i, t in enumerate(ids):
        d.add(t)
        deltas.append(d.delta(final=i == len(ids) - 1 or d.stopped_by is not None))
        if d.stopped_by is not None:
            break
    return deltas, d


def test_multibyte_characters_split_over_byte_tokens_are_never_emitted_in_pieces():
    tok = small_tokenizer()
    ids = tok.encode(TEXT)
    pieces = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "the test text must split characters across tokens"
    deltas, _ = stream(TEXT)
    assert "".join(deltas) == TEXT
    assert not any("\ufffd" in d for d in deltas)
    assert sum(1 for d in deltas if d) > len(deltas) // 2  # text streams, it is not held to the end


def test_a_stop_string_spanning_tokens_cuts_the_text_before_it():
    tok = small_tokenizer()
    stop = "ops he"
    ids = tok.encode(TEXT)
    assert not any(stop in tok.decode([i]) for i in ids)  # no single token contains it
    deltas, d = stream(TEXT, [stop, "never there"])
    assert d.stopped_by == stop
    assert "".join(deltas) == TEXT[: TEXT.index(stop)]


def test_a_stop_string_with_multibyte_characters():
    deltas, d = stream(TEXT, ["日本"])
    assert d.stopped_by == "日本" and "".join(deltas) == "A naïve café in "


def test_text_that_may_start_a_stop_string_is_held_back_until_it_cannot():
    tok = small_tokenizer()
    d = IncrementalDetokenizer(tok, ("price!",))
    emitted = ""
    for t in tok.encode("a good price, then"):
        d.add(t)
        emitted += d.delta(final=False)
        if d.text.endswith("pri"):
            assert not emitted.endswith("pri")  # "pri" may begin "price!": held
    assert d.stopped_by is None
    assert emitted + d.delta(final=True) == "a good price, then"


def test_the_earliest_of_several_stop_strings_wins():
    _, d = stream(TEXT, ["good", "café"])
    assert d.stopped_by == "café" and d.text == "A naïve "
