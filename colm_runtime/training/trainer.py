"""The training loop: multi-chain loss, AdamW with warm-up and cosine decay, clipping, accumulation,
bf16 autocast on CUDA, DDP or FSDP2 under torchrun, periodic validation per chain count, exact resume."""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed._composable import checkpoint
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from colm_runtime.checkpoint import save_model
from colm_runtime.training import distributed as D
from colm_runtime.training import fsdp
from colm_runtime.training.data import DataPosition
from colm_runtime.training.evaluate import autocast, perplexities, train_flops_per_token, val_losses
from colm_runtime.training.loss import MultiChainLoss, parse_weights
from colm_runtime.training.optim import build_optimizer, freeze_chains, lr_at, mask_frozen_grads
from colm_runtime.training.setup import Run, build_run
from colm_runtime.training.state import ResumeError, TrainProgress, load_state, read_meta, save_state
from colm_runtime.training.train_config import TrainConfig

CHECKPOINT = "checkpoint"
LOG = "train_log.jsonl"


@dataclass(frozen=True)
class TrainResult:
    """The outcome of `train`: where the model is, how far it got, its last validation losses."""

    out: Path
    step: int
    tokens: int
    val_loss: dict[int, float]
    finished: bool


def validate(cfg: TrainConfig, run: Run, max_scale_weights: dict[int, float]) -> None:
    """Checks that need the model: chain counts in range, something left to train."""
    n = run.model.cfg.n_chains
    if not 0 <= cfg.freeze_chains < n:
        raise ValueError(f"--freeze-chains {cfg.freeze_chains} out of range: the model has {n} chains, "
                         f"freeze 0..{n - 1}")
    if max(max_scale_weights) <= cfg.freeze_chains:
        raise ValueError(f"loss scales {sorted(max_scale_weights)} only reach frozen chains "
                         f"(< {cfg.freeze_chains + 1}): nothing would train")


def train(cfg: TrainConfig, resume: bool = False, stop_at: int | None = None, show_progress: bool = True
          ) -> TrainResult:
    """Run (or continue) training; writes the model directory cfg.out and its checkpoint/."""
    env = D.setup(cfg.device, group=cfg.parallel == "fsdp")
    try:
        return _train(cfg, env, resume, stop_at, show_progress)
    finally:
        D.teardown(env)


@dataclass
class _Session:
    """Everything one training run holds between steps."""

    cfg: TrainConfig
    env: D.DistEnv
    run: Run
    loss: MultiChainLoss
    wrapped: torch.nn.Module  # the loss: DDP-wrapped under torchrun, or itself FSDP-sharded
    opt: torch.optim.Optimizer
    total: int
    settings: dict


def _start(cfg: TrainConfig, env: D.DistEnv, resume: bool) -> tuple[_Session, TrainProgress]:
    """Build the run, the loss and the optimiser; restore the checkpoint when resuming."""
    ckpt = Path(cfg.out) / CHECKPOINT
    progress = TrainProgress(0, 0, 0, 0)
    if resume:
        progress, saved = read_meta(ckpt)
        if saved.get("world", 1) != env.world:
            raise ResumeError(f"{ckpt}: saved with {saved.get('world')} processes, resumed with {env.world}")
    torch.manual_seed(cfg.seed)
    run = build_run(cfg, env, resume)
    model = run.model
    weights = parse_weights(model.cfg.n_chains, list(cfg.loss_scales), cfg.loss_weights)
    validate(cfg, run, weights)
    freeze_chains(model, cfg.freeze_chains)
    loss_mod = MultiChainLoss(model, weights)
    if cfg.activation_checkpointing:
        for blk in model.layers:
            checkpoint(blk)  # before fully_shard, so that the recomputed forward gathers the weights again
    wrapped: torch.nn.Module = loss_mod
    if cfg.parallel == "fsdp":
        wrapped = fsdp.shard(loss_mod, env)  # before the optimiser: it must hold the sharded parameters
    elif env.world > 1:
        unused = loss_mod.max_scale < model.cfg.n_chains
        wrapped = DDP(loss_mod, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                      find_unused_parameters=unused)
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    if resume and cfg.parallel == "fsdp":
        fsdp.load_sharded(ckpt, model, opt)
    elif resume:
        load_state(ckpt, model, opt)
    sess = _Session(cfg, env, run, loss_mod, wrapped, opt, cfg.total_steps(env.world),
                    {**cfg.to_dict(), "world": env.world})
    if env.is_main:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: chains {list(model.cfg.chains)} dim {model.cfg.dim} layers {model.cfg.n_layers} "
              f"vocab {model.cfg.vocab_size}, {n_params / 1e6:.2f} M params; train {run.train.num_tokens} "
              f"tokens, val {run.val.num_tokens}; {sess.total} steps x {cfg.tokens_per_step(env.world)} tokens; "
              f"loss scales {weights}", file=sys.stderr)
    return sess, progress


def _step(s: _Session, step: int, batches) -> tuple[list[float], DataPosition]:
    """One optimiser step over grad_accum micro-batches; returns the per-scale losses (mean over ranks)."""
    cfg, env, model = s.cfg, s.env, s.run.model
    per_scale = torch.zeros(s.loss.max_scale, device=env.device)
    amp = autocast(env.device)
    for micro in range(cfg.grad_accum):
        windows, pos = next(batches)
        # Only the last micro-step all-reduces (DDP) or reduce-scatters (FSDP) gradients.
        last = micro == cfg.grad_accum - 1
        if cfg.parallel == "fsdp":
            s.wrapped.set_requires_gradient_sync(last)
        sync = s.wrapped.no_sync() if env.world > 1 and cfg.parallel == "ddp" and not last else nullcontext()
        with sync:
            with amp:
                loss, scales = s.wrapped(windows.to(env.device))
            (loss / cfg.grad_accum).backward()
        per_scale += scales / cfg.grad_accum
    mask_frozen_grads(model, cfg.freeze_chains)
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
    for g in s.opt.param_groups:
        g["lr"] = lr_at(step, cfg.lr, cfg.warmup_steps, s.total, cfg.min_lr_ratio)
    s.opt.step()
    s.opt.zero_grad(set_to_none=True)
    return D.mean(env, per_scale).tolist(), pos


def _train(cfg: TrainConfig, env: D.DistEnv, resume: bool, stop_at: int | None, show: bool) -> TrainResult:
    s, progress = _start(cfg, env, resume)
    out, model = Path(cfg.out), s.run.model
    flops_tok = train_flops_per_token(model, s.loss.max_scale, cfg.seq_len)
    step, tokens, pos = progress.step, progress.tokens, DataPosition(progress.epoch, progress.offset)
    batches = s.run.train.batches(cfg.batch_size, cfg.seed, pos, env.rank, env.world)
    bar = tqdm(total=s.total, initial=step, disable=not (show and env.is_main), unit="step",
               dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    last_val: dict[int, float] = {}
    t0, tok0 = time.perf_counter(), tokens
    while step < s.total and (stop_at is None or step < stop_at):
        train_losses, pos = _step(s, step, batches)
        step += 1
        tokens += cfg.tokens_per_step(env.world)
        rate = (tokens - tok0) / max(1e-9, time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{train_losses[-1]:.3f}", tok_s=f"{rate:.0f}", refresh=False)
        at_end = step == s.total or step == stop_at
        if step % cfg.eval_every == 0 or at_end:
            last_val = _evaluate(s, None if at_end else cfg.eval_tokens)
            if env.is_main:
                _log(out, step, tokens, tokens * flops_tok, train_losses, last_val, bar)
        if step % cfg.save_every == 0 or at_end:
            _save(s, TrainProgress(step, tokens, pos.epoch, pos.offset), at_end)
        D.barrier(env)
    bar.close()
    return TrainResult(out, step, tokens, last_val, step >= s.total)


def _evaluate(s: _Session, max_tokens: int | None) -> dict[int, float]:
    """Validation losses per chain count: on rank 0, or under FSDP on every rank (the forward needs
    them all to gather the weights; each computes the same numbers)."""
    model = s.run.model
    if s.cfg.parallel != "fsdp":
        return val_losses(model, s.run.val, s.cfg.batch_size, max_tokens) if s.env.is_main else {}
    n = model.cfg.n_chains
    return val_losses(model, s.run.val, s.cfg.batch_size, max_tokens, lambda w: s.wrapped(w, n)[1])


def _save(s: _Session, progress: TrainProgress, at_end: bool) -> None:
    """The resumable state and the model directory. FSDP: every rank writes its shards; the model
    directory (one safetensors file) is exported from them at the end of the run (or --stop-at)."""
    out, model = Path(s.cfg.out), s.run.model
    if s.cfg.parallel == "fsdp":
        fsdp.save_sharded(out / CHECKPOINT, model, s.opt, progress, s.settings, s.run.tokenizer_file, s.env)
        if at_end and s.env.is_main:
            save_model(fsdp.load_full_model(out / CHECKPOINT), out, s.run.tokenizer_file)
    elif s.env.is_main:
        save_state(out / CHECKPOINT, model, s.opt, progress, s.settings)
        save_model(model, out, s.run.tokenizer_file)


def _log(out: Path, step: int, tokens: int, flops: float, train_losses: list[float],
         val: dict[int, float], bar: tqdm) -> None:
    ppl = perplexities(val)
    bar.write(f"step {step} tokens {tokens}: train loss {train_losses[-1]:.4f}; val ppl per chain count "
              + " ".join(f"{k}:{v:.2f}" for k, v in ppl.items()), file=sys.stderr)
    rec = {"step": step, "tokens": tokens, "flops": flops, "train_loss": train_losses,
           "val_loss": {str(k): v for k, v in val.items()}, "time": time.time()}
    with open(out / LOG, "a") as f:
        f.write(json.dumps(rec) + "\n")
