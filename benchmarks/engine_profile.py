"""A fixed engine workload to profile: 32 requests of 128 random prompt tokens and 32 output tokens
(temperature 1, ignore_eos) on MODEL_DIR in DTYPE, 1 thread. Prints the wall time.

  py-spy record -f raw -r 50 -o engine.txt -- python benchmarks/engine_profile.py MODEL_DIR bfloat16
"""
import random, sys, time
from colm_runtime.engine.config import EngineConfig
from colm_runtime.engine.llm_engine import LLMEngine
from colm_runtime.engine.types import EngineRequest, SamplingParams
eng = LLMEngine.from_model_dir(sys.argv[1], EngineConfig(dtype=sys.argv[2], cpu_threads=1, kv_cache_memory=256 << 20))
rng = random.Random(0)
reqs = [EngineRequest(f"r{i}", [rng.randrange(100, 49000) for _ in range(128)],
                      SamplingParams(max_tokens=32, temperature=1.0, ignore_eos=True), chains=1) for i in range(32)]
t = time.perf_counter()
eng.generate(reqs)
print(f"{time.perf_counter() - t:.1f} s")
