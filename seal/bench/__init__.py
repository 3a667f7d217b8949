"""Benchmarks as commands: `seal bench knowledge` (the SEAL results table) and `seal bench recipe`."""
