"""Replay: a recorded batch through the daemon's own stages, and its HTML report."""
