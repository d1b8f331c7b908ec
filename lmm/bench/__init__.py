"""Benchmark data loaders and pure-Python metrics for the memory module."""
