"""End-of-sequence ids and BOS from a model directory's side files (docs/checkpoint-format.md)."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from colm_runtime.tokenizer import Tokenizer
from tests.importers._llama import chatml_tokenizer
from tests.server.conftest import REPO


@pytest.fixture
def model_dir(tmp_path):
    chatml_tokenizer().save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def ids(tok, *names):
    return tuple(tok.hf.token_to_id(n) for n in names)


def test_without_side_files_endoftext_is_the_eos(model_dir):
    tok = Tokenizer.from_model_dir(model_dir)
    assert tok.eos_token_ids == ids(tok, "<|endoftext|>") and tok.eos_token == "<|endoftext|>"
    assert tok.bos_token is None and not tok.add_bos


@pytest.mark.parametrize("name", ["colm-tiny", "colm-tiny-air"])
def test_shipped_models_load_unchanged(name):
    d = REPO / "models" / name
    tok = Tokenizer.from_model_dir(d)
    assert tok.eos_token_ids == (Tokenizer.from_file(d / "tokenizer.json").eos_token_id,)
    assert tok.eos_token == "<|endoftext|>"


def test_generation_config_list_and_int(model_dir):
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [513, 0]}))
    assert Tokenizer.from_model_dir(model_dir).eos_token_ids == (513, 0)
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 512}))
    assert Tokenizer.from_model_dir(model_dir).eos_token_ids == (512,)


def test_eos_token_text_and_bos(model_dir):
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "add_bos_token": True}))
    tok = Tokenizer.from_model_dir(model_dir)
    assert tok.eos_token_ids == ids(tok, "<|im_end|>")
    assert tok.encode("Hi", add_bos=True)[0] == tok.bos_token_id == ids(tok, "<|im_start|>")[0]
    assert tok.encode("Hi") == tok.encode("Hi", add_bos=True)[1:]  # chat prompts: no BOS added


@pytest.mark.parametrize("files, message", [
    ({"generation_config.json": {"eos_token_id": [99999]}}, "eos_token_id [99999] outside the tokenizer"),
    ({"generation_config.json": {"eos_token_id": "2"}}, "generation_config.json: eos_token_id must be"),
    ({"generation_config.json": {"eos_token_id": []}}, "at least one end-of-sequence id"),
    ({"tokenizer_config.json": {"bos_token": "<s>"}}, "bos_token '<s>' is not in the tokenizer"),
])
def test_bad_side_files_are_named(model_dir, files, message):
    for name, data in files.items():
        (model_dir / name).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(message)):
        Tokenizer.from_model_dir(model_dir)


def test_extract_keeps_the_side_files(tmp_path, plain_model_dir):
    from colm_runtime.checkpoint import extract

    src = shutil.copytree(plain_model_dir, tmp_path / "src")
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [0]}))
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    out = extract(src, 2, tmp_path / "out")
    for name in ("generation_config.json", "tokenizer_config.json"):
        assert (out / name).read_text() == (src / name).read_text()


def test_llama3_style_bos_from_the_post_processor(tmp_path):
    """No add_bos_token in tokenizer_config.json, a TemplateProcessing that prepends <|im_start|>:
    the import records add_bos_token and raw prompts get the BOS."""
    from tokenizers import processors

    from colm_runtime.importers.hf import tokenizer_files
    from tests.importers._llama import make_hf_llama

    hf_dir = make_hf_llama(tmp_path / "hf")
    tok = chatml_tokenizer()
    bos = tok.token_to_id("<|im_start|>")
    tok.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    tok.save(str(hf_dir / "tokenizer.json"))
    tcfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    tcfg.pop("add_bos_token", None)
    tcfg.pop("bos_token", None)
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(tcfg))
    _, out, _, _ = tokenizer_files(hf_dir)
    assert out["add_bos_token"] is True and out["bos_token"] == "<|im_start|>"


def test_save_model_keeps_the_side_files(tmp_path, plain_model_dir):
    """save_model with a source's tokenizer.json (what `colm expand` does) brings the eos ids along."""
    from colm_runtime.checkpoint import load_model, save_model

    src = shutil.copytree(plain_model_dir, tmp_path / "src")
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [0]}))
    out = save_model(load_model(src), tmp_path / "out", src / "tokenizer.json")
    assert (out / "generation_config.json").read_text() == (src / "generation_config.json").read_text()
