"""`colm import gguf`: the random Llama written as GGUF the way llama.cpp's converter writes it (q and k
rows permuted), in F32 and Q8_0, imported, computes transformers' logits on the weights the file
holds; without the q/k un-permutation the same comparison fails (negative control)."""

from __future__ import annotations

import json

import pytest
import torch

from colm_runtime.importers.gguf_file import import_gguf, permute, unpermute
from colm_runtime.importers.llama import ImportRefused
from colm_runtime.tokenizer import Tokenizer
from tests.importers._llama import (PROMPTS, assert_same_logits, colm_greedy, hf_greedy, hf_load, hf_logits,
                                    make_hf_llama, write_gguf)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_llama(tmp_path_factory.mktemp("gguf-src") / "hf", num_key_value_heads=2)


@pytest.fixture(scope="module", params=["F32", "Q8_0"])
def gguf_pair(request, hf_dir, tmp_path_factory):
    """(GGUF path, transformers model on the weights the file holds: dequantized for Q8_0)."""
    path = tmp_path_factory.mktemp(request.param) / "model.gguf"
    held = write_gguf(hf_dir, path, request.param)
    return path, hf_load(hf_dir, held)


def long_ids(d) -> list[int]:
    return Tokenizer.from_model_dir(d).encode(" ".join(PROMPTS) * 4)[:90]


def test_permutation_round_trip():
    w = torch.randn(3 * 16, 10)
    assert torch.equal(unpermute(permute(w, 3), 3), w)
    assert not torch.equal(permute(w, 3), w)


def test_imported_gguf_matches_transformers(gguf_pair, hf_dir, tmp_path):
    path, ref = gguf_pair
    out = import_gguf(path, tmp_path / "colm", dtype="float32")
    assert_same_logits(out, ref, long_ids(hf_dir))
    prompts = [Tokenizer.from_model_dir(hf_dir).encode(p) for p in PROMPTS]
    assert colm_greedy(out, prompts, 12) == hf_greedy(ref, prompts, 12)


def relative_error(colm_dir, ref, ids) -> float:
    """||our logits - reference logits|| / ||reference logits|| over a full prompt (Frobenius)."""
    from colm_runtime.checkpoint import load_model

    ours = load_model(colm_dir, dtype=torch.float32)
    with torch.no_grad():
        a = ours.logits(ours(torch.tensor([ids])), 1)[0]
    b = hf_logits(ref, ids)
    return ((a - b).norm() / b.norm()).item()


def test_q8_0_is_close_to_the_original(gguf_pair, hf_dir, tmp_path):
    """Against the unquantized original, Q8_0 (8-bit weights, ~0.4% error per weight) moves this model's
    logits by 1.6% in relative norm (measured; the seed is fixed); a q/k mapping mistake moves them by
    38% (the negative control below), so 3% separates the two."""
    path, _ = gguf_pair
    out = import_gguf(path, tmp_path / "colm", dtype="float32")
    assert relative_error(out, hf_load(hf_dir), long_ids(hf_dir)) < 0.03


def test_negative_control_a_q_k_order_mistake_fails(hf_dir, tmp_path):
    """A file whose q/k rows were never put in llama.cpp's order: the import's unpermute then scrambles
    them (the same mistake as a missing unpermute), and the logit comparison must fail."""
    path = tmp_path / "unpermuted.gguf"
    write_gguf(hf_dir, path, "F32", permute_qk=False)
    out = import_gguf(path, tmp_path / "colm", dtype="float32")
    ref = hf_load(hf_dir)
    with pytest.raises(AssertionError):
        assert_same_logits(out, ref, long_ids(hf_dir))
    assert relative_error(out, ref, long_ids(hf_dir)) > 0.2


def test_tokenizer_rebuilt_from_metadata(gguf_pair, hf_dir, tmp_path):
    path, _ = gguf_pair
    out = import_gguf(path, tmp_path / "colm", dtype="float32")
    ours, orig = Tokenizer.from_model_dir(out), Tokenizer.from_model_dir(hf_dir)
    for text in [*PROMPTS, "<|im_start|>user\nHi 123<|im_end|>\n", "  spaces\tand\nnewlines 3.14"]:
        assert ours.encode(text) == orig.encode(text)
        assert ours.decode(ours.encode(text)) == orig.decode(orig.encode(text))
    assert ours.eos_token_ids[0] == orig.hf.token_to_id("<|im_end|>")
    assert orig.hf.token_to_id("<|endoftext|>") in ours.eos_token_ids  # a control token: ends text too
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tcfg["bos_token"] == "<|im_start|>" and tcfg["eos_token"] == "<|im_end|>"
    assert tcfg["chat_template"] == json.loads((hf_dir / "tokenizer_config.json").read_text()).get(
        "chat_template", (hf_dir / "chat_template.jinja").read_text() if (hf_dir / "chat_template.jinja").is_file() else None)


def test_bf16_output_dtype(gguf_pair, tmp_path):
    from safetensors import safe_open

    out = import_gguf(gguf_pair[0], tmp_path / "colm", dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_refusals_name_the_field(hf_dir, tmp_path):
    import gguf

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(ImportRefused, match="bad.gguf: not a readable GGUF file"):
        import_gguf(bad, tmp_path / "out")
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ImportRefused, match="general.architecture 'gpt2' is not supported"):
        import_gguf(tmp_path / "gpt2.gguf", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "gpt2.gguf"]
