"""When to pipeline: per batch bucket, sequential or pipelined (and on which SM split).

Pure functions of measured timings, so they are tested anywhere. A bucket is pipelined only on
a clear win: faster by more than ``MARGIN`` and by more than the spread its measurements showed
(noise must not flip a bucket). Buckets that were not calibrated follow the nearest smaller
calibrated one.
"""

from __future__ import annotations

MARGIN = 0.02  # pipeline only when at least 2% faster

Split = tuple[int, int]  # (attention SMs, FFN SMs)


def split_name(split: Split) -> str:
    return f"{split[0]}/{split[1]}"


def decide(seq_ms: float, pipe_ms: float, spread_ms: float = 0.0) -> str:
    """ "pipelined" when the pipelined step wins by more than the margin and the spread."""
    win = seq_ms - pipe_ms
    return "pipelined" if pipe_ms < seq_ms * (1 - MARGIN) and win > spread_ms else "sequential"


def calibration_buckets(buckets: list[int]) -> list[int]:
    """Powers of two and the largest bucket; other buckets follow the nearest smaller one."""
    chosen = [b for b in buckets if b >= 2 and b & (b - 1) == 0]
    return sorted(set(chosen) | {buckets[-1]} if buckets[-1] >= 2 else set(chosen))


class PipelinePolicy:
    """Maps a batch bucket to "pipelined" or "sequential" and a pipelined bucket to its split.

    ``measured``: calibrated bucket -> {"mode", "sequential_ms", "pipelined_ms", "spread_ms",
    "split"}, the timings of the split ("attention/ffn") the bucket runs on. ``searched``: every
    split the calibration tried -> its per-bucket measurements."""

    def __init__(self, measured: dict[int, dict], searched: dict[str, dict] | None = None):
        self.measured = dict(sorted(measured.items()))
        self.searched = searched or {}

    def _entry(self, bucket: int) -> dict | None:
        below = [b for b in self.measured if b <= bucket]
        return self.measured[below[-1]] if below else None

    def mode(self, bucket: int) -> str:
        entry = self._entry(bucket)
        return entry["mode"] if entry else "sequential"

    def pipelined_buckets(self) -> list[int]:
        return [b for b, v in self.measured.items() if v["mode"] == "pipelined"]

    def split(self, bucket: int) -> Split | None:
        """(attention SMs, FFN SMs) of a pipelined bucket; None for a sequential one."""
        entry = self._entry(bucket)
        if entry is None or entry["mode"] != "pipelined":
            return None
        attention, ffn = entry["split"].split("/")
        return int(attention), int(ffn)

    def fall_back(self, split: Split, primary: Split) -> None:
        """The buckets assigned to ``split`` take ``primary``'s own timings and decision (when
        ``split``'s green contexts cannot be created)."""
        name, primary_name = split_name(split), split_name(primary)
        for bucket, entry in self.measured.items():
            if entry["mode"] == "pipelined" and entry["split"] == name:
                self.measured[bucket] = {
                    **self.searched[primary_name][bucket],
                    "split": primary_name,
                }


def with_split(measured: dict[int, dict], split: Split) -> dict[int, dict]:
    return {b: {**v, "split": split_name(split)} for b, v in measured.items()}


def assign_buckets(results: dict[Split, dict[int, dict]], primary: Split) -> dict[int, dict]:
    """Per calibrated bucket, the split to pipeline it on: ``primary`` when it pipelines the
    bucket and no other split is faster by more than the margin, else the fastest split that
    pipelines it; sequential, with ``primary``'s timings, where no split does."""
    out = {}
    for bucket in results[primary]:
        best = primary
        for split, measured in results.items():
            entry, current = measured.get(bucket), results[best][bucket]
            if entry is None or entry["mode"] != "pipelined":
                continue
            limit = current["pipelined_ms"] * (1 - MARGIN)
            if current["mode"] != "pipelined" or entry["pipelined_ms"] < limit:
                best = split
        out[bucket] = {**results[best][bucket], "split": split_name(best)}
    return out


def saved_ms(measured: dict[int, dict]) -> float:
    """Step time the pipelined buckets of one split save, summed over the calibrated buckets."""
    piped = [v for v in measured.values() if v["mode"] == "pipelined"]
    return sum(v["sequential_ms"] - v["pipelined_ms"] for v in piped)


def choose_split(results: dict[Split, dict[int, dict]], default: Split) -> Split:
    """The split whose pipelined buckets save the most; ``default`` when none saves anything."""
    best = max(results, key=lambda split: saved_ms(results[split]))
    return best if saved_ms(results[best]) > 0 else default
