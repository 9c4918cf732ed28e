"""CoLM Serve's HTTP server: an OpenAI-compatible API with per-request chain routing.

The path of a request: routes/ (thin FastAPI routers) -> serving.py (prompt -> EngineRequest, engine
stream -> OpenAI responses) -> colm_runtime.engine. Policy lives in small objects: routing.ChainRouter
picks the chain count, degradation.DegradationPolicy lowers it under overload, errors.py maps every
error kind to an HTTP status, metrics.py exports Prometheus metrics. Start it with `colm serve`.
"""
