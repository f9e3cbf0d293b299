"""Reproducible benchmarks: ``python -m benchmarks.norms [--quick] [--out DIR]``."""
