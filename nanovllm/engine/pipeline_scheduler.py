"""Placeholder replaced below."""
from __future__ import annotations


class PipelineScheduler:
    def __init__(self, runner, reason):
        self.active = False
        self.reason = reason

    @classmethod
    def create(cls, runner):
        return cls(runner, "pipeline disabled")

    def statistics(self):
        return {"enabled": False, "mode": "sequential", "reason": self.reason}

    def print_statistics(self):
        print(self.statistics())

    def close(self):
        pass
