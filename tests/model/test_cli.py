"""`colm generate` and `colm extract` from the command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from colm_runtime.cli import main


def colm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "colm_runtime.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_generate_greedy_is_deterministic_and_sampling_is_seeded(plain_model_dir):
    a = colm("generate", "--model", str(plain_model_dir), "--chains", "2", "--max-tokens", "8", "Return the")
    b = colm("generate", "--model", str(plain_model_dir), "--chains", "2", "--max-tokens", "8", "Return the")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("Return the")
    s = ["generate", "--model", str(plain_model_dir), "--temperature", "1", "--top-p", "0.9", "--max-tokens", "8"]
    assert colm(*s, "--seed", "1", "x").stdout == colm(*s, "--seed", "1", "x").stdout


@pytest.mark.parametrize("chains", ["0", "5"])
def test_generate_rejects_chain_count_out_of_range(plain_model_dir, chains, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(plain_model_dir), "--chains", chains, "hi"])
    assert e.value.code == 2
    assert "--chains must be in 1..4" in capsys.readouterr().err


def test_extract_and_generate_report_a_missing_model(tmp_path, capsys):
    for argv in (["generate", "--model", str(tmp_path / "none"), "hi"],
                 ["extract", "--model", str(tmp_path / "none"), "--chains", "1", str(tmp_path / "o")]):
        with pytest.raises(SystemExit):
            main(argv)
        assert "model directory not found" in capsys.readouterr().err
