"""Benchmarks: speed measured side by side in one run, one module a theme, merged by run.py."""
