"""`colm train`: train a CoLM (or its dense baseline, one chain) on local text files."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from colm_runtime.cli import CLIError


def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _floats(s: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", help="training text files or directories (*.txt, *.md, *.rst)")
    p.add_argument("--val-data", nargs="+", default=(), help="validation files (default: hold out --val-fraction)")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--out", required=True, type=Path, help="output model directory (checkpoint/ inside)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out exactly")
    p.add_argument("--stop-at", type=int, default=None, help="stop (after saving) at this step; resume later")
    m = p.add_argument_group("model (ignored with --init / --resume)")
    m.add_argument("--tokenizer", default=None, help="reuse this tokenizer.json instead of training one")
    m.add_argument("--vocab-size", type=int, default=4096)
    m.add_argument("--chains", type=_ints, default=(2, 2, 2, 2), help="heads per chain, e.g. 2,2,2,2 (dense: 8)")
    m.add_argument("--kv-heads", type=_ints, default=None,
                   help="KV heads per chain (CoLM-Air: one shared entry); default 1 each")
    m.add_argument("--kv-sharing", action="store_true", help="CoLM-Air: K/V from chain 1, shared by all chains")
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--head-dim", type=int, default=32)
    m.add_argument("--ffn-mult", type=float, default=2.75, help="FFN width per model width")
    m.add_argument("--max-position-embeddings", type=int, default=1024)
    m.add_argument("--untied", action="store_true", help="a separate LM head instead of the embedding")
    m.add_argument("--init", default=None, help="start from this model directory (e.g. `colm expand` output)")
    m.add_argument("--freeze-chains", type=int, default=0, help="keep chains 1..K bit-identical (expansion, chain tuning)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--seq-len", type=int, default=256)
    o.add_argument("--batch-size", type=int, default=8, help="sequences per process and micro-step")
    o.add_argument("--grad-accum", type=int, default=1)
    o.add_argument("--steps", type=int, default=None)
    o.add_argument("--max-tokens", type=int, default=None, help="token budget (instead of --steps)")
    o.add_argument("--lr", type=float, default=2e-3)
    o.add_argument("--min-lr-ratio", type=float, default=0.1)
    o.add_argument("--warmup-steps", type=int, default=100)
    o.add_argument("--weight-decay", type=float, default=0.1)
    o.add_argument("--grad-clip", type=float, default=1.0)
    o.add_argument("--loss-scales", type=_ints, default=(), help="chain counts in the loss (default all; "
                   "e.g. 4 = the full model only)")
    o.add_argument("--loss-weights", type=_floats, default=None, help="one weight per loss scale (default 1 each)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--eval-every", type=int, default=200)
    o.add_argument("--eval-tokens", type=int, default=65536)
    o.add_argument("--save-every", type=int, default=200)
    o.add_argument("--device", default="auto", help="auto, cpu, cuda")
    o.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp",
                   help="under torchrun: ddp (full replicas) or fsdp (FSDP2: weights, gradients and AdamW "
                   "state sharded over the ranks; sharded checkpoints)")
    o.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in backward (memory for compute)")
    o.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    o.add_argument("--no-progress", action="store_true")


def config_from_args(a: argparse.Namespace):
    from colm_runtime.training.train_config import TrainConfig

    if not a.data:
        raise CLIError("--data is required (text files or directories)")
    if (a.steps is None) == (a.max_tokens is None):
        raise CLIError("give exactly one of --steps or --max-tokens")
    kv = a.kv_heads or ((1,) if a.kv_sharing else tuple(1 for _ in a.chains))
    return TrainConfig(
        data=tuple(a.data), out=str(a.out), val_data=tuple(a.val_data), val_fraction=a.val_fraction,
        tokenizer=a.tokenizer, vocab_size=a.vocab_size, chains=a.chains, kv_heads=kv, kv_sharing=a.kv_sharing,
        n_layers=a.layers, head_dim=a.head_dim, ffn_mult=a.ffn_mult, max_position_embeddings=a.max_position_embeddings,
        tie_word_embeddings=not a.untied, seq_len=a.seq_len, batch_size=a.batch_size, grad_accum=a.grad_accum,
        steps=a.steps, max_tokens=a.max_tokens, lr=a.lr, min_lr_ratio=a.min_lr_ratio, warmup_steps=a.warmup_steps,
        weight_decay=a.weight_decay, grad_clip=a.grad_clip, loss_scales=a.loss_scales, loss_weights=a.loss_weights,
        seed=a.seed, eval_every=a.eval_every, eval_tokens=a.eval_tokens, save_every=a.save_every, init=a.init,
        freeze_chains=a.freeze_chains, device=a.device, parallel=a.parallel,
        activation_checkpointing=a.activation_checkpointing)


def run(args: argparse.Namespace) -> int:
    import torch

    from colm_runtime.checkpoint import CheckpointError
    from colm_runtime.config import ConfigError
    from colm_runtime.training.data import CorpusError
    from colm_runtime.training.state import ResumeError, read_meta
    from colm_runtime.training.train_config import TrainConfig
    from colm_runtime.training.trainer import CHECKPOINT, train

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.resume:
            _, saved = read_meta(args.out / CHECKPOINT)
            cfg = TrainConfig.from_dict({**saved, "out": str(args.out)})
        else:
            cfg = config_from_args(args)
            if (args.out / CHECKPOINT).exists():
                raise CLIError(f"{args.out} already holds a training run: pass --resume, or choose another --out")
        res = train(cfg, resume=args.resume, stop_at=args.stop_at, show_progress=not args.no_progress)
    except (CorpusError, ConfigError, CheckpointError, ResumeError, ValueError) as e:
        raise CLIError(str(e)) from None
    if int(os.environ.get("RANK", "0")) == 0:
        ppl = " ".join(f"{k}:{torch.tensor(v).exp().item():.2f}" for k, v in res.val_loss.items())
        state = "finished" if res.finished else f"stopped at step {res.step} (continue with --resume)"
        print(f"{state}: {res.tokens} tokens -> {res.out}; val perplexity per chain count {ppl}")
    return 0
