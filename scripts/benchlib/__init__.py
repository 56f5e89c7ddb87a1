"""Helpers for scripts/bench: the benchmark driver and a bare RADIUS responder."""
