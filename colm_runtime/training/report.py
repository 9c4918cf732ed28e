"""Tables, model cards and the progressive-scaling plot, built from runs' train_log.jsonl files.

    python -m colm_runtime.training.report card RUN_DIR --name colm-tiny --command "colm train ..."
    python -m colm_runtime.training.report ladder RUN_DIR [RUN_DIR ...]
    python -m colm_runtime.training.report plot OUT.png LABEL=RUN_DIR[@PREVIOUS_STAGE_DIR] ... [--scale K]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from colm_runtime.checkpoint import load_config

CORPUS = ("Python 3.11 documentation (reST sources from Debian's python3.11-doc package, converted to "
          "plain text by `colm data python-docs`); Python Software Foundation License. Train split 471 "
          "files (9.8 M characters), validation split 24 files (0.45 M characters, chosen by a hash of "
          "the file path).")


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "train_log.jsonl").read_text().splitlines() if line]


def final_ppl(run: Path) -> dict[str, float]:
    """Validation perplexity per chain count at the end of the run (the full validation split)."""
    return {k: math.exp(v) for k, v in read_log(run)[-1]["val_loss"].items()}


def strictly_falling(ppl: dict[str, float]) -> bool:
    vals = [ppl[k] for k in sorted(ppl, key=int)]
    return all(a > b for a, b in zip(vals, vals[1:]))


def model_card(run: Path, name: str, command: str, decode: dict[str, float] | None = None) -> str:
    """The README.md of a shipped model directory."""
    cfg = load_config(run)
    log = read_log(run)[-1]
    ppl = final_ppl(run)
    kind = "CoLM-Air (keys and values from chain 1, shared by all chains)" if cfg.kv_sharing else "plain CoLM"
    rows = "\n".join(f"| {k} | {cfg.width(int(k))} | {v:.2f} |"
                     + (f" {decode[k]:.0f} |" if decode else "") for k, v in ppl.items())
    dec_head = " decode tok/s |" if decode else ""
    return f"""# {name}

A tiny {kind} model, {len(cfg.chains)} chains {list(cfg.chains)} (heads per chain), trained from scratch
with this repository's pipeline (`colm train`) on a 2-core CPU. It is a demonstration and test model
for CoLM Serve, not a useful assistant: it continues Python-documentation-like text.

- Shape: {cfg.n_layers} layers, head_dim {cfg.head_dim}, width {cfg.dim}, KV heads {list(cfg.kv_heads)}
  ({'shared' if cfg.kv_sharing else 'per chain'}), FFN {cfg.intermediate_size}, vocab {cfg.vocab_size}
  (byte-level BPE trained on the corpus), max_position_embeddings {cfg.max_position_embeddings}
  (trained on 512-token windows), tied embeddings: {cfg.tie_word_embeddings}.
- Weights: fp32 safetensors.
- Training: {log['tokens']:,} tokens ({log['step']} steps), multi-chain loss (one cross-entropy per
  chain count, summed with equal weights), AdamW, warm-up then cosine decay, seed 0.
- Corpus: {CORPUS}

## Validation perplexity per chain count

| chains | width |{' perplexity |'}{dec_head}
|---|---|---|{'---|' if decode else ''}
{rows}

Perplexity on the full validation split (512-token windows, this model's tokenizer).
{'Decode tokens/s: batch 1, greedy, one CPU thread, measured with `colm eval` on a shared machine (indicative only).' if decode else ''}

## Reproduce

```
colm data python-docs --out data/python-docs
{command}
```

The run also writes `checkpoint/` (optimiser state for `--resume`) and `train_log.jsonl`; only
config.json, model.safetensors and tokenizer.json are needed to serve the model.
"""


def plot(out: Path, curves: dict[str, list[tuple[float, float]]], title: str) -> None:
    """Validation loss against training FLOPs, one line per run (needs matplotlib: the `train` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for label, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=label)
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss (full model)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)


def curve(run: Path, scale: str, previous: Path | None = None) -> list[tuple[float, float]]:
    """(FLOPs, val loss at `scale` chains) points. With `previous` (the stage a model was expanded
    from), that stage's points at its own full width come first and its FLOPs are added to this run's."""
    pts: list[tuple[float, float]] = []
    base = 0.0
    if previous is not None:
        prev = read_log(previous)
        full = max(prev[-1]["val_loss"], key=int)
        pts = [(r["flops"], r["val_loss"][full]) for r in prev]
        base = prev[-1]["flops"]
    return pts + [(base + r["flops"], r["val_loss"][scale]) for r in read_log(run)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m colm_runtime.training.report")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("card")
    c.add_argument("run", type=Path)
    c.add_argument("--name", required=True)
    c.add_argument("--command", required=True)
    c.add_argument("--decode-json", type=Path, default=None, help="`colm eval --json` output")
    lad = sub.add_parser("ladder")
    lad.add_argument("runs", type=Path, nargs="+")
    pl = sub.add_parser("plot")
    pl.add_argument("out", type=Path)
    pl.add_argument("runs", nargs="+", help="LABEL=RUN_DIR or LABEL=RUN_DIR@PREVIOUS_STAGE_DIR")
    pl.add_argument("--scale", default="2", help="chain count whose validation loss is plotted")
    pl.add_argument("--title", default="progressive scaling")
    a = p.parse_args(argv)
    if a.cmd == "plot":
        curves = {}
        for spec in a.runs:
            label, _, dirs = spec.partition("=")
            run, _, prev = dirs.partition("@")
            curves[label] = curve(Path(run), a.scale, Path(prev) if prev else None)
        plot(a.out, curves, a.title)
        return
    if a.cmd == "card":
        decode = json.loads(a.decode_json.read_text())["tokens_per_second"] if a.decode_json else None
        print(model_card(a.run, a.name, a.command, decode))
    else:
        for run in a.runs:
            ppl = final_ppl(run)
            print(run, {k: round(v, 2) for k, v in ppl.items()}, "strictly falling:", strictly_falling(ppl))


if __name__ == "__main__":
    main()
