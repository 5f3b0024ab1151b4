"""Tests for live capacity, Prometheus signals and the leader lock."""
