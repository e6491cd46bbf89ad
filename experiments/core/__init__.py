"""Core: the declared task steps, every run's settings, paths and stores, preprocessing."""
