"""The short soak in CI: loadtests/soak_mixed.py (mixed good, cancelled and bad traffic) for
SOAK_S seconds against a fresh server; the long run is `python -m loadtests.soak_mixed --duration 600`."""

from __future__ import annotations

import asyncio
import json

from loadtests.probe import discover
from loadtests.soak_mixed import SoakConfig, run_soak
from tests.reliability.conftest import start

SOAK_S = 25.0


def test_short_soak(tmp_path_factory, model_dir):
    server = start(tmp_path_factory, model_dir, "soak")
    try:
        cfg = SoakConfig(duration_s=SOAK_S, users=4, max_tokens=32, seed=1)
        report = asyncio.run(run_soak(discover(server.url), cfg, server.proc.pid))
    finally:
        server.stop()
    print("soak:", json.dumps({k: report[k] for k in ("counts", "server_5xx", "rss_mib", "checks")}))
    c = report["counts"]
    assert c["good"] > 10 and c["cancelled"] > 0 and c["bad"] > 0, c
    assert report["checks"] == {k: True for k in report["checks"]}, report
