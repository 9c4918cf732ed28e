"""Greedy chat answer of SmolLM2 in bf16 and fp32, transformers against our engine.

  python benchmarks/bf16_check.py   # needs /work/peers/smollm2-colm and /work/peers/smollm2-hf (docs/performance.md)
"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from colm_runtime.engine.config import EngineConfig
from colm_runtime.engine.llm_engine import LLMEngine
from colm_runtime.engine.types import EngineRequest, SamplingParams
torch.set_num_threads(1)
tok = AutoTokenizer.from_pretrained("/work/peers/smollm2-hf")
ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
for dt in ("bfloat16", "float32"):
    m = AutoModelForCausalLM.from_pretrained("/work/peers/smollm2-hf", dtype=getattr(torch, dt)).eval()
    with torch.no_grad():
        out = m.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    print("HF  ", dt, repr(tok.decode(out[0, len(ids):])), flush=True)
    eng = LLMEngine.from_model_dir("/work/peers/smollm2-colm", EngineConfig(dtype=dt, cpu_threads=1, kv_cache_memory=64 << 20))
    r = eng.generate([EngineRequest("a", ids, SamplingParams(max_tokens=12, temperature=0.0), chains=1)])["a"][0]
    print("colm", dt, repr(r.text), flush=True)
