"""`colm eval`: perplexity and decode speed per chain count, as JSON."""

from __future__ import annotations

import json
import math

from colm_runtime.testing import make_model_dir, small_config

from .conftest import colm


def test_eval_json_has_the_keys(corpus, tmp_path, capsys):
    d = make_model_dir(tmp_path / "m", small_config(chains=(2, 2, 2), kv_sharing=True))
    assert colm("eval", "--model", d, "--data", corpus, "--json", "--max-tokens", "2048",
                "--decode-tokens", "4", "--seq-len", "64") == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["perplexity"]) == set(res["tokens_per_second"]) == {"1", "2", "3"}
    assert all(math.isfinite(v) and v > 1 for v in res["perplexity"].values())
    assert all(v > 0 for v in res["tokens_per_second"].values())


def test_eval_errors_name_the_problem(tmp_path, capsys):
    assert colm("eval", "--model", tmp_path / "none") == 2
    assert "model directory not found" in capsys.readouterr().err
    d = make_model_dir(tmp_path / "m", small_config())
    assert colm("eval", "--model", d, "--data", tmp_path / "nope.txt") == 2
    assert "nope.txt: no such file or directory" in capsys.readouterr().err
