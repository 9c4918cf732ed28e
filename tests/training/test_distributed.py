"""DDP under torchrun with no code change: two CPU processes (gloo) train like one process with the
same global batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from colm_runtime.checkpoint import load_model

from .conftest import TINY_MODEL, train_tiny


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
def test_two_process_ddp_matches_one_process(corpus, tmp_path):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    common = ["--steps", "3", "--save-every", "3"]
    ddp = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "colm_runtime.cli", "train",
           "--data", str(corpus), "--out", str(tmp_path / "ddp"), *TINY_MODEL, *common, "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(ddp, capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    # one process reading the same 4 windows per step (2 ranks x 2 = 1 x 4)
    assert train_tiny(corpus, tmp_path / "one", *common, "--batch-size", "4") == 0
    a, b = load_model(tmp_path / "ddp").state_dict(), load_model(tmp_path / "one").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
