"""CoLM runtime: the chain model, its checkpoints and the inference engine."""
