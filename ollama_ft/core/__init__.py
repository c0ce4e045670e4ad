"""Shared by every stage: errors, console, config, run directory, dtype choice, worker processes."""
