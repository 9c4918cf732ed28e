"""FSDP2 under torchrun on CPU (gloo, 2 processes): the sharded run trains like one process with the
same global batch (loss curve to 1e-5, fp32), resumes bitwise, exports the same model it trained, and
keeps frozen chains bit-identical."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from colm_runtime.checkpoint import load_model

from .conftest import TINY_MODEL, colm, train_tiny

TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
needs_torchrun = pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")


def fsdp_train(corpus: Path, out: Path, *extra: str, resume: bool = False) -> None:
    """`colm train --parallel fsdp` in 2 CPU processes (per-rank batch 2)."""
    args = ["--out", str(out), "--resume", "--no-progress"] if resume else [
        "--data", str(corpus), "--out", str(out), *TINY_MODEL, "--batch-size", "2", "--parallel", "fsdp", *extra]
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "colm_runtime.cli", "train", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def train_losses(out: Path) -> list[list[float]]:
    return [json.loads(line)["train_loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def assert_same_model(a: Path, b: Path, exact: bool = False) -> None:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        if exact:
            assert torch.equal(x[k], y[k]), k
        else:
            torch.testing.assert_close(x[k], y[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
@needs_torchrun
def test_fsdp_matches_one_process_and_resumes_exactly(corpus, tmp_path, capsys):
    """20 steps, multi-chain loss (scales 1 and 2), 2 accumulation micro-steps: the loss of every
    step and every scale equals one process's to 1e-5; the exported model equals its weights; a run
    stopped at step 10 and resumed ends bitwise where the uninterrupted run did."""
    common = ["--steps", "20", "--eval-every", "1", "--save-every", "5", "--grad-accum", "2", "--lr", "5e-3"]
    fsdp_train(corpus, tmp_path / "fsdp", *common)
    assert train_tiny(corpus, tmp_path / "one", *common, "--batch-size", "4") == 0
    sharded, one = train_losses(tmp_path / "fsdp"), train_losses(tmp_path / "one")
    assert len(sharded) == len(one) == 20 and len(one[0]) == 2
    torch.testing.assert_close(torch.tensor(sharded), torch.tensor(one), rtol=0, atol=1e-5)
    assert one[-1][-1] < one[0][-1] - 0.5  # it learned something: the curve is not flat
    assert_same_model(tmp_path / "fsdp", tmp_path / "one")
    load_model(tmp_path / "fsdp")  # the model directory is a servable checkpoint
    shards = sorted(p.name for p in (tmp_path / "fsdp" / "checkpoint" / "dcp").iterdir())
    assert len(shards) == 2 and all(n.endswith(".safetensors") for n in shards)  # one per rank, no pickle

    fsdp_train(corpus, tmp_path / "parts", *common, "--stop-at", "10")
    assert json.loads((tmp_path / "parts/checkpoint/state.json").read_text())["progress"]["step"] == 10
    fsdp_train(corpus, tmp_path / "parts", resume=True)
    assert_same_model(tmp_path / "fsdp", tmp_path / "parts", exact=True)
    assert train_losses(tmp_path / "parts") == sharded

    # `colm export checkpoint` in one process, without a process group, gives the same file.
    assert colm("export", "checkpoint", tmp_path / "fsdp", tmp_path / "exported") == 0
    assert_same_model(tmp_path / "fsdp", tmp_path / "exported", exact=True)
    assert (tmp_path / "exported" / "tokenizer.json").read_text() == (tmp_path / "fsdp" / "tokenizer.json").read_text()
    # A checkpoint missing one rank's shard is a clear error, not a traceback or a half-filled model.
    shutil.copytree(tmp_path / "fsdp" / "checkpoint", tmp_path / "partial")
    next((tmp_path / "partial" / "dcp").glob("shard-00002*")).unlink()
    assert colm("export", "checkpoint", tmp_path / "partial", tmp_path / "bad") == 2
    assert not (tmp_path / "bad").exists() and "unreadable sharded checkpoint" in capsys.readouterr().err


@pytest.mark.slow
@needs_torchrun
def test_fsdp_grows_an_expanded_model_with_frozen_chains(corpus, tmp_path):
    """Progressive scaling under FSDP: `colm expand` adds a third chain (untied head), then --init +
    --freeze-chains 2 + --loss-scales 3 trains it. Chains 1-2 stay bitwise the old model's (their
    columns of the shared norm weights lie on both ranks' shards), and the run equals one process's.
    The sharded run also recomputes its blocks' activations (--activation-checkpointing), which must
    not change a thing."""
    assert train_tiny(corpus, tmp_path / "base", "--steps", "2") == 0
    assert colm("expand", "--model", tmp_path / "base", "--add-chain", "2", tmp_path / "expanded") == 0
    common = ["--init", str(tmp_path / "expanded"), "--freeze-chains", "2", "--loss-scales", "3", "--steps", "4",
              "--eval-every", "1"]
    fsdp_train(corpus, tmp_path / "fsdp", *common, "--activation-checkpointing")
    assert train_tiny(corpus, tmp_path / "one", *common, "--batch-size", "4") == 0
    torch.testing.assert_close(torch.tensor(train_losses(tmp_path / "fsdp")),
                               torch.tensor(train_losses(tmp_path / "one")), rtol=0, atol=1e-5)
    assert_same_model(tmp_path / "fsdp", tmp_path / "one")
    old, grown = load_model(tmp_path / "expanded"), load_model(tmp_path / "fsdp")
    assert grown.cfg.n_chains == 3 and not grown.cfg.tie_word_embeddings
    width = old.cfg.width(2)
    changed = False
    for (name, a), b in zip(old.state_dict().items(), grown.state_dict().values()):
        if ".chains.0." in name or ".chains.1." in name:
            assert torch.equal(a, b), name
        elif ".chains." not in name:
            assert torch.equal(a[..., :width], b[..., :width]), name
        changed |= not torch.equal(a, b)
    assert changed


def test_fsdp_needs_torchrun_and_export_needs_a_sharded_checkpoint(corpus, tmp_path, capsys, monkeypatch):
    for var in ("MASTER_ADDR", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    assert train_tiny(corpus, tmp_path / "m", "--steps", "1", "--parallel", "fsdp") == 2
    assert "--parallel fsdp runs under torchrun" in capsys.readouterr().err
    assert train_tiny(corpus, tmp_path / "plain", "--steps", "1") == 0
    assert colm("export", "checkpoint", tmp_path / "plain", tmp_path / "out") == 2
    assert "not a sharded (FSDP) training checkpoint" in capsys.readouterr().err


def test_activation_checkpointing_changes_nothing_but_memory(corpus, tmp_path):
    """One process: recomputing the blocks in backward gives bitwise the same weights."""
    args = ("--steps", "3", "--layers", "2")
    assert train_tiny(corpus, tmp_path / "plain", *args) == 0
    assert train_tiny(corpus, tmp_path / "ckpt", *args, "--activation-checkpointing") == 0
    assert_same_model(tmp_path / "plain", tmp_path / "ckpt", exact=True)
