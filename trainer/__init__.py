"""Duet trainer: turns vote events into a reward model (and, later, a better policy)."""
