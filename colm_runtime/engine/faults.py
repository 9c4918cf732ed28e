"""Fault injection for reliability tests: make one marked request raise inside the engine.

Off unless the process was started with COLM_FAULT_INJECT="<stage>:<marker>" in its environment
(stage: `add` raises while the request is added, `step` while its first generated token is processed,
`forward` in the batched forward of a step that schedules it: that fails the batch's requests).
A request is marked when its prompt's text contains the marker. Nothing in a request can switch the
hook on: the setting is read once, from the environment, when the engine is built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ENV = "COLM_FAULT_INJECT"
STAGES = ("add", "step", "forward")


class InjectedFault(RuntimeError):
    """Raised by the hook (never by real code): tests assert on its name."""


@dataclass(frozen=True)
class FaultInjector:
    """stage + marker, or disabled (marker None)."""

    stage: str | None = None
    marker: str | None = None

    @classmethod
    def from_env(cls) -> "FaultInjector":
        spec = os.environ.get(ENV, "")
        if not spec:
            return cls()
        stage, _, marker = spec.partition(":")
        if stage not in STAGES or not marker:
            raise ValueError(f"{ENV} must be '<add|step|forward>:<marker>', got {spec!r}")
        return cls(stage, marker)

    @property
    def enabled(self) -> bool:
        return self.marker is not None

    def marked(self, prompt_token_ids, tokenizer) -> bool:
        """Whether a prompt carries the marker (decoded only when the hook is on)."""
        return self.enabled and self.marker in tokenizer.decode(list(prompt_token_ids))

    def check(self, stage: str, marked: bool) -> None:
        if marked and stage == self.stage:
            raise InjectedFault(f"injected fault at {stage} ({ENV})")
