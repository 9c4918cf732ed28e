"""Benchmarks behind `colm bench`."""
