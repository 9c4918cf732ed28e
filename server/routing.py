"""Per-request chain selection: ChainRouter turns a request's hints into a ChainChoice.

First match wins: the model id `<base>:c<k>` > `chains` > `tier` > `latency_budget_ms` > the server's
default tier. Each of the last three has a header twin (X-CoLM-Chains, X-CoLM-Tier,
X-CoLM-Latency-Budget-Ms) for clients that cannot add body fields; a body field beats its header.
Tiers are defined in server/tiers.py; the latency predictor budget routing asks is admission's
(server/admission/predictor.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from colm_runtime.config import ModelConfig

from server.errors import InvalidRequest, ModelNotFound
from server.tiers import Tier, TierError

if TYPE_CHECKING:
    from server.admission.predictor import LatencyPredictor


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
    degrade_reasons: tuple[str, ...] = field(default=())  # admission's DegradeReason values, in order

    def __post_init__(self) -> None:
        if not self.requested_chains:
            object.__setattr__(self, "requested_chains", self.chains)

    def degraded(self, chains: int, why: str, predicted_s: float | None) -> "ChainChoice":
        assert 1 <= chains < self.chains
        return replace(self, chains=chains, reason="degraded", predicted_s=predicted_s,
                       degrade_reasons=self.degrade_reasons + (why,))


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

    def _tier(self, name: str) -> Tier:
        if name not in self.tiers:
            raise InvalidRequest(f"unknown tier {name!r}; tiers: {', '.join(sorted(self.tiers))}", param="tier")
        return self.tiers[name]

    def route(self, hints: RouteHints, predictor: LatencyPredictor, prompt_tokens: int,
              max_tokens: int) -> ChainChoice:
        """The chain count, reason and priority for one request (hints.chains already validated:
        engine/validation.py)."""
        model_k = self.chains_of_model(hints.model)
        tier = self._tier(hints.tier) if hints.tier is not None else None
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
