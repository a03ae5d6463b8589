"""Benchmarks: `make bench` (or `python -m bench`). Never part of the timed test suite."""
