"""Thin FastAPI routers: parse, authenticate, hand over to serving_*.py."""
