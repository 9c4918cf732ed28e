"""`colm bench structured`: the cost of structured outputs, --requests concurrent json_schema requests
against the same number of unconstrained ones, on one engine, timed side by side (interleaved rounds,
a warm-up run of each first).

The schema (a list of records, minItems large enough) makes every constrained answer longer than
--output-len, so both scenarios generate exactly requests x output_len tokens and the ratio compares
per-token cost: the grammar masks (llguidance, one row at a time on the CPU) plus applying them in the
sampler. The unconstrained requests run twice a round, before and after the constrained ones. Reports
tokens/s of each (fastest round: on a shared machine other processes only ever add time), ratio =
constrained / the faster unconstrained figure (goal >= 0.9), control_ratio = the two unconstrained
figures' ratio (1 up to noise and position in the round), the ratio within each round and its
median, which show how much the machine's load swung, the grammar's
compile time, the mean output lengths (equal when every answer runs to --output-len), and, measured
alone, the median milliseconds per step to fill and to apply the masks of --requests rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from colm_runtime.bench import add_run_arguments
from colm_runtime.bench.engine import _tokenizer
from colm_runtime.bench.model import time_side_by_side
from colm_runtime.bench.speculative import PROMPTS, load
from colm_runtime.engine.config import EngineConfig
from colm_runtime.engine.grammar import GrammarCompiler, GrammarSpec, canonical_json, fill_bitmask
from colm_runtime.engine.llm_engine import LLMEngine
from colm_runtime.engine.sampler import TokenMasks, constrain
from colm_runtime.engine.types import EngineRequest, SamplingParams

SCHEMA = {"type": "object", "properties": {"records": {"type": "array", "minItems": 12, "maxItems": 12, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                     "kind": {"enum": ["function", "class", "module"]},
                                     "line": {"type": "integer", "minimum": 1, "maximum": 9999}},
    "required": ["name", "kind", "line"], "additionalProperties": False}}},
    "required": ["records"], "additionalProperties": False}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory (default: models/colm-tiny)")
    p.add_argument("--requests", type=int, default=32, help="concurrent requests per scenario")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--chains", type=int, default=0, help="chain count (0: all)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--rounds", type=int, default=3)
    add_run_arguments(p)


def mask_costs(grammar, args) -> dict:
    """Median milliseconds per step to fill (grammar.fill_bitmask) and apply (sampler.constrain) the masks of
    --requests rows, driven through --output-len tokens sampled from random logits under the grammar."""
    gen = torch.Generator().manual_seed(0)
    matchers = [grammar.matcher() for _ in range(args.requests)]
    V, rows = grammar.vocab_size, list(range(args.requests))
    fill, apply = [], []
    for _ in range(args.output_len):
        logits = torch.randn(args.requests, V, generator=gen)
        t0 = time.perf_counter()
        bitmask = fill_bitmask(matchers, V)
        t1 = time.perf_counter()
        masked = constrain(logits, [()] * args.requests, TokenMasks(rows, bitmask))
        fill.append(t1 - t0)
        apply.append(time.perf_counter() - t1)
        for m, tok in zip(matchers, torch.multinomial(masked.softmax(-1), 1, generator=gen)[:, 0].tolist()):
            m.consume(tok)
    return {"mask_fill_ms_per_step": round(statistics.median(fill) * 1e3, 3),
            "mask_apply_ms_per_step": round(statistics.median(apply) * 1e3, 3)}


def run(args: argparse.Namespace) -> int:
    from colm_runtime.cli import CLIError
    from colm_runtime.paths import MODELS_DIR

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.requests < 1 or args.output_len < 2 or args.rounds < 1:
        raise CLIError("--requests >= 1, --output-len >= 2 and --rounds >= 1 are required")
    model, source = load(args.model or str(MODELS_DIR / "colm-tiny"), args)
    tok = _tokenizer(args.model or str(MODELS_DIR / "colm-tiny"), model.cfg.vocab_size)
    k = args.chains or model.cfg.n_chains
    engine = LLMEngine(model, tok, EngineConfig(block_size=16, max_num_seqs=args.requests, device=args.device,
                                                kv_cache_memory=256 << 20, seed=0))
    t0 = time.perf_counter()
    grammar = GrammarCompiler(tok, model.cfg.vocab_size).compile(GrammarSpec("json_schema", canonical_json(SCHEMA)))
    compile_s = time.perf_counter() - t0
    prompts = [tok.encode(PROMPTS[i % len(PROMPTS)]) for i in range(args.requests)]

    def requests(constrained: bool) -> list[EngineRequest]:
        return [EngineRequest(f"r{i}", p, SamplingParams(max_tokens=args.output_len, temperature=args.temperature,
                                                         seed=i, ignore_eos=not constrained), k,
                              grammar=grammar if constrained else None) for i, p in enumerate(prompts)]

    lengths: dict[str, list[int]] = {}

    def scenario(name: str, constrained: bool):
        def go() -> None:
            done = engine.generate(requests(constrained))
            lengths[name] = [len(c[0].token_ids) for c in done.values()]
        return go

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    # The free requests run twice per round, before and after the constrained ones: their two figures
    # show what the position in a round alone does (control), and the ratio uses the faster of them.
    fns = {"unconstrained": scenario("unconstrained", False), "json_schema": scenario("json_schema", True),
           "unconstrained_again": scenario("unconstrained_again", False)}
    rounds = time_side_by_side(fns, args.rounds, sync, stat=list, warmup=lambda: [fn() for fn in fns.values()])
    tps = {m: round(sum(lengths[m]) / min(s), 1) for m, s in rounds.items()}
    free = max(tps["unconstrained"], tps["unconstrained_again"])
    per_round = [(u + a) / (2 * c) for u, c, a in  # mean free seconds / constrained seconds
                 zip(rounds["unconstrained"], rounds["json_schema"], rounds["unconstrained_again"])]
    out = {"model": source, "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
           "requests": args.requests, "output_len": args.output_len, "chains": k, "temperature": args.temperature,
           "tokens_per_s": tps, "ratio": round(tps["json_schema"] / free, 3),
           "control_ratio": round(tps["unconstrained_again"] / tps["unconstrained"], 3),
           "ratio_median_of_rounds": round(statistics.median(per_round), 3),
           "ratio_per_round": [round(r, 3) for r in per_round],
           "mean_output_tokens": {m: sum(v) / len(v) for m, v in lengths.items()},
           "grammar_compile_ms": round(compile_s * 1e3, 2), **mask_costs(grammar, args)}
    print(json.dumps(out, indent=None if args.json else 2))
    return 0
