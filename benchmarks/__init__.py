"""Benchmark scripts; ``benchmarks.common`` holds the helpers they share."""
