"""Tracking: the MLflow plumbing (store.py) and the one module that queries runs (results.py)."""
