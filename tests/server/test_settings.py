"""ServerSettings: flags over environment over defaults, sizes, keys, and clear validation errors."""

from __future__ import annotations

import argparse

import pytest

from colm_runtime.cli import CLIError
from colm_runtime.paths import default_model_dir
from server.cli import add_arguments, load_settings
from server.settings import parse_size


def settings_from(argv: list[str]):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return load_settings(parser.parse_args(argv))


def test_defaults(model_dir, monkeypatch):
    for var in ("COLM_HOST", "COLM_PORT", "COLM_API_KEYS"):
        monkeypatch.delenv(var, raising=False)
    s = settings_from(["--model", str(model_dir)])
    assert (s.host, s.port, s.default_tier, s.max_body_bytes) == ("127.0.0.1", 8000, "premium", 1 << 20)
    assert s.all_api_keys == () and s.hard_queue_limit == 256 + 128


def test_device_defaults_to_auto_and_dtype_auto_is_the_fastest_here(model_dir, monkeypatch):
    import torch

    from colm_runtime.engine.config import cpu_has_amx

    for var in ("COLM_DEVICE", "COLM_DTYPE"):
        monkeypatch.delenv(var, raising=False)
    s = settings_from(["--model", str(model_dir)])
    assert (s.device, s.dtype) == ("auto", "auto")
    assert s.resolved_device == ("cuda" if torch.cuda.is_available() else "cpu")
    fast = torch.cuda.is_available() and torch.cuda.is_bf16_supported() or not torch.cuda.is_available() and cpu_has_amx()
    assert s.resolved_dtype[0] == ("bfloat16" if fast else "float32") and s.resolved_dtype[1].startswith("auto: ")
    from colm_runtime.model import cpu_kernels

    # where our kernels widen bf16 (AVX2, no bf16 dot product), fp32 is kept but the reason points to bf16
    hint = not torch.cuda.is_available() and not cpu_has_amx() and cpu_kernels.has_bf16_widen()
    assert ("--dtype bfloat16" in s.resolved_dtype[1]) == hint
    with open("/proc/cpuinfo") as f:  # the kernel's flags agree with torch's probe
        assert cpu_has_amx() == (" amx_bf16" in f.read())
    assert settings_from(["--model", str(model_dir), "--dtype", "checkpoint"]).resolved_dtype[0] is None
    assert settings_from(["--model", str(model_dir), "--device", "cpu", "--dtype", "float32"]).resolved_dtype[0] == "float32"


def test_flags_beat_environment(model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("COLM_PORT", "9000")
    monkeypatch.setenv("COLM_MAX_WAITING", "7")
    monkeypatch.setenv("COLM_API_KEYS", " a , b,,")
    (tmp_path / "keys").write_text("# comment\n\nc\n")
    s = settings_from(["--model", str(model_dir), "--port", "9100", "--api-key-file", str(tmp_path / "keys"),
                       "--kv-cache-memory", "512MiB", "--metrics-auth", "--no-warmup"])
    assert (s.port, s.max_waiting, s.kv_cache_memory) == (9100, 7, 512 << 20)
    assert s.all_api_keys == ("a", "b", "c")
    assert s.metrics_auth and not s.warmup


@pytest.mark.parametrize("argv,expect", [
    (["--port", "-1"], "port"), (["--device", "tpu"], "device"), (["--log-level", "loud"], "log_level"),
    (["--tiers-file", "/no/such/file"], "does not exist"), (["--drain-timeout", "-1"], "drain_timeout"),
])
def test_invalid_settings_name_the_setting(model_dir, argv, expect):
    with pytest.raises(CLIError, match=expect):
        settings_from(["--model", str(model_dir), *argv])


def test_missing_model_has_a_hint(tmp_path):
    with pytest.raises(CLIError, match="colm train"):
        settings_from(["--model", str(tmp_path / "none")])
    with pytest.raises(CLIError, match="no config.json"):
        settings_from(["--model", str(tmp_path)])


def test_parse_size():
    assert [parse_size(v) for v in ("1024", "4KiB", "2MB", "1.5GiB", 7)] == [1024, 4096, 2_000_000, 3 << 29, 7]
    with pytest.raises(ValueError):
        parse_size("lots")


def test_no_arguments_serve_the_default_model(monkeypatch):
    """`colm serve` with no arguments: models/colm-tiny on 127.0.0.1:8000."""
    for var in ("COLM_MODEL", "COLM_HOST", "COLM_PORT", "COLM_SERVED_MODEL_NAME"):
        monkeypatch.delenv(var, raising=False)
    default = default_model_dir()
    if not (default / "config.json").is_file():
        pytest.skip("models/colm-tiny is not in this checkout")
    s = settings_from([])
    assert (s.model, s.host, s.port, s.model_name) == (default, "127.0.0.1", 8000, "colm-tiny")
