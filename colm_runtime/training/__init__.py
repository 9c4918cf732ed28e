"""Training CoLM models: corpus preparation, the multi-chain loss, the training loop, chain
expansion and evaluation. The `colm train / expand / eval / data` commands are thin wrappers."""
