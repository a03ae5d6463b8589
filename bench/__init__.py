"""Benchmarks: `make bench` (or `python -m bench`). Never part of the timed test suite.

Run from the repository's root (`python -m bench...`), which puts the root on the import path:
the benchmarks import `refresher` and the test doubles (`testdoubles`) from there, and the child
processes they start inherit the working directory, so they import the same tree.
"""
