"""`colm serve`: flags over COLM_* environment variables over defaults; validated before anything loads.

With no arguments it serves models/colm-tiny (or $COLM_MODEL) on 127.0.0.1:8000. SIGTERM/SIGINT: the
server stops admitting (503 on open connections, new connections refused), lets in-flight requests
finish for up to --drain-timeout seconds, then exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal

from colm_runtime.cli import CLIError

_FLUSH_S = 5.0  # after the drain timeout: time for the cut-off streams to send their error chunk

# flag -> (settings field, type, help). Every flag defaults to None: unset flags leave the
# environment (COLM_<FIELD>) or the built-in default in charge.
_FLAGS = {
    "--host": ("host", str, "interface to bind (default 127.0.0.1; 0.0.0.0 for all)"),
    "--port": ("port", int, "port (default 8000)"),
    "--model": ("model", str, "model directory, or a packaged model's name: smollm2 (imported once into "
                "$COLM_CACHE_DIR; see docs/models.md) (default models/colm-tiny, or $COLM_MODEL)"),
    "--served-model-name": ("served_model_name", str, "base model id (default: the directory name)"),
    "--api-key-file": ("api_key_file", str, "file with one API key a line (keys also from $COLM_API_KEYS)"),
    "--max-waiting": ("max_waiting", int, "queued requests before 429 (default 256)"),
    "--degrade-utilization": ("degrade_utilization", float, ("engine time share of the recent load above "
                              "which unpinned requests get fewer chains (default 0.85)")),
    "--max-num-seqs": ("max_num_seqs", int, "running sequences at most (default 64)"),
    "--max-num-batched-tokens": ("max_num_batched_tokens", int, "tokens per engine step (default 512)"),
    "--max-body-bytes": ("max_body_bytes", str, "request body limit (default 1MiB)"),
    "--max-prompt-tokens": ("max_prompt_tokens", int, "prompt tokens at most (default: the context)"),
    "--max-stream-buffer": ("max_stream_buffer", int, "stream outputs held for a client that does not read "
                            "before its request is aborted (default 1024)"),
    "--rate-limit-rpm": ("rate_limit_rpm", int, "requests per minute per API key (default: unlimited)"),
    "--rate-limit-tpm": ("rate_limit_tpm", int, "prompt + max_tokens per minute per API key (default: unlimited)"),
    "--max-model-len": ("max_model_len", int, "prompt + output tokens at most (default: the model's)"),
    "--tiers-file": ("tiers_file", str, "YAML or JSON tier definitions (see docs/api.md)"),
    "--default-tier": ("default_tier", str, "tier of requests that choose nothing (default premium)"),
    "--kv-cache-memory": ("kv_cache_memory", str, "bytes for the KV cache, e.g. 512MiB (default: fits the machine)"),
    "--block-size": ("block_size", int, "KV block size in tokens (default 16)"),
    "--device": ("device", str, "cpu, cuda, cuda:N or auto (default auto: CUDA when present)"),
    "--dtype": ("dtype", str, "auto, checkpoint, float32, bfloat16 or float16 (default auto: the fastest "
                           "here, bfloat16 on a GPU or a CPU with AMX, else float32; checkpoint: the checkpoint's)"),
    "--chat-template": ("chat_template", str, "Jinja2 chat template file (default: the model's, or built-in)"),
    "--drain-timeout": ("drain_timeout", float, "seconds to finish in-flight requests on SIGTERM (default 30)"),
    "--log-level": ("log_level", str, "critical, error, warning, info or debug (default info)"),
    "--seed": ("seed", int, "sampling seed of requests without their own (default 0)"),
    "--num-speculative-tokens": ("num_speculative_tokens", int, "self-speculative decoding: draft tokens per "
                                 "step at most (default 0: off)"),
    "--speculative-draft-chains": ("speculative_draft_chains", int, "chain count that drafts (default 1)"),
    "--step-time-target-ms": ("step_time_target_ms", float, "step unpinned running requests down a chain while "
                              "a decode step takes longer (default: off)"),
}
_SWITCHES = {
    "--metrics-auth": ("metrics_auth", "require an API key on /metrics"),
    "--no-warmup": ("warmup", "skip the warm-up requests at start-up"),
    "--no-access-log": ("access_log", "no per-request access log lines"),
    "--refuse-unreachable-budgets": ("refuse_unreachable_budgets", "429 for unpinned requests whose latency "
                                     "budget even 1 chain is predicted to miss"),
    "--enable-prefix-caching": ("enable_prefix_caching", "reuse the K/V of cached prompt prefixes (default)"),
    "--no-enable-prefix-caching": ("enable_prefix_caching", "compute every prompt in full"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, (dest, kind, help_text) in _FLAGS.items():
        parser.add_argument(flag, dest=dest, type=kind, default=None, help=help_text)
    for flag, (dest, help_text) in _SWITCHES.items():
        parser.add_argument(flag, dest=dest, action="store_const", const=not flag.startswith("--no-"),
                            default=None, help=help_text)


def resolve_packaged(args: argparse.Namespace) -> None:
    """--model smollm2 (or $COLM_MODEL=smollm2): import the packaged model into the cache once and serve
    that directory under the name given."""
    from colm_runtime.importers.llama import ImportRefused
    from colm_runtime.importers.packaged import resolve_model

    name = args.model or os.environ.get("COLM_MODEL")
    try:
        resolved = resolve_model(name)
    except ImportRefused as e:
        raise CLIError(str(e)) from None
    if resolved != name:
        args.model = resolved
        if args.served_model_name is None and "COLM_SERVED_MODEL_NAME" not in os.environ:
            args.served_model_name = name


def load_settings(args: argparse.Namespace):
    """ServerSettings from flags and environment; CLIError with every problem listed."""
    from pydantic import ValidationError

    from server.settings import ServerSettings

    given = {k: v for k, v in vars(args).items() if not k.startswith("_") and v is not None}
    try:
        return ServerSettings(**given)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg'].removeprefix('Value error, ')}" for err in e.errors())
        raise CLIError(f"invalid settings: {problems}") from None


def check_model(settings) -> None:
    """Fail fast, before uvicorn starts, on a model/tier/template problem."""
    from colm_runtime.checkpoint import load_config
    from colm_runtime.tokenizer import Tokenizer
    from server.chat_template import ChatTemplate, ChatTemplateError, find_template
    from server.routing import ChainRouter
    from server.tiers import TierError, load_tiers

    try:
        cfg = load_config(settings.model)
        Tokenizer.from_model_dir(settings.model)  # its eos ids and BOS too
        ChainRouter(cfg, settings.model_name, load_tiers(settings.tiers_file, cfg.n_chains), settings.default_tier)
        ChatTemplate(*find_template(settings.model, settings.chat_template))
    except (TierError, ChatTemplateError, ValueError, OSError) as e:
        raise CLIError(str(e)) from None


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app

    resolve_packaged(args)
    settings = load_settings(args)
    check_model(settings)
    configure_logging(settings.log_level)
    app = create_app(settings)

    class DrainingServer(uvicorn.Server):
        """Marks the app draining the moment a stop signal arrives (503 for new requests on open
        connections, /ready 503), then lets uvicorn's graceful shutdown finish in-flight requests."""

        def handle_exit(self, sig, frame):
            state = app.state.colm
            if state is not None and state.loop is not None:
                state.draining = True
                state.loop.call_soon_threadsafe(state.begin_drain, settings.drain_timeout)
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:
                self._captured_signals.clear()  # a drained shutdown exits 0, not by re-raising SIGTERM

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=False, lifespan="on", timeout_graceful_shutdown=settings.drain_timeout + _FLUSH_S)
    server = DrainingServer(config)
    logging.getLogger("colm.server").info("settings: %s", json.dumps(
        {"model": str(settings.model), "host": settings.host, "port": settings.port,
         "api_keys": len(settings.all_api_keys), "max_waiting": settings.max_waiting}))
    server.run()
    return 0 if server.started else 3
