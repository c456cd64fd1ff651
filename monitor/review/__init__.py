"""The review queue: crops kept for an operator to label (issue 14)."""
