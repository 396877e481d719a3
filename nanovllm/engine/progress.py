"""The progress bar's prefill and decode tokens/s."""

from __future__ import annotations


class StepRates:
    """Tokens per second of prefill and of decode over every step of one ``generate`` call so
    far. One step's own rate misleads: with async scheduling a step may only collect tokens the
    GPU produced during the step before, taking next to no time."""

    def __init__(self) -> None:
        self.tokens = {"prefill": 0, "decode": 0}
        self.seconds = {"prefill": 0.0, "decode": 0.0}

    def add(self, num_tokens: int, seconds: float) -> None:
        """One step: ``num_tokens`` as ``LLMEngine.step`` returns it (positive for prefill,
        negative for decode, 0 for a step that ran nothing)."""
        if num_tokens:
            kind = "prefill" if num_tokens > 0 else "decode"
            self.tokens[kind] += abs(num_tokens)
            self.seconds[kind] += seconds

    def rate(self, kind: str) -> float:
        return self.tokens[kind] / self.seconds[kind] if self.seconds[kind] > 0 else 0.0

    def postfix(self) -> dict[str, str]:
        return {kind: f"{self.rate(kind):.0f}tok/s" for kind in ("prefill", "decode")}
