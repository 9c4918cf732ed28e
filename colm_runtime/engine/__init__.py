"""The inference engine: scheduler, block manager, sampler, and the async front (see types.py)."""
