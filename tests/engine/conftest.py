"""Engine tests run torch on one thread: their tensors are tiny, and on a shared 2-core machine
OpenMP's spin-waiting makes two threads many times slower than one."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
