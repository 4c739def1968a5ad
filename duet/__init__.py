"""Duet: the CLI and the one settings class shared by serving, feedback and trainer."""
