"""Evaluation-metric alignment stage: ``python -m align.metric``."""
