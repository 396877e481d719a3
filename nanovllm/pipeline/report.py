"""User-facing reports of the decode strategies: the policy's part of the statistics dict, and
the table ``print_pipeline_statistics()`` prints."""

from __future__ import annotations

from nanovllm.pipeline.policy import PipelinePolicy

_HEADER = ("enabled", "mode", "reason", "attention_sms", "ffn_sms", "num_microbatches", "policy")


def policy_report(policy: PipelinePolicy) -> dict:
    measured = policy.measured
    out = {
        "buckets": {b: v["mode"] for b, v in measured.items()},
        "bucket_splits": {b: v["split"] for b, v in measured.items() if v["mode"] == "pipelined"},
        "calibration_ms": {b: (v["sequential_ms"], v["pipelined_ms"]) for b, v in measured.items()},
        "calibration_spread_ms": {b: v.get("spread_ms", 0.0) for b, v in measured.items()},
    }
    if policy.searched:
        out["split_search_ms"] = {
            split: {b: (v["sequential_ms"], v["pipelined_ms"]) for b, v in m.items()}
            for split, m in policy.searched.items()
        }
    return out


def _ms(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def bucket_rows(stats: dict) -> list[list[str]]:
    """One row per batch bucket that was calibrated or ran: the decision and split, the
    calibration's sequential and pipelined ms (and spread), the steps run each way, and with
    profiling the bucket's own stage times."""
    calibrated = stats.get("calibration_ms", {})
    per_bucket = stats.get("per_bucket", {})
    rows = []
    for b in sorted(set(calibrated) | set(per_bucket)):
        seq_ms, pipe_ms = calibrated.get(b, (None, None))
        ran = per_bucket.get(b, {})
        rows.append(
            [
                str(b),
                stats.get("buckets", {}).get(b, "-"),
                stats.get("bucket_splits", {}).get(b, "-"),
                _ms(seq_ms),
                _ms(pipe_ms),
                _ms(stats.get("calibration_spread_ms", {}).get(b)),
                str(ran.get("steps", 0)),
                str(ran.get("sequential_steps", 0)),
                _ms(ran.get("attention_ms")),
                _ms(ran.get("ffn_ms")),
                _ms(ran.get("step_ms")),
            ]
        )
    return rows


def format_table(stats: dict) -> str:
    lines = ["Pipeline statistics", "-" * 72]
    for key in _HEADER:
        if key in stats:
            lines.append(f"{key:<18}{stats[key]}")
    lines.append(
        f"{'decode steps':<18}{stats['steps']} pipelined, {stats['sequential_steps']} "
        f"sequential, {stats['tokens']} tokens"
    )
    if stats.get("kernels"):
        k = stats["kernels"]
        lines.append(
            f"{'kernels':<18}attention stage: {k['attention_stage']}, FFN-stage GEMMs: "
            f"{k['ffn_stage_gemm']}"
        )
    if "split_search_ms" in stats:
        lines.append(f"{'splits tried':<18}{', '.join(stats['split_search_ms'])}")
    rows = bucket_rows(stats)
    if rows:
        head = [
            "bucket",
            "decision",
            "split",
            "seq ms",
            "pipe ms",
            "spread",
            "piped",
            "seq",
            "attn ms",
            "ffn ms",
            "step ms",
        ]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines.append("")
        lines.append("  ".join(h.rjust(w) for h, w in zip(head, widths)))
        for r in rows:
            lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        lines.append(
            "(seq/pipe ms and spread: calibration; piped/seq: steps run; attn/ffn/step ms: mean "
            "stage busy time and step time of that bucket's pipelined steps, with profiling)"
        )
    if "step_ms" in stats:
        lines.append(
            f"{'overlap':<18}{stats['overlap']:.0%} of the shorter stage hidden (all buckets)"
        )
    return "\n".join(lines)
