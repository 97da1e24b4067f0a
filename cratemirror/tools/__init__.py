"""Operator commands: warm, verify, prune, export, import."""
