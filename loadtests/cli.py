"""`python -m loadtests --url URL --scenario NAME --out DIR`: run a scenario, write the summaries.

Exit status: 0 when every check passed, 1 when one failed, 2 for a usage or target problem.
Performance goals (overload) are reported in the summaries, not turned into an exit status: on a
shared CPU they measure the machine as much as the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

from loadtests.probe import TargetError, check_loopback, discover, server_pid
from loadtests.report import write_markdown, write_plots, write_records
from loadtests.scenarios import SCENARIOS, RunOptions
from loadtests.spec import Distribution, SpecError, parse_mix
from loadtests.stats import SLO, combine

SCHEMA = "colm-loadtest/1"


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command line of `python -m loadtests`."""
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (loopback unless --allow-remote)")
    p.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    p.add_argument("--out", type=Path, required=True, help="directory for summary.json, summary.md, plots")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback target (one you own)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API "
                   "key to send, if set (default OPENAI_API_KEY); keys never go on the command line")
    p.add_argument("--model", default=None, help="base model id (default: the first base model served)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--prompt-format", choices=["tokens", "text"], default="tokens",
                   help="token-id prompts (exact lengths) or text")
    p.add_argument("--prompt-tokens", type=Distribution.parse, default=None,
                   help="64 | uniform:32:128 | normal:64:16 (default uniform:32:96; quick 16..48)")
    p.add_argument("--output-tokens", type=Distribution.parse, default=None,
                   help="max_tokens per request, with ignore_eos (default 32; quick 16)")
    p.add_argument("--mix", type=parse_mix, default=None, help="chain selections with weights, e.g. "
                   "'default@2,model=c1,chains=2,tier=economy,budget=1500' (default: the scenario's)")
    p.add_argument("--rate", type=float, default=None, help="requests/s (default: from calibration)")
    p.add_argument("--capacity", type=float, default=None, help="full-chain capacity in requests/s "
                   "(skips calibration)")
    p.add_argument("--load-factors", type=_floats, default=(2.0,), help="overload: multiples of capacity, "
                   "e.g. 0.5,1,2 (default 2)")
    p.add_argument("--budget-ms", type=float, default=None, help="latency budget (default: 2x calibrated p50)")
    p.add_argument("--duration", type=float, default=None, help="seconds of sending per phase")
    p.add_argument("--max-requests", type=int, default=None, help="requests per phase at most (default "
                   "5000; soak: enough for its duration)")
    p.add_argument("--cancel-share", type=float, default=0.3, help="cancel: share of clients that disconnect")
    p.add_argument("--calib-users", type=int, default=64, help="closed-loop clients of the calibration "
                   "(default 64: the server's default --max-num-seqs)")
    p.add_argument("--calib-duration", type=float, default=15.0)
    p.add_argument("--drain-timeout", type=float, default=120.0, help="seconds to let a phase's requests finish")
    p.add_argument("--rss-bound-mib", type=float, default=64.0, help="soak: allowed server RSS growth")
    p.add_argument("--server-pid", type=int, default=None, help="soak: server pid (default: the local "
                   "process listening on the URL's port)")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: TTFT target as well")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: TPOT target as well")
    p.add_argument("--seed", type=int, default=0)


def options(args: argparse.Namespace) -> RunOptions:
    """RunOptions from the parsed command line."""
    return RunOptions(prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens, seed=args.seed,
                      endpoint=args.endpoint, prompt_format=args.prompt_format, duration_s=args.duration,
                      rate=args.rate, capacity_rps=args.capacity, max_requests=args.max_requests,
                      load_factors=args.load_factors, budget_ms=args.budget_ms, mix=args.mix,
                      cancel_share=args.cancel_share, calib_users=args.calib_users,
                      calib_duration_s=args.calib_duration, drain_timeout_s=args.drain_timeout,
                      rss_bound_mib=args.rss_bound_mib, server_pid=args.server_pid,
                      slo=SLO(args.slo_ttft_ms, args.slo_tpot_ms))


def build_summary(scenario: str, target, opts: RunOptions, result, started_at: str, load_before) -> dict:
    """summary.json: run totals (over every phase), then each phase, calibration, comparison, checks."""
    opts_dict = asdict(opts) | {"prompt_tokens": opts.prompt_tokens and str(opts.prompt_tokens),
                                "output_tokens": opts.output_tokens and str(opts.output_tokens), "mix": [s.label for s in opts.mix] if opts.mix else None}
    return {"schema": SCHEMA, "scenario": scenario, "started_at": started_at,
            "target": {"url": target.url, "model": target.model, "n_chains": target.n_chains},
            "conditions": {"cpus": os.cpu_count(), "loadavg_before": load_before,
                           "loadavg_after": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version()},
            "options": opts_dict, **combine(result.phases, result.summaries),
            "phases": result.summaries, "calibration": result.calibration, "comparison": result.comparison,
            "server": result.server, "checks": result.checks,
            "passed": all(c["passed"] for c in result.checks.values())}


def run(args: argparse.Namespace) -> int:
    """Check the target, run the scenario, write summary.json, summary.md and the plots; exit status."""
    try:
        url = check_loopback(args.url, args.allow_remote)
        target = discover(url, args.model, os.environ.get(args.api_key_env) or None)
        opts = options(args)
    except (TargetError, SpecError) as e:
        print(f"loadtests: {e}", file=sys.stderr)
        return 2
    if args.scenario == "soak":
        opts = replace(opts, server_pid=server_pid(url, args.server_pid))
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.monotonic()
    result = asyncio.run(SCENARIOS[args.scenario](target, opts))
    summary = build_summary(args.scenario, target, opts, result, started_at, load_before)
    summary["wall_s"] = round(time.monotonic() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    summary["plots"] = write_plots(summary, args.out)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_markdown(summary, args.out / "summary.md")
    write_records(result.phases, args.out / "records.jsonl")
    print(json.dumps({k: summary[k] for k in ("scenario", "requests", "errors", "throughput_tokens_per_s",
                                              "goodput_requests_per_s", "passed", "wall_s")}))
    for name, c in summary["checks"].items():
        print(f"check {name}: {'passed' if c['passed'] else 'FAILED'}")
    return 0 if summary["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m loadtests`."""
    parser = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
