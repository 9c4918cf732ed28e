"""Load tests for CoLM Serve (or any OpenAI-compatible server): open-loop and closed-loop streamed
traffic with chain-selection mixes, latency percentiles per chain count, goodput under latency
budgets, and the scenarios steady, overload (elastic against pinned), soak, cancel and quick.

Run `python -m loadtests --help`; docs/performance.md has the results on the reference machine.
"""
