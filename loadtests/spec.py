"""What a load phase sends: length distributions, chain selections and the arrival process.

Each is a frozen dataclass with a small text syntax for the command line, so a phase is fully
described by one LoadSpec (written into summary.json, so a run can be repeated).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass


class SpecError(ValueError):
    """A load description given on the command line is malformed."""


@dataclass(frozen=True)
class Distribution:
    """A token-length distribution: `fixed` (a), `uniform` [a, b] or `normal` (mean a, std b), >= 1.

    Text syntax: "64", "uniform:32:128", "normal:64:16".
    """

    kind: str
    a: int
    b: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "uniform", "normal"):
            raise SpecError(f"unknown distribution {self.kind!r} (fixed, uniform, normal)")
        if self.a < 1 or self.b < 0 or (self.kind == "uniform" and self.b < self.a):
            raise SpecError(f"bad bounds for {self.kind} distribution: {self.a}, {self.b}")

    @classmethod
    def parse(cls, text: str) -> "Distribution":
        parts = str(text).split(":")
        try:
            if len(parts) == 1:
                return cls("fixed", int(parts[0]))
            return cls(parts[0], int(parts[1]), int(parts[2]) if len(parts) > 2 else 0)
        except (ValueError, IndexError):
            raise SpecError(f"not a length distribution: {text!r} (64, uniform:32:128, normal:64:16)") from None

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return rng.randint(self.a, self.b)
        return max(1, round(rng.gauss(self.a, self.b)))

    @property
    def upper(self) -> int:
        """The largest length this distribution yields with any practical likelihood."""
        return {"fixed": self.a, "uniform": self.b, "normal": self.a + 4 * self.b}[self.kind]

    def __str__(self) -> str:
        return str(self.a) if self.kind == "fixed" else f"{self.kind}:{self.a}:{self.b}"


_SELECTION_KEYS = ("model", "chains", "tier", "budget", "default")


@dataclass(frozen=True)
class Selection:
    """How a request picks its chain count, in CoLM's terms (docs/api.md), with a mix weight.

    model_chains pins by model id `<base>:c<k>`; chains / tier / latency_budget_ms are the body fields
    of the same names; all None is the server's default. Text syntax: items joined by '+', then an
    optional '@weight': "default", "model=c4", "chains=2", "tier=economy", "budget=1500",
    "tier=premium+budget=2000@3".
    """

    model_chains: int | None = None
    chains: int | None = None
    tier: str | None = None
    latency_budget_ms: float | None = None
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "Selection":
        body, _, weight = text.strip().partition("@")
        fields: dict = {"weight": float(weight) if weight else 1.0}
        for item in filter(None, body.split("+")):
            key, _, value = item.partition("=")
            if key not in _SELECTION_KEYS or (key != "default" and not value):
                raise SpecError(f"not a chain selection: {item!r} (one of {', '.join(_SELECTION_KEYS)})")
            try:
                if key == "model":
                    fields["model_chains"] = int(value.lstrip("c"))
                elif key == "chains":
                    fields["chains"] = int(value)
                elif key == "tier":
                    fields["tier"] = value
                elif key == "budget":
                    fields["latency_budget_ms"] = float(value)
            except ValueError:
                raise SpecError(f"not a number in chain selection {item!r}") from None
        if fields["weight"] <= 0:
            raise SpecError(f"selection weight must be positive: {text!r}")
        return cls(**fields)

    def model_id(self, base: str) -> str:
        return base if self.model_chains is None else f"{base}:c{self.model_chains}"

    def body_fields(self) -> dict:
        """The CoLM request fields this selection adds to the OpenAI body."""
        fields = {"chains": self.chains, "tier": self.tier, "latency_budget_ms": self.latency_budget_ms}
        return {k: v for k, v in fields.items() if v is not None}

    @property
    def label(self) -> str:
        parts = [f"model=c{self.model_chains}" if self.model_chains else "",
                 f"chains={self.chains}" if self.chains else "", f"tier={self.tier}" if self.tier else "",
                 f"budget={self.latency_budget_ms:g}" if self.latency_budget_ms else ""]
        return "+".join(p for p in parts if p) or "default"


def parse_mix(text: str) -> tuple[Selection, ...]:
    """"default@2,tier=economy,budget=1500" -> selections (weights are relative)."""
    mix = tuple(Selection.parse(t) for t in text.split(",") if t.strip())
    if not mix:
        raise SpecError("the chain-selection mix is empty")
    return mix


@dataclass(frozen=True)
class LoadSpec:
    """One phase of traffic. Bounded twice: at most max_requests, sent within duration_s; whatever is
    still running drain_timeout_s after the last send is cancelled and counted as timed out.

    arrival: "poisson" or "constant" at `rate` requests/s (open loop: sends never wait for answers),
    or "users": `users` clients each sending its next request when the last one ends (closed loop).
    cancel_share: the share of requests whose client disconnects mid-stream, after a random number
    of tokens below its max_tokens.
    """

    arrival: str = "poisson"
    rate: float = 1.0
    users: int = 1
    max_requests: int = 100
    duration_s: float = 60.0
    drain_timeout_s: float = 60.0
    prompt_tokens: Distribution = Distribution("fixed", 64)
    output_tokens: Distribution = Distribution("fixed", 32)
    mix: tuple[Selection, ...] = (Selection(),)
    cancel_share: float = 0.0
    seed: int = 0
    endpoint: str = "completions"
    prompt_format: str = "tokens"
    request_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.arrival not in ("poisson", "constant", "users"):
            raise SpecError(f"arrival must be poisson, constant or users, got {self.arrival!r}")
        if self.arrival != "users" and not (self.rate > 0 and math.isfinite(self.rate)):
            raise SpecError(f"rate must be a positive number of requests/s, got {self.rate}")
        if self.arrival == "users" and self.users < 1:
            raise SpecError("users must be at least 1")
        if self.max_requests < 1 or self.duration_s <= 0 or self.drain_timeout_s < 0:
            raise SpecError("max_requests >= 1, duration > 0 and drain timeout >= 0 are required")
        if not 0 <= self.cancel_share <= 1:
            raise SpecError("cancel share must be in [0, 1]")
        if self.endpoint not in ("completions", "chat"):
            raise SpecError("endpoint must be completions or chat")
        if self.prompt_format not in ("tokens", "text"):
            raise SpecError("prompt format must be tokens or text")

    @property
    def offered_rate(self) -> float | None:
        """Requests/s offered by an open-loop phase (None for closed-loop users)."""
        return None if self.arrival == "users" else self.rate

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prompt_tokens"], d["output_tokens"] = str(self.prompt_tokens), str(self.output_tokens)
        d["mix"] = [f"{s.label}@{s.weight:g}" for s in self.mix]
        return d
