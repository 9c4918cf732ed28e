"""A one-chain CoLM is exactly a plain pre-norm Llama-style Transformer (written here, independently)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from colm_runtime.testing import random_model, small_config


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, pos, theta):  # x: [B, H, S, hd]
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.outer(pos.double(), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1).float(), torch.cat([ang.sin()] * 2, -1).float()
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def llama_forward(sd, cfg, ids):
    H, KV, hd = cfg.n_heads, cfg.kv_heads[0], cfg.head_dim
    B, S = ids.shape
    x = sd["embed.weight"][ids]
    pos = torch.arange(S)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        h = rms(x, sd[p + "attn_norm.weight"], cfg.norm_eps)
        wqkv = sd[p + "attn.qkv.chains.0.weight"]
        q, k, v = (h @ wqkv.T).split([H * hd, KV * hd, KV * hd], -1)
        q = rope(q.view(B, S, H, hd).transpose(1, 2), pos, cfg.rope_theta)
        k = rope(k.view(B, S, KV, hd).transpose(1, 2), pos, cfg.rope_theta)
        v = v.view(B, S, KV, hd).transpose(1, 2)
        k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
        att = (q @ k.transpose(-1, -2)) / hd**0.5
        att = att.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        x = x + (att @ v).transpose(1, 2).reshape(B, S, H * hd) @ sd[p + "attn.o.chains.0.weight"].T
        h = rms(x, sd[p + "ffn_norm.weight"], cfg.norm_eps)
        gate, up = (h @ sd[p + "ffn.gate_up.chains.0.weight"].T).chunk(2, -1)
        x = x + (F.silu(gate) * up) @ sd[p + "ffn.down.chains.0.weight"].T
    return rms(x, sd["norm.weight"], cfg.norm_eps) @ sd["embed.weight"].T


def test_one_chain_colm_is_a_dense_llama():
    cfg = small_config(chains=(4,), kv_per_chain=2, n_layers=3, head_dim=16)
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 21))
    ours = model.logits(model(ids), 1)
    ref = llama_forward(model.state_dict(), cfg, ids)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
