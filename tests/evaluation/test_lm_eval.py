"""The real harness: lm-evaluation-harness (`local-completions`) against a live `colm serve`, on the
project's local tasks (evaluation/tasks: multiple choice, rolling perplexity, generation), at every
chain count; the rolling perplexity equals `colm eval --rolling`'s on the same text."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from colm_runtime.paths import default_model_dir
from tests.server.conftest import COLM, REPO, ServerProcess

if not os.environ.get("CI"):  # CI installs the eval extra and must run this; locally it may be absent
    pytest.importorskip("lm_eval", reason="needs the eval extra: pip install -e '.[eval]'")
    pytest.importorskip("transformers", reason="needs the eval extra: pip install -e '.[eval]'")

PPL_DATA = REPO / "evaluation" / "tasks" / "colm_python_ppl.jsonl"


@pytest.fixture(scope="module")
def shipped_model():
    d = default_model_dir()
    if not (d / "model.safetensors").is_file():
        pytest.skip("the shipped model directory is not in this checkout")
    return d


def offline_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLM_")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TOKENIZERS_PARALLELISM="false")
    return env


def test_lm_eval_at_every_chain_count_matches_colm_eval(tmp_path, shipped_model):
    # fp32 whatever --dtype auto picks here: the perplexities are compared with colm eval's fp32 ones.
    server = ServerProcess(shipped_model, tmp_path / "server.log", ("--dtype", "float32")).wait_ready()
    out = tmp_path / "results.json"
    try:
        run = subprocess.run([sys.executable, "evaluation/lm_eval_chains.py", "--base-url", server.url,
                              "--tokenizer", str(shipped_model), "--tasks", "colm_python", "--json", str(out)],
                             cwd=REPO, env=offline_env(tmp_path), capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-5000:] + server.log()
    finally:
        server.stop()
    results = json.loads(out.read_text())
    chains = json.loads((shipped_model / "config.json").read_text())["chains"]
    assert sorted(r["chains"] for r in results.values()) == list(range(1, len(chains) + 1))
    (max_length,) = {r["max_length"] for r in results.values()}  # lm-eval's windows: the server's context - 1
    ref = subprocess.run([*COLM, "eval", "--rolling", "--json", "--model", str(shipped_model), "--data", str(PPL_DATA),
                          "--max-length", str(max_length)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr
    colm_eval = json.loads(ref.stdout)["chains"]
    for mid, r in results.items():
        got, want = r["results"], colm_eval[str(r["chains"])]
        for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
            value = got["colm_python_ppl"][f"{metric},none"]
            assert abs(value - want[metric]) <= 1e-3 * want[metric], (mid, metric, value, want[metric])
        assert 0 <= got["colm_python_mc"]["acc,none"] <= 1 and 0 <= got["colm_python_mc"]["acc_norm,none"] <= 1
        assert 0 <= got["colm_python_gen"]["exact_match,strip"] <= 1


def test_colm_eval_rolling_windows_are_lm_evals():
    """`colm eval --rolling` cuts documents exactly as lm-eval's loglikelihood_rolling does (its own
    get_rolling_token_windows + make_disjoint_window), long documents and short windows included."""
    import random

    from lm_eval import utils

    from colm_runtime.training.evaluate import rolling_windows

    rng = random.Random(0)
    for _ in range(300):
        tokens, max_len = list(range(100, 100 + rng.randint(1, 60))), rng.randint(1, 20)
        theirs = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
            token_list=tokens, prefix_token=7, max_seq_len=max_len, context_len=1)]
        mine = rolling_windows(tokens, 7, max_len)
        assert [(c + t, len(t)) for c, t in theirs] == [(ids, n) for ids, n in mine]
