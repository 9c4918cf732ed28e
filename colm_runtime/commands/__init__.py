"""Implementations of `colm` subcommands."""
