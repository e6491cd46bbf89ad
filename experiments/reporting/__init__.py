"""Reporting: the comparison table and the generated findings."""
