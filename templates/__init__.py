"""Batch script templates shipped with hpcmove (Jinja2). Sites override them by name."""
