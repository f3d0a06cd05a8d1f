"""Benchmarks: `python -m bench` (or `make bench`). See README.md, section Benchmarks."""
