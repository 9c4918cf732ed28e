"""`colm bench prefix`: automatic prefix caching on a chat workload, cached against uncached.

Every request is one shared system prompt (--system-len tokens, default 1,024; clipped so that prompt +
output fit the model's context, reported as system_len) plus its own short question, at mixed chain
counts (request i at 1 + i mod n chains), greedy, EOS ignored, answers of --output-len tokens give or
take --output-spread (uniform, seeded: chat answers vary, so arrivals in the closed loop spread out;
0 makes every answer equal, so that requests start and finish in bursts of --concurrency). A closed
loop keeps --concurrency requests in flight on one LLMEngine. Two engines differ only in enable_prefix_caching.
Each run starts from an empty cache and first serves one warm-up request with the system prompt at
n chains ("the server has seen this system prompt before"), outside the figures; the timed runs of the
two engines are interleaved round by round (the order alternating), and the figures come from each
side's fastest round (other processes only ever add time). Reports:
  ttft_p50_s         median time to first token (arrival -> first token), per side
  ttft_ratio         uncached / cached TTFT p50 (goal >= 5)
  tokens_per_s       generated tokens / wall seconds, per side; throughput_ratio cached / uncached (goal >= 2)
  hit_rate           per chain pool: prompt tokens found cached / prompt tokens looked up (timed runs;
                     pool p is looked up by requests at more than p chains; CoLM-Air has one pool)
  outputs_identical  every request's tokens equal with and without caching
  ratio_per_round    (ttft_ratio, throughput_ratio) of each round: how much the machine's load swung
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import time

import torch

from colm_runtime.bench import add_run_arguments
from colm_runtime.bench.engine import _tokenizer
from colm_runtime.bench.speculative import PROMPTS, load
from colm_runtime.engine.config import EngineConfig
from colm_runtime.engine.llm_engine import LLMEngine
from colm_runtime.engine.types import EngineRequest, SamplingParams

SYSTEM = ("You are a careful assistant for Python programmers. Answer with short, correct explanations and "
          "small examples. Prefer the standard library; name the module and the function you use; say which "
          "Python version introduced a feature when it matters. ")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory (default: models/colm-tiny)")
    p.add_argument("--system-len", type=int, default=1024, help="shared system prompt tokens")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (closed loop)")
    p.add_argument("--output-len", type=int, default=32, help="mean answer tokens")
    p.add_argument("--output-spread", type=float, default=0.5, help="answers of output-len x [1 - s, 1 + s]")
    p.add_argument("--rounds", type=int, default=3)
    add_run_arguments(p)


def workload(tok, n_chains: int, model_len: int, args) -> tuple[list[int], list[tuple[list[int], int, int]]]:
    """The warm-up prompt and the (prompt, chains, answer tokens) of each request."""
    questions = [tok.encode(f"\nQuestion {i}: {PROMPTS[i % len(PROMPTS)]}") for i in range(args.requests)]
    rng = random.Random(0)
    lengths = [max(1, round(args.output_len * (1 + args.output_spread * (2 * rng.random() - 1))))
               for _ in questions]
    room = model_len - max(lengths) - max(map(len, questions))
    text = SYSTEM
    while len(tok.encode(text)) < min(args.system_len, room):
        text += SYSTEM
    system = tok.encode(text)[: min(args.system_len, room)]
    return system + tok.encode("\nHello."), [(system + q, 1 + i % n_chains, m)
                                             for i, (q, m) in enumerate(zip(questions, lengths))]


def serve(engine: LLMEngine, warm: list[int], reqs: list[tuple[list[int], int, int]], args, tag: str) -> dict:
    """One run: empty cache, the warm-up request, then every request through a closed loop. Returns the
    TTFTs, the wall seconds, the outputs and the prefix-cache counters of the timed part."""
    engine.blocks.evict_all()
    n = engine.cfg.n_chains
    params = lambda m: SamplingParams(max_tokens=m, temperature=0, ignore_eos=True)  # noqa: E731
    engine.generate([EngineRequest(f"{tag}-warm", warm, params(args.output_len), n)])
    q0, h0 = list(engine.blocks.cache_stats.queries), list(engine.blocks.cache_stats.hits)
    pending = list(enumerate(reqs))
    tokens: dict[int, list[int]] = {i: [] for i in range(len(reqs))}
    ttft: dict[int, float] = {}
    live = 0
    t0 = time.perf_counter()
    while pending or engine.has_unfinished:
        while pending and live < args.concurrency:
            i, (prompt, chains, m) = pending.pop(0)
            engine.add_request(EngineRequest(f"{tag}-{i}", prompt, params(m), chains, arrival_time=time.monotonic()))
            live += 1
        for o in engine.step():
            i = int(o.request_id.rsplit("-", 1)[1])
            tokens[i].extend(o.token_ids)
            if o.first_token_time is not None:
                ttft.setdefault(i, o.first_token_time)
            live -= o.finished
    wall = time.perf_counter() - t0
    stats = engine.blocks.cache_stats
    return {"ttft": list(ttft.values()), "wall": wall, "tokens": tokens,
            "queries": [q - a for q, a in zip(stats.queries, q0)], "hits": [h - a for h, a in zip(stats.hits, h0)]}


def run(args: argparse.Namespace) -> int:
    from colm_runtime.cli import CLIError
    from colm_runtime.paths import MODELS_DIR

    if args.threads:
        torch.set_num_threads(args.threads)
    if min(args.requests, args.concurrency, args.rounds, args.system_len) < 1 or args.output_len < 2 \
            or not 0 <= args.output_spread < 1:
        raise CLIError("--requests, --concurrency, --rounds, --system-len >= 1, --output-len >= 2 and "
                       "0 <= --output-spread < 1 are required")
    path = args.model or str(MODELS_DIR / "colm-tiny")
    model, source = load(path, args)
    tok = _tokenizer(path, model.cfg.vocab_size)
    config = EngineConfig(block_size=16, max_num_seqs=args.concurrency, device=args.device, seed=0)
    engines = {on: LLMEngine(model, tok, dataclasses.replace(config, enable_prefix_caching=on)) for on in (False, True)}
    warm, reqs = workload(tok, model.cfg.n_chains, engines[True].model_len, args)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for r in range(args.rounds):
        for on in ((False, True) if r % 2 == 0 else (True, False)):
            runs[on].append(serve(engines[on], warm, reqs, args, f"{'c' if on else 'u'}{r}"))
            sync()
    print(json.dumps(report(runs, source, len(warm) - len(tok.encode("\nHello.")), args),
                     indent=None if args.json else 2))
    return 0


def report(runs: dict[bool, list[dict]], source: str, system_len: int, args) -> dict:
    """The figures of the module docstring, from each side's fastest round."""
    best = {on: min(rs, key=lambda x: x["wall"]) for on, rs in runs.items()}
    p50 = {on: statistics.median(b["ttft"]) for on, b in best.items()}
    gen = sum(map(len, runs[False][0]["tokens"].values()))
    tps = {on: gen / b["wall"] for on, b in best.items()}
    c = best[True]
    per_round = [(round(statistics.median(u["ttft"]) / statistics.median(k["ttft"]), 2), round(u["wall"] / k["wall"], 2))
                 for u, k in zip(runs[False], runs[True])]
    return {"model": source, "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
            "system_len": system_len, "requests": args.requests, "concurrency": args.concurrency,
            "output_len": args.output_len, "output_spread": args.output_spread, "rounds": args.rounds,
            "ttft_p50_s": {"uncached": round(p50[False], 4), "cached": round(p50[True], 4)},
            "ttft_ratio": round(p50[False] / p50[True], 2),
            "tokens_per_s": {"uncached": round(tps[False], 1), "cached": round(tps[True], 1)},
            "throughput_ratio": round(tps[True] / tps[False], 2),
            "hit_rate": {str(p + 1): round(h / q, 3) for p, (q, h) in enumerate(zip(c["queries"], c["hits"])) if q},
            "outputs_identical": all(r["tokens"] == runs[False][0]["tokens"] for r in runs[False] + runs[True]),
            "ratio_per_round": per_round}
