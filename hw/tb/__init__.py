"""Simulation side: harness tops, cocotb test modules and the pytest-facing runner helpers."""
