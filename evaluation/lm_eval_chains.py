"""Evaluate every chain count of a running `colm serve` with lm-evaluation-harness, in one table.

    python evaluation/lm_eval_chains.py --base-url http://127.0.0.1:8000 --tokenizer models/colm-tiny \
        --tasks colm_python [--json results.json]

For each model id `<base>:c<k>` that /v1/models lists, it runs lm-eval's `local-completions` model (the
server's /v1/completions with prompt token ids: log-likelihoods through echo + logprobs, generation
through max_tokens) on the tasks, from evaluation/tasks (task YAML + jsonl, nothing from the hub). The
tokenizer is the model directory's tokenizer.json, given to lm-eval as a local Hugging Face tokenizer
directory (a copy with a tokenizer_config.json), so lm-eval counts tokens exactly as the server does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import httpx

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
EOS = "<|endoftext|>"


def tokenizer_dir(model_dir: Path, out: Path, max_len: int) -> Path:
    """A directory transformers' AutoTokenizer loads offline: tokenizer.json + tokenizer_config.json."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_dir / "tokenizer.json", out / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "model_max_length": max_len}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def chain_models(base_url: str) -> list[tuple[str, int, int]]:
    """(model id, chains, max_model_len) of every per-chain id the server lists."""
    cards = httpx.get(f"{base_url}/v1/models", timeout=30).raise_for_status().json()["data"]
    return [(c["id"], c["chains"], c["max_model_len"]) for c in cards if c.get("parent")]


def evaluate(base_url: str, model_dir: Path, tasks: list[str], limit: int | None = None) -> dict:
    """{model id: lm-eval's results dict} for every chain count."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model_id, chains, max_len in chain_models(base_url):
            tok = tokenizer_dir(model_dir, Path(tmp) / "tokenizer", max_len)
            # max_length: lm-eval asks for one generated token after each scored sequence
            args = (f"model={model_id},base_url={base_url}/v1/completions,tokenizer={tok},"
                    f"tokenizer_backend=huggingface,max_length={max_len - 1},num_concurrent=1,max_retries=1,"
                    f"tokenized_requests=True")
            res = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=tasks,
                                          task_manager=manager, limit=limit, log_samples=False)
            out[model_id] = {"chains": chains, "max_length": max_len - 1, "results": res["results"]}
    return out


METRICS = (("acc", "acc,none"), ("acc_norm", "acc_norm,none"), ("exact_match", "exact_match,strip"),
           ("word_perplexity", "word_perplexity,none"), ("byte_perplexity", "byte_perplexity,none"),
           ("bits_per_byte", "bits_per_byte,none"))


def table(results: dict) -> str:
    """A markdown table: one row per chain count, one column per (task, metric) found."""
    cols = []
    for r in results.values():
        for task, vals in r["results"].items():
            cols += [(task, name, key) for name, key in METRICS if key in vals and (task, name, key) not in cols]
    lines = ["| model | chains | " + " | ".join(f"{t} {n}" for t, n, _ in cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    for mid, r in results.items():
        vals = [r["results"].get(t, {}).get(k) for t, _, k in cols]
        lines.append(f"| {mid} | {r['chains']} | " + " | ".join("" if v is None else f"{v:.4g}" for v in vals) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (without /v1)")
    p.add_argument("--tokenizer", type=Path, required=True, help="the served model's directory (its tokenizer.json)")
    p.add_argument("--tasks", nargs="+", default=["colm_python"], help="task or group names (evaluation/tasks)")
    p.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    p.add_argument("--json", type=Path, default=None, help="also write every result here")
    args = p.parse_args(argv)
    results = evaluate(args.base_url.rstrip("/"), args.tokenizer, args.tasks, args.limit)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
