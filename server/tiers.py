"""Named service levels (tiers): the defaults, and the tier file `--tiers-file` loads at start-up."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Tier:
    """A named service level: a chain count and a scheduling priority (higher first), and optionally
    an end-to-end latency target that degradation protects."""

    name: str
    chains: int
    priority: int
    latency_budget_ms: float | None = None


class TierError(ValueError):
    """The tier configuration is invalid (start-up error)."""


def default_tiers(n_chains: int) -> dict[str, Tier]:
    """economy: 1 chain, low priority; standard: half the chains; premium: all chains, high priority."""
    return {"economy": Tier("economy", 1, -10), "standard": Tier("standard", max(1, n_chains // 2), 0),
            "premium": Tier("premium", n_chains, 10)}


def _tier_chains(value, n_chains: int, name: str) -> int:
    named = {"all": n_chains, "half": max(1, n_chains // 2), "one": 1}
    k = named.get(value, value) if isinstance(value, str) else value
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n_chains:
        raise TierError(f"tier {name!r}: chains must be 1..{n_chains}, 'half' or 'all', got {value!r}")
    return k


def load_tiers(path: Path | None, n_chains: int) -> dict[str, Tier]:
    """Tiers from a YAML or JSON file {tiers: {name: {chains, priority, latency_budget_ms}}}, or defaults.

    chains may be an integer, "half" or "all" (resolved against the model's chain count).
    """
    if path is None:
        return default_tiers(n_chains)
    text = Path(path).read_text()
    try:
        if Path(path).suffix in (".yaml", ".yml"):
            import yaml  # only needed for YAML tier files

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError: report, do not crash
        raise TierError(f"{path}: cannot parse tier file ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("tiers"), dict) or not data["tiers"]:
        raise TierError(f"{path}: expected a mapping with a non-empty 'tiers' mapping")
    tiers = {}
    for name, spec in data["tiers"].items():
        if not isinstance(spec, dict) or set(spec) - {"chains", "priority", "latency_budget_ms"}:
            raise TierError(f"{path}: tier {name!r} takes only chains, priority, latency_budget_ms")
        budget = spec.get("latency_budget_ms")
        if budget is not None and not (isinstance(budget, (int, float)) and budget > 0):
            raise TierError(f"{path}: tier {name!r}: latency_budget_ms must be a positive number")
        priority = spec.get("priority", 0)
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise TierError(f"{path}: tier {name!r}: priority must be an integer")
        tiers[str(name)] = Tier(str(name), _tier_chains(spec.get("chains", "all"), n_chains, name),
                                priority, budget)
    return tiers
