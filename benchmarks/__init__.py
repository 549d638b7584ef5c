"""Benchmarks run from the repository root (``python -m benchmarks.bench``); not installed
with the package."""
