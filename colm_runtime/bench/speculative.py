"""`colm bench speculative`: self-speculative decoding (draft at --draft-chains, verify at k) against
plain decoding, per chain count k, on the default models (plain CoLM and CoLM-Air).

Per model and k: the same requests (prompts from --prompts texts, greedy unless --temperature, EOS
ignored) run on two engines that differ only in num_speculative_tokens; timed side by side, interleaved
round by round, fastest round each. Reports
  speedup         tokens/s speculative / tokens/s plain (the engine as served: gamma and the throughput
                  gate adapt, so speculation turns itself off where it measures slower)
  speedup_ungated the same with the throughput gate off (every eligible step speculates; gamma still
                  adapts per sequence): what drafting costs or gains where it is forced
  acceptance      accepted / proposed draft tokens over one ungated run
Greedy outputs are checked equal (the method is exact). On a CPU every draft step is a full engine step
(Python, batch building, kernel launches), so the per-step overhead is paid gamma + 1 times per verify:
at tiny sizes that overhead, not FLOPs, sets the speedup.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from colm_runtime.bench import add_run_arguments
from colm_runtime.bench.engine import _tokenizer, time_rounds
from colm_runtime.engine.config import EngineConfig
from colm_runtime.engine.llm_engine import LLMEngine
from colm_runtime.engine.types import EngineRequest, SamplingParams

PROMPTS = (
    "The Python standard library",
    "def read_config(path):\n    \"\"\"Read a configuration file and",
    "To install a package, run",
    "The following example shows how to use the",
    "Exceptions are raised when",
    "A list comprehension is",
    "import os\nimport sys\n\n",
    "Return the number of",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=None,
                   help="model directories (default: models/colm-tiny and models/colm-tiny-air)")
    p.add_argument("--requests", type=int, default=1, help="concurrent requests")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--gamma", type=int, default=4, help="num_speculative_tokens (the most drafted per step)")
    p.add_argument("--draft-chains", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--rounds", type=int, default=3)
    add_run_arguments(p)


def default_models() -> list[str]:
    from colm_runtime.paths import MODELS_DIR

    return [str(MODELS_DIR / "colm-tiny"), str(MODELS_DIR / "colm-tiny-air")]


def load(path: str, args):
    from colm_runtime.bench.engine import random_model
    from colm_runtime.checkpoint import load_model

    try:
        return load_model(path, args.device, getattr(torch, args.dtype)), path
    except FileNotFoundError:
        model, _ = random_model("colm-tiny", args.device, getattr(torch, args.dtype))
        return model, f"random(colm-tiny shape) for missing {path}"


def bench_model(path: str, args) -> dict:
    model, source = load(path, args)
    cfg = model.cfg
    tok = _tokenizer(path, cfg.vocab_size)
    prompts = [tok.encode(PROMPTS[i % len(PROMPTS)]) for i in range(args.requests)]
    base = EngineConfig(block_size=16, max_num_seqs=max(args.requests, 1), device=args.device,
                        kv_cache_memory=64 << 20, seed=0)
    spec_config = dataclasses.replace(base, num_speculative_tokens=args.gamma,
                                      speculative_draft_chains=args.draft_chains)
    engines = {"plain": LLMEngine(model, tok, base), "spec": LLMEngine(model, tok, spec_config),
               "spec_ungated": LLMEngine(model, tok, spec_config)}
    engines["spec_ungated"].spec.throughput_gate = False
    params = SamplingParams(max_tokens=args.output_len, temperature=args.temperature, ignore_eos=True, seed=0)

    def run(engine: LLMEngine, k: int):
        reqs = [EngineRequest(f"s{i}", p, params, k) for i, p in enumerate(prompts)]
        return lambda: engine.generate(reqs)

    ks = [k for k in range(args.draft_chains + 1, cfg.n_chains + 1)]
    out = {"model": source, "speedup": {}, "speedup_ungated": {}, "acceptance": {}, "tokens_per_s": {}}
    for k in ks:
        spec = engines["spec_ungated"]
        before = (spec.spec.proposed_total, spec.spec.accepted_total)
        got, ref = run(spec, k)(), run(engines["plain"], k)()
        if args.temperature == 0:
            assert all(got[r][0].token_ids == ref[r][0].token_ids for r in ref), "greedy outputs differ"
        proposed = spec.spec.proposed_total - before[0]
        out["acceptance"][str(k)] = round((spec.spec.accepted_total - before[1]) / max(proposed, 1), 3)
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        t = time_rounds({m: run(e, k) for m, e in engines.items()}, args.rounds, sync, lambda: None)
        tokens = args.requests * args.output_len
        out["tokens_per_s"][str(k)] = {m: round(tokens / s, 1) for m, s in t.items()}
        out["speedup"][str(k)] = round(t["plain"] / t["spec"], 3)
        out["speedup_ungated"][str(k)] = round(t["plain"] / t["spec_ungated"], 3)
    return out


def run(args: argparse.Namespace) -> int:
    from colm_runtime.cli import CLIError

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.requests < 1 or args.output_len < 2 or args.gamma < 1 or args.rounds < 1:
        raise CLIError("--requests >= 1, --output-len >= 2, --gamma >= 1 and --rounds >= 1 are required")
    per_model = [bench_model(p, args) for p in (args.models or default_models())]
    out = {"device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
           "requests": args.requests, "output_len": args.output_len, "gamma": args.gamma,
           "draft_chains": args.draft_chains, "temperature": args.temperature,
           "speedup": {m["model"]: m["speedup"] for m in per_model},
           "speedup_ungated": {m["model"]: m["speedup_ungated"] for m in per_model},
           "acceptance": {m["model"]: m["acceptance"] for m in per_model}, "models": per_model}
    print(json.dumps(out, indent=None if args.json else 2))
    return 0
