"""Benchmark harness: ``python -m backpack_tn.bench``."""
