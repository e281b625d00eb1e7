"""Shared plumbing of every service: names, JSON bodies, errors, the HTTP launcher, processes and metrics.

Nothing here imports the rest of sllm_faas, so any part may depend on it (tests/test_import_boundaries.py).
"""
