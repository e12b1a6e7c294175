"""Benchmarks: run each as `python -m bench.<name>`; figures are recorded in docs/BENCHMARKS.md."""
