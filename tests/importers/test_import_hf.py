"""`colm import hf`: a random transformers LlamaForCausalLM, imported, computes transformers' logits
(prefill and paged decode steps, fp32, 1e-4) and greedy tokens; refusals name what is unsupported;
failed imports leave nothing behind; `colm export hf` gives transformers the same model back."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import torch
import transformers

from colm_runtime.checkpoint import load_config
from colm_runtime.importers.export import export_hf
from colm_runtime.importers.hf import import_hf
from colm_runtime.importers.llama import ImportRefused, atomic_dir
from colm_runtime.tokenizer import Tokenizer
from tests.importers._llama import (PROMPTS, assert_same_logits, colm_greedy, hf_greedy, hf_load, hf_logits,
                                    make_hf_llama)
from tests.server.conftest import COLM

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def llama3_overrides() -> dict:
    if int(transformers.__version__.split(".")[0]) >= 5:
        return {"rope_parameters": {**LLAMA3, "rope_theta": 10000.0}}
    return {"rope_scaling": LLAMA3}


VARIANTS = {
    "gqa-tied": {},
    "mha-untied": {"num_key_value_heads": 4, "tie_word_embeddings": False},
    "llama3-rope": llama3_overrides(),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def imported(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf_dir = make_hf_llama(d / "hf", **VARIANTS[request.param])
    return hf_dir, import_hf(hf_dir, d / "colm", dtype="float32")


def ids_of(hf_dir, text: str) -> list[int]:
    return Tokenizer.from_model_dir(hf_dir).encode(text)


def test_logits_match_transformers(imported):
    hf_dir, colm_dir = imported
    cfg = load_config(colm_dir)
    assert cfg.chains == (4,) and cfg.n_chains == 1
    # long enough that Llama-3's scaled low frequencies matter (original context 64)
    text = " ".join(PROMPTS) * 6
    ids = ids_of(hf_dir, text)[:120]
    assert len(ids) > 80
    assert_same_logits(colm_dir, hf_load(hf_dir), ids)


def test_greedy_generations_match(imported):
    hf_dir, colm_dir = imported
    prompts = [ids_of(hf_dir, p) for p in PROMPTS]
    assert colm_greedy(colm_dir, prompts, 16) == hf_greedy(hf_load(hf_dir), prompts, 16)


def test_tokenizer_eos_and_template_carried_over(imported):
    hf_dir, colm_dir = imported
    tok = Tokenizer.from_model_dir(colm_dir)
    assert tok.eos_token_ids == (tok.hf.token_to_id("<|im_end|>"), tok.hf.token_to_id("<|endoftext|>"))
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>" and not tok.add_bos
    assert "<|im_start|>" in json.loads((colm_dir / "tokenizer_config.json").read_text())["chat_template"]
    text = "Numbers 2024 and émoji ✓ <|im_end|>"
    assert tok.encode(text) == Tokenizer.from_model_dir(hf_dir).encode(text)


def test_engine_stops_at_any_eos_id(imported, tmp_path):
    """generation_config's eos ids are a list; the engine ends a completion at any of them."""
    import shutil

    from colm_runtime.engine.config import EngineConfig
    from colm_runtime.engine.llm_engine import LLMEngine
    from colm_runtime.engine.types import EngineRequest, SamplingParams

    _, colm_dir = imported
    prompt = ids_of(colm_dir, PROMPTS[0])
    free = colm_greedy(colm_dir, [prompt], 8)[0]
    k = next(i for i in range(1, 8) if free[i] not in free[:i])  # a token not generated before
    d = shutil.copytree(colm_dir, tmp_path / "m")
    unused = next(t for t in range(1, 100) if t not in free)  # the primary eos never comes up here
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [unused, free[k]]}))
    engine = LLMEngine.from_model_dir(d, EngineConfig(kv_cache_memory=1 << 23, block_size=4, dtype="float32"))
    out = engine.generate([EngineRequest("r", prompt, SamplingParams(max_tokens=8, temperature=0.0), 1)])["r"][0]
    assert out.token_ids == free[: k + 1] and out.finish_reason == "stop"


def test_export_round_trip(imported, tmp_path):
    """import hf -> export hf: transformers loads the export and computes the original's logits."""
    hf_dir, colm_dir = imported
    out = export_hf(colm_dir, tmp_path / "export")
    ids = ids_of(hf_dir, PROMPTS[1])
    torch.testing.assert_close(hf_logits(hf_load(out), ids), hf_logits(hf_load(hf_dir), ids), rtol=0, atol=1e-5)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == list(Tokenizer.from_model_dir(colm_dir).eos_token_ids)


def test_export_refuses_multi_chain(plain_model_dir, tmp_path):
    with pytest.raises(ImportRefused, match="4 chains: only a one-chain model"):
        export_hf(plain_model_dir, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _edit_config(hf_dir, **changes) -> None:
    c = json.loads((hf_dir / "config.json").read_text())
    c.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(c))


@pytest.mark.parametrize("change, named", [
    ({"attention_bias": True}, "attention_bias = True: biases on q/k/v/o"),
    ({"mlp_bias": True}, "mlp_bias = True: biases in the MLP"),
    ({"sliding_window": 4096}, "sliding_window = 4096: sliding-window attention"),
    ({"num_local_experts": 8}, "num_local_experts = 8: mixture of experts"),
    ({"model_type": "mistral"}, "model_type 'mistral' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn' is not supported"),
    ({"head_dim": 32}, "head_dim 32 x 4 heads != hidden size 64"),
])
def test_refused_variants_name_the_field(tmp_path, change, named):
    hf_dir = make_hf_llama(tmp_path / "hf")
    _edit_config(hf_dir, **change)
    with pytest.raises(ImportRefused, match=re.escape(named)) as e:
        import_hf(hf_dir, tmp_path / "out")
    assert "config.json" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # nothing at OUT, no temporary left


def test_bias_tensor_refused_by_name(tmp_path):
    """A bias the config does not announce is still refused, by tensor name."""
    hf_dir = make_hf_llama(tmp_path / "hf", attention_bias=True)  # the directory holds q/k/v/o biases
    _edit_config(hf_dir, attention_bias=False)
    with pytest.raises(ImportRefused, match=r"unsupported tensor\(s\) \['model.layers.0.self_attn.k_proj.bias'"):
        import_hf(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_failure_is_atomic_and_names_the_file(tmp_path):
    """A corrupt weight file: non-zero exit, the message names it, nothing at OUT, no temporary left."""
    hf_dir = make_hf_llama(tmp_path / "hf")
    weights = hf_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (tmp_path / "models").mkdir()
    out = tmp_path / "models" / "imported"
    r = subprocess.run([*COLM, "import", "hf", str(hf_dir), str(out)], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "model.safetensors" in r.stderr and "colm import: error:" in r.stderr
    assert list((tmp_path / "models").iterdir()) == []


def test_atomic_dir_removes_its_temporary_on_failure(tmp_path):
    """A failure while writing (after the temporary directory exists) leaves nothing behind."""
    with pytest.raises(OSError, match="disk full"):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "config.json").write_text("{}")
            raise OSError("disk full")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "config.json").is_file()


def test_cli_refuses_existing_out(tmp_path, imported):
    hf_dir, _ = imported
    (tmp_path / "out").mkdir()
    r = subprocess.run([*COLM, "import", "hf", str(hf_dir), str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2 and "already exists" in r.stderr


def test_cli_export_hf_beside_export_checkpoint(tmp_path, imported, plain_model_dir):
    """`colm export hf` and `colm export checkpoint` share one command; a multi-chain model is refused."""
    _, colm_dir = imported
    r = subprocess.run([*COLM, "export", "hf", str(colm_dir), str(tmp_path / "hf")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "model.safetensors").is_file()
    r = subprocess.run([*COLM, "export", "hf", str(plain_model_dir), str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode == 2 and "only a one-chain model" in r.stderr and not (tmp_path / "x").exists()
