"""Per-request chain selection: ChainRouter, the named tiers, and the latency predictor.

First match wins: the model id `<base>:c<k>` > `chains` > `tier` > `latency_budget_ms` > the server's
default tier. Each of the last three has a header twin (X-CoLM-Chains, X-CoLM-Tier,
X-CoLM-Latency-Budget-Ms) for clients that cannot add body fields; a body field beats its header.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from colm_runtime.config import ModelConfig
from colm_runtime.engine.types import EngineStats

from server.errors import InvalidRequest, ModelNotFound
from server.load import Offered


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


@dataclass(frozen=True)
class RouteHints:
    """The client's chain-selection inputs, body fields already merged over headers."""

    model: str
    chains: int | None = None
    tier: str | None = None
    latency_budget_ms: float | None = None
    priority: int | None = None


@dataclass(frozen=True)
class ChainChoice:
    """The router's (and then degradation's) decision for one request.

    pinned: the client fixed the chain count (model id or `chains`): never degraded, never shrunk.
    """

    chains: int
    reason: str
    priority: int
    pinned: bool
    tier: str | None = None
    latency_budget_ms: float | None = None
    predicted_s: float | None = None
    correction: float = 1.0  # the predictor's correction factor in predicted_s
    requested_chains: int = 0
    degrade_reasons: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.requested_chains:
            object.__setattr__(self, "requested_chains", self.chains)

    def degraded(self, chains: int, why: str, predicted_s: float | None) -> "ChainChoice":
        assert 1 <= chains < self.chains
        return replace(self, chains=chains, reason="degraded", predicted_s=predicted_s,
                       degrade_reasons=self.degrade_reasons + (why,))


DRAIN_S = 3.0  # utilization(): the waiting queue is load to serve within this many seconds


@dataclass(frozen=True)
class LatencyPredictor:
    """End-to-end latency at k chains = correction x (queue wait + prompt x prefill time per token +
    max_tokens x the step time of the batch the request joins).

    In continuous batching every running request waits for the whole batch each step, and a step costs
    about what its widest rows cost: a request admitted at k chains into a batch whose widest request in
    flight has `widest` chains pays the step time of max(k, widest) chains per token, not of k.
    The step and prefill times come from the engine (EngineStats, keyed by a step's widest chain count),
    the queue wait from the server's live queue estimate, `correction` from how far recent predictions
    were off (server.load.PredictionCorrection). A chain count never measured yet borrows the nearest
    measured one, scaled by width (compute grows with width); with nothing measured the prediction is 0
    (optimistic). `offered` (the recent demand) gives utilization(k), the share of the engine's
    time that load would take if it all ran at k chains.
    """

    cfg: ModelConfig
    stats: EngineStats
    queue_wait_s: float
    widest: int = 0
    correction: float = 1.0
    offered: Offered = field(default_factory=Offered)

    def _per_chain(self, table: dict[int, float], k: int) -> float:
        if k in table:
            return table[k]
        if not table:
            return 0.0
        near = min(table, key=lambda j: abs(j - k))
        return table[near] * self.cfg.width(k) / self.cfg.width(near)

    def predict_raw(self, k: int, prompt_tokens: int, max_tokens: int) -> float:
        """Seconds from now to the last token at k chains, before the correction."""
        queue = self.queue_wait_s if self.stats.waiting > 0 else 0.0
        batch_k = max(k, self.widest)
        prefill = prompt_tokens * self._per_chain(self.stats.prefill_time_per_token, batch_k)
        decode = max_tokens * self._per_chain(self.stats.step_time_per_chains, batch_k)
        return queue + prefill + decode

    def predict(self, k: int, prompt_tokens: int, max_tokens: int) -> float:
        """Seconds from now to the last token at k chains (corrected)."""
        return self.correction * self.predict_raw(k, prompt_tokens, max_tokens)

    def largest_fitting(self, budget_s: float, upto: int, prompt_tokens: int, max_tokens: int) -> int | None:
        """The largest chain count <= upto whose prediction fits the budget (None: none fits)."""
        for k in range(upto, 0, -1):
            if self.predict(k, prompt_tokens, max_tokens) <= budget_s:
                return k
        return None

    def utilization(self, k: int, max_num_seqs: int) -> float:
        """The share of the engine's time the load would take with every request at k chains:
        (offered rate + waiting / DRAIN_S) x (max_tokens x decode step / batch slots + prompt x prefill
        time per token). The waiting requests count as load to serve within DRAIN_S seconds, so a queue
        that has built up (or a client that sends in bursts) is not mistaken for spare capacity.
        Above 1 the queue grows at k chains."""
        o = self.offered
        if o.rate <= 0 and self.stats.waiting <= 0:
            return 0.0
        decode = o.max_tokens * self._per_chain(self.stats.step_time_per_chains, k) / max_num_seqs
        prefill = o.prompt_tokens * self._per_chain(self.stats.prefill_time_per_token, k)
        return (o.rate + self.stats.waiting / DRAIN_S) * (decode + prefill)


class ChainRouter:
    """Turns a request's hints into a ChainChoice (see the module docstring for the order)."""

    def __init__(self, cfg: ModelConfig, base_name: str, tiers: dict[str, Tier], default_tier: str):
        if default_tier not in tiers:
            raise TierError(f"default tier {default_tier!r} is not one of {sorted(tiers)}")
        self.cfg, self.base_name, self.tiers, self.default_tier = cfg, base_name, tiers, default_tier

    def model_ids(self) -> list[tuple[str, int]]:
        """(id, chains) of every id served: the base model (all chains), then `<base>:c<k>`."""
        n = self.cfg.n_chains
        return [(self.base_name, n)] + [(f"{self.base_name}:c{k}", k) for k in range(1, n + 1)]

    def chains_of_model(self, model: str) -> int | None:
        """None for the base id; k for `<base>:c<k>`; ModelNotFound otherwise."""
        if model == self.base_name:
            return None
        for mid, k in self.model_ids()[1:]:
            if model == mid:
                return k
        raise ModelNotFound(f"The model `{model}` does not exist. Served: "
                            f"{', '.join(m for m, _ in self.model_ids())}", param="model")

    def _check_chains(self, k: int) -> int:
        if not 1 <= k <= self.cfg.n_chains:
            raise InvalidRequest(f"chains must be an integer in 1..{self.cfg.n_chains}, got {k}", param="chains")
        return k

    def _tier(self, name: str) -> Tier:
        if name not in self.tiers:
            raise InvalidRequest(f"unknown tier {name!r}; tiers: {', '.join(sorted(self.tiers))}", param="tier")
        return self.tiers[name]

    def route(self, hints: RouteHints, predictor: LatencyPredictor, prompt_tokens: int,
              max_tokens: int) -> ChainChoice:
        """The chain count, reason and priority for one request."""
        model_k = self.chains_of_model(hints.model)
        tier = self._tier(hints.tier) if hints.tier is not None else None
        if hints.chains is not None:
            self._check_chains(hints.chains)
        default = self.tiers[self.default_tier]
        base_priority = (tier or default).priority if hints.priority is None else hints.priority
        common = dict(priority=base_priority, tier=tier.name if tier else None)
        budget_ms = hints.latency_budget_ms
        if model_k is not None:
            choice = ChainChoice(model_k, "model", pinned=True, latency_budget_ms=budget_ms, **common)
        elif hints.chains is not None:
            choice = ChainChoice(hints.chains, "chains", pinned=True, latency_budget_ms=budget_ms, **common)
        elif tier is not None:
            choice = ChainChoice(tier.chains, "tier", pinned=False,
                                 latency_budget_ms=budget_ms or tier.latency_budget_ms, **common)
        elif budget_ms is not None:
            n = self.cfg.n_chains
            k = predictor.largest_fitting(budget_ms / 1000, n, prompt_tokens, max_tokens) or 1
            choice = ChainChoice(k, "budget", pinned=False, latency_budget_ms=budget_ms, **common)
        else:
            choice = ChainChoice(default.chains, "default", pinned=False, tier=None,
                                 priority=base_priority, latency_budget_ms=default.latency_budget_ms)
        predicted = predictor.predict(choice.chains, prompt_tokens, max_tokens)
        return replace(choice, predicted_s=predicted, correction=predictor.correction)


def parse_header_number(name: str, value: str | None, kind: type) -> int | float | None:
    """A numeric X-CoLM-* header, or 400 naming the header."""
    if value is None:
        return None
    try:
        number = kind(value.strip())
    except ValueError:
        raise InvalidRequest(f"header {name} must be a{'n integer' if kind is int else ' number'}, "
                             f"got {value[:32]!r}", param=name) from None
    if isinstance(number, float) and (not math.isfinite(number) or number <= 0):
        raise InvalidRequest(f"header {name} must be a positive number", param=name)
    return number
