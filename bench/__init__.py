"""Benchmarks: scripts that print a table and record it in BENCHMARKS.md."""
